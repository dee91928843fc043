"""What the running backend's forward pass keeps bit-identical, probed on the loaded model.

The engine keeps the cache canonical (cache.py): a completed block must hold the
same bits however its tokens arrived. Where a forward pass over a block at once and
over the same tokens in pieces agree bit for bit, a completed tail becomes a block
as it is; elsewhere the engine recomputes it in one pass. Which holds is a property
of the kernels actually running, not of the backend's name: MLX's Linux CPU wheel
links the reference BLAS (invariant), an optimized BLAS preloaded in its place is
not (measured with OpenBLAS on SmolLM2 in float32: up to 4e-5, in the logits and
every layer's keys and values), GPU kernels pick different reductions for different
shapes, and Apple's CPU BLAS promises nothing. So it is measured here, on
the model that will serve, with a few forward passes over a few tokens.

The same goes for batching: the scheduler decodes several sessions in one forward
pass, each row on its own cache and length, and a session's stream is the same as
alone only where a row's arithmetic does not depend on the rows beside it.

Each check computes the same rows two ways, through the engine's own forward path
(batch.py), and compares them bit for bit; a `ProbeResult` holds one `Check` per
property.

The probe costs a few forward passes (about 2 s for SmolLM2 on a 2-core CPU), so
`probe_cached` keeps its result in a folder, keyed by everything the kernels that
run depend on: the backend and its device, the MLX version, the BLAS and any
preloaded library, the probe itself, and the model (its config, weight files and
dtype). Anything else changes the key, and the probe runs again.
"""

import hashlib
import json
import logging
import os
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from . import platform
from .batch import forward_batch, forward_one
from .cache import CacheShape, SinkWindowCache
from .rope import layer_shifters

TOKENS = 4
# Token by token, and an odd split.
PIECES = ((1, 1, 1, 1), (3, 1))
# Part of the cache key: a change to what the probe checks makes old results stale.
PROBE_VERSION = 2
# Results kept at most; the least recently used beyond it are removed.
MAX_CACHED_RESULTS = 64
log = logging.getLogger("kakeya.engine")


@dataclass(frozen=True)
class Check:
    """One invariance, measured: which outputs differed (empty when it holds) and by how much."""

    invariant: bool
    differed: tuple[str, ...]
    max_abs_diff: float


@dataclass(frozen=True)
class ProbeResult:
    """What the probe found on one backend and model."""

    backend: str
    chunking: Check  # a block at once vs the same tokens in pieces
    batching: Check  # a row decoded alone vs beside another row of another length

    @property
    def chunk_invariant(self) -> bool:
        return self.chunking.invariant

    @property
    def batch_invariant(self) -> bool:
        return self.batching.invariant

    def describe(self) -> str:
        """One line for the log."""
        return f"on {self.backend}, " + "; ".join(
            _said(check, what)
            for check, what in (
                (self.chunking, "a block computed at once and in pieces"),
                (self.batching, "a session decoded alone and batched with others"),
            )
        )


def _said(check: Check, what: str) -> str:
    if check.invariant:
        return f"{what} give identical bits"
    return f"{what} differ (max {check.max_abs_diff:.3g} in {', '.join(check.differed[:3])})"


def probe(model: nn.Module, vocab_size: int) -> ProbeResult:
    """Run every check on `model` with the running backend."""
    tokens = [(37 * i + 11) % vocab_size for i in range(TOKENS)]
    return ProbeResult(
        backend=platform.backend(), chunking=_chunking(model, tokens), batching=_batching(model, tokens, vocab_size)
    )


def _fresh_cache(model: nn.Module, size: int) -> SinkWindowCache:
    return SinkWindowCache(CacheShape(0, size, size), layer_shifters(model))


def _outputs(cache: SinkWindowCache, logits: list[mx.array], n: int) -> dict[str, mx.array]:
    outputs = {"logits": mx.concatenate(logits, axis=0)}
    for i, layer in enumerate(cache.layers):
        outputs[f"layer {i} keys"] = layer.keys[..., :n, :]
        outputs[f"layer {i} values"] = layer.values[..., :n, :]
    mx.eval(outputs)
    return outputs


def _forward_in_pieces(model: nn.Module, tokens: list[int], sizes) -> dict[str, mx.array]:
    """Logits of every token, and every layer's keys and values, after running `tokens`
    through a fresh cache in pieces of `sizes`."""
    cache = _fresh_cache(model, len(tokens))
    logits, start = [], 0
    for size in sizes:
        logits.append(forward_one(model, cache.layers, tokens[start : start + size]))
        start += size
    return _outputs(cache, logits, len(tokens))


