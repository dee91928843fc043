"""`python -m kakeya_daemon`: the same as `kakeya serve`."""

import sys

from .server import main

sys.exit(main())
