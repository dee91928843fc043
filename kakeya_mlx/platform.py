"""Every difference between running on Metal, CUDA and the CPU backend lives here."""

import fcntl
import os
import sys
from pathlib import Path
from typing import Optional

import mlx.core as mx


def backend() -> str:
    """"metal", "cuda" or "cpu": where MLX runs its work by default."""
    if mx.metal.is_available():
        return "metal"
    cuda = getattr(mx, "cuda", None)
    if cuda is not None and cuda.is_available():
        return "cuda"
    return "cpu"


def default_compute_dtype_for_gguf() -> Optional[str]:
    """Quantized matmuls are slow on MLX's CPU backend: dequantize there; keep 4-bit on GPUs.

    On the CPU backend, bfloat16 rather than float32: measured side by side on SmolLM2
    (tools/bench_dtype.py, docs/bench_dtype.json), the answers are as good (perplexity
    10.00 vs 9.95 on the same text, the likeliest token the same at 97% of positions,
    9 vs 8 of 12 factual questions right greedily and 12 vs 15 of 24 sampled: either
    way by a few answers), while bfloat16 decodes about 1.6x faster and prefills 1.5x
    faster on a 2-core x86-64 CPU, in half the memory (257 vs 513 MiB of weights).
    """
    return "bfloat16" if backend() == "cpu" else None


def default_cache_dir() -> Path:
    """Where converted models and other reusable files go (KAKEYA_HOME overrides)."""
    if os.environ.get("KAKEYA_HOME"):
        return Path(os.environ["KAKEYA_HOME"]).expanduser()
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "kakeya"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "kakeya"


def sync_file(fd: int) -> None:
    """Flush a file (or directory) to stable storage.

    On macOS fsync only reaches the drive's cache; F_FULLFSYNC asks the drive to
    write it through, which is what makes a rename-into-place survive power loss.
    """
    if sys.platform == "darwin":
        try:
            fcntl.fcntl(fd, fcntl.F_FULLFSYNC)
            return
        except OSError:
            pass  # not every file system supports it; fsync is the next best
    os.fsync(fd)