def _batching(model: nn.Module, tokens: list[int], vocab_size: int) -> Check:
    """Token by token, alone and beside a longer row that feeds two tokens a step."""
    alone = _forward_in_pieces(model, tokens, [1] * len(tokens))
    cache, other = _fresh_cache(model, len(tokens)), _fresh_cache(model, 4 * len(tokens))
    neighbour = [(53 * i + 5) % vocab_size for i in range(3 * len(tokens))]
    mx.eval(forward_one(model, other.layers, neighbour[: len(tokens)]))
    logits = []
    for i, token in enumerate(tokens):
        inputs = mx.array([[token, 0], neighbour[2 * i : 2 * i + 2]])
        logits.append(forward_batch(model, [cache.layers, other.layers], inputs, [1, 2])[0, :1])
    return _compare(alone, [_outputs(cache, logits, len(tokens))])


def _compare(reference: dict[str, mx.array], others: list[dict[str, mx.array]]) -> Check:
    differed, worst = [], 0.0
    for name, expected in reference.items():
        diffs = [mx.abs(o[name].astype(mx.float32) - expected.astype(mx.float32)).max().item() for o in others]
        if any(not mx.array_equal(o[name], expected).item() for o in others):
            differed.append(name)
            worst = max(worst, *diffs)
    return Check(invariant=not differed, differed=tuple(differed), max_abs_diff=worst)


def _chunking(model: nn.Module, tokens: list[int]) -> Check:
    at_once = _forward_in_pieces(model, tokens, [len(tokens)])
    return _compare(at_once, [_forward_in_pieces(model, tokens, sizes) for sizes in PIECES])


def probe_cached(model: nn.Module, vocab_size: int, model_key: str, folder: Path) -> tuple[ProbeResult, bool]:
    """`probe(model)`, or its result kept in `folder` from an earlier run with the same key; (result, reused).

    `model_key` names the model's weights as loaded (see `model_fingerprint`).
    """
    file = folder / f"{_key(model_key)}.json"
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
        found = ProbeResult(data["backend"], _check(data["chunking"]), _check(data["batching"]))
        os.utime(file)  # recently used
        return found, True
    except (OSError, ValueError, KeyError, TypeError):
        pass  # not probed yet (or an unreadable file): probe now
    log.info("probing whether this backend computes the same bits in pieces and batched (once per model)")
    found = probe(model, vocab_size)
    try:
        kept = {"backend": found.backend, "chunking": asdict(found.chunking), "batching": asdict(found.batching)}
        _store(folder, file, kept)
    except OSError as e:
        log.warning("cannot keep the probe result in %s: %s", folder, e)
    return found, False


def _check(kept: dict) -> Check:
    return Check(bool(kept["invariant"]), tuple(kept["differed"]), float(kept["max_abs_diff"]))


def model_fingerprint(path: Path, config: dict, dtype: str) -> str:
    """What a loaded model's computation depends on: its config, its weight files as they are, and its dtype."""
    files = sorted(Path(path).glob("model*.safetensors"))
    stats = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return json.dumps({"config": config, "files": stats, "dtype": dtype}, sort_keys=True, default=str)


def _key(model_key: str) -> str:
    """The model's key with everything of the running kernels beside it, hashed."""
    parts = {
        "probe": [PROBE_VERSION, TOKENS, PIECES],
        "backend": platform.backend(),
        "device": mx.device_info(),
        "mlx": mx.__version__,
        "libraries": _linked_math_libraries(),
        "preload": [os.environ.get(v, "") for v in ("LD_PRELOAD", "DYLD_INSERT_LIBRARIES")],
        "os": [sys.platform, os.uname().release],
        "model": model_key,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _linked_math_libraries() -> list[str]:
    """The BLAS / LAPACK libraries mapped into this process (Linux); on macOS the OS release names Accelerate."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return []
    names = {line.rsplit(maxsplit=1)[-1] for line in maps.splitlines() if "/" in line}
    return sorted(n for n in names if any(k in Path(n).name.lower() for k in ("blas", "lapack", "mkl", "gfortran")))


def _store(folder: Path, file: Path, data: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".partial")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f)
    os.replace(tmp, file)
    kept = sorted(folder.glob("*.json"), key=lambda f: f.stat().st_mtime, reverse=True)
    for old in kept[MAX_CACHED_RESULTS:]:
        old.unlink(missing_ok=True)
