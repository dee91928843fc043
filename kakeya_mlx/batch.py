"""One forward pass over several sessions' caches at once.

mlx-lm's attention layers talk to a cache through `offset`, `update_and_fetch` and
`make_mask`. `BatchedLayer` gives them a batch of rows, each row a different
session's `LayerKV` with its own length: `offset` is an array of per-row RoPE
offsets (`mx.fast.rope` rotates row b from offset[b]), new keys and values are
written into each session's own buffer, and attention reads every row's keys
padded to the longest row, with a mask that hides each row's padding and keeps it
causal. Rows may feed different numbers of tokens (a decode feeds one, a
speculative verification several): inputs are right-padded and the padding's
keys are never written.

Every session's cache stays its own, so a session joins or leaves the batch at any
step and its memory does not depend on who it is batched with. The price is one
copy per step of the rows' keys and values into the stacked arrays attention reads.
"""

from typing import Sequence

import mlx.core as mx
import mlx.nn as nn

from .cache import LayerKV


class BatchedLayer:
    """One layer's caches of a batch of rows, behind mlx-lm's cache interface."""

    def __init__(self, layers: Sequence[LayerKV], fed: Sequence[int], mask: mx.array):
        self.layers = layers
        self.fed = fed
        self.starts = [layer.offset for layer in layers]
        self.offset = mx.array(self.starts)
        self.length = max(s + n for s, n in zip(self.starts, fed))
        self._mask = mask

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        """Write each row's real tokens into its own cache; return every row's keys and values, stacked."""
        out_k, out_v = [], []
        for b, (layer, n) in enumerate(zip(self.layers, self.fed)):
            k, v = layer.update_and_fetch(keys[b : b + 1, :, :n, :], values[b : b + 1, :, :n, :])
            pad = self.length - k.shape[2]
            if pad:
                k = mx.pad(k, [(0, 0), (0, 0), (0, pad), (0, 0)])
                v = mx.pad(v, [(0, 0), (0, 0), (0, pad), (0, 0)])
            out_k.append(k)
            out_v.append(v)
        return mx.concatenate(out_k, axis=0), mx.concatenate(out_v, axis=0)

    def make_mask(self, N: int, return_array: bool = False, window_size=None):
        return self._mask


def batch_mask(starts: Sequence[int], fed: Sequence[int]) -> mx.array:
    """(B, 1, N, L) bool: query i of row b sees keys up to starts[b] + i."""
    width = max(fed)
    length = max(s + n for s, n in zip(starts, fed))
    last = mx.array(starts)[:, None] + mx.arange(width)[None, :]  # (B, N) position of each query
    keys = mx.arange(length)
    return (keys[None, None, :] <= last[:, :, None])[:, None, :, :]


def forward_batch(
    model: nn.Module, caches: Sequence[Sequence[LayerKV]], inputs: mx.array, fed: Sequence[int]
) -> mx.array:
    """Run each row's tokens on top of its own cache in one pass; (B, N, vocab) logits, lazily.

    `caches[b]` is row b's list of per-layer caches; `inputs` is (B, N) token ids,
    row b's first `fed[b]` of them real (at least one), the rest padding whose
    logits are meaningless.
    """
    starts = [c[0].offset for c in caches]
    mask = batch_mask(starts, fed)
    views = [BatchedLayer([c[i] for c in caches], fed, mask) for i in range(len(caches[0]))]
    return model(inputs, cache=views)


def forward_one(model: nn.Module, cache: Sequence[LayerKV], tokens: Sequence[int]) -> mx.array:
    """`forward_batch` for one row of known tokens: (N, vocab) logits, lazily."""
    return forward_batch(model, [cache], mx.array([list(tokens)]), [len(tokens)])[0]
