"""`python -m kakeya_client` is the `kakeya` command."""

from .cli import main

raise SystemExit(main())
