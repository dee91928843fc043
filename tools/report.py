"""What every benchmark's JSON says about where it was measured, and how it is written."""

import json
import os
import platform as host_platform
from pathlib import Path

import mlx.core as mx

from kakeya_mlx import platform


def measured_on() -> dict:
    """The backend, MLX version and machine a figure was taken on."""
    return {
        "backend": platform.backend(),
        "mlx": mx.__version__,
        "machine": f"{host_platform.system()} {host_platform.machine()}, {os.cpu_count()} cpus",
    }


def write_report(result: dict, out: str | Path) -> Path:
    """`result` as JSON at `out`, after measured_on()'s fields (the result's own win)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**measured_on(), **result}, indent=2, ensure_ascii=False) + "\n")
    return out
