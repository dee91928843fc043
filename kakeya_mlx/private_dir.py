"""Directories only this user may use: the daemon's socket directory and the session store.

Standard library only: the daemon checks its socket directory before it imports the engine.
"""

import os
import stat
from pathlib import Path
from typing import Optional


def private_dir_problem(directory: Path, what: str, instead: str, others_may_read: bool) -> Optional[str]:
    """Create `directory` with mode 0700, or check an existing one is this user's and closed to others.

    Returns why it cannot be used, or None. `what` names it in the message and
    `instead` is what to choose instead; `others_may_read` allows group and world
    read and search bits on an existing directory (never write).
    """
    try:
        directory.mkdir(mode=0o700, parents=True)
        directory.chmod(0o700)  # mkdir's mode is filtered by the umask
        return None
    except FileExistsError:
        pass  # checked below
    except OSError as exc:
        return f"cannot create {what} {directory}: {exc.strerror}"
    st = directory.stat()
    if not stat.S_ISDIR(st.st_mode):
        return f"{what} {directory} exists and is not a directory"
    if st.st_uid != os.getuid():
        return (
            f"{what} {directory} belongs to uid {st.st_uid}, not to this user (uid {os.getuid()}); "
            f"choose another {instead}"
        )
    forbidden, open_as = (0o022, "group- or world-writable") if others_may_read else (0o077, "open to other users")
    if st.st_mode & forbidden:
        return (
            f"{what} {directory} is {open_as} (mode {stat.S_IMODE(st.st_mode):o}); "
            f"run 'chmod 700 {directory}' or choose another {instead}"
        )
    return None
