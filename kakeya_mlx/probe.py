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

Each check computes the same rows two ways and compares them bit for bit; a
`ProbeResult` holds one `Check` per property.
"""

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from . import platform
from .cache import CacheShape, SinkWindowCache
from .rope import layer_shifters

TOKENS = 4
# Token by token, and an odd split.
PIECES = ((1, 1, 1, 1), (3, 1))


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

    @property
    def chunk_invariant(self) -> bool:
        return self.chunking.invariant

    def describe(self) -> str:
        """One line for the log."""
        if self.chunk_invariant:
            return f"on {self.backend}, a block computed at once and in pieces gives identical bits"
        return (
            f"on {self.backend}, a block computed at once and in pieces differs "
            f"(max {self.chunking.max_abs_diff:.3g} in {', '.join(self.chunking.differed)})"
        )


def probe(model: nn.Module, vocab_size: int) -> ProbeResult:
    """Run every check on `model` with the running backend."""
    tokens = [(37 * i + 11) % vocab_size for i in range(TOKENS)]
    return ProbeResult(backend=platform.backend(), chunking=_chunking(model, tokens))


def _forward_in_pieces(model: nn.Module, tokens: list[int], sizes) -> dict[str, mx.array]:
    """Logits of every token, and every layer's keys and values, after running `tokens`
    through a fresh cache in pieces of `sizes`."""
    cache = SinkWindowCache(CacheShape(0, len(tokens), len(tokens)), layer_shifters(model))
    logits, start = [], 0
    for size in sizes:
        logits.append(model(mx.array(tokens[start : start + size])[None], cache=cache.layers)[0])
        start += size
    outputs = {"logits": mx.concatenate(logits, axis=0)}
    for i, layer in enumerate(cache.layers):
        outputs[f"layer {i} keys"] = layer.keys[..., : len(tokens), :]
        outputs[f"layer {i} values"] = layer.values[..., : len(tokens), :]
    mx.eval(outputs)
    return outputs


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
