"""Where the daemon's socket lives by default."""

import os
import sys
from pathlib import Path

SOCKET_ENV = "KAKEYA_SOCKET"


def default_socket_path() -> Path:
    """$KAKEYA_SOCKET if set; else ~/Library/Application Support/kakeya/kakeya.sock on macOS,
    $XDG_RUNTIME_DIR/kakeya/kakeya.sock or ~/.cache/kakeya/kakeya.sock elsewhere."""
    override = os.environ.get(SOCKET_ENV)
    if override:
        return Path(override).expanduser()
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "kakeya" / "kakeya.sock"
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "kakeya" / "kakeya.sock"
    return Path.home() / ".cache" / "kakeya" / "kakeya.sock"
