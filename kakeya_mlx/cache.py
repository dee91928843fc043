"""The bounded "attention sink + sliding window" KV cache of one session.

The cache keeps the first `sink` tokens of a history and its most recent tokens:
a committed part of at most `sink + window` tokens, advanced only in whole blocks
of `block` tokens aligned to absolute history positions, and an uncommitted tail
of at most `block` tokens computed on top of it. Positions are cache-relative
(StreamingLLM): a token's RoPE position is its index in the cache, so no position
ever reaches `sink + window + block`. A full tail is committed only when more
tokens must go in; when that pushes the committed part past `sink + window`, the
oldest window tokens are evicted and the survivors' keys are re-rotated down by
the number evicted (see `rope.RopeSpec.shift`). Until then the tail can still be
cut back, which is how a turn drops tokens it generated past a stop string.
"""

from dataclasses import dataclass, field
from typing import Optional

import mlx.core as mx
from mlx_lm.models.cache import create_attention_mask

from .rope import RopeSpec

# What a stored cache means: float32 keys rotated to cache-relative positions,
# values in the model's dtype, and the bookkeeping of `SinkWindowCache.state`.
# Bump it whenever any of that changes, so older stored sessions are refused.
LAYOUT_VERSION = 1


@dataclass(frozen=True)
class CacheShape:
    """Sizes of a sink+window cache, in tokens."""

    sink: int
    window: int
    block: int

    @property
    def committed_limit(self) -> int:
        return self.sink + self.window

    @property
    def bound(self) -> int:
        """No cache-relative position reaches this."""
        return self.sink + self.window + self.block


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, value_itemsize: int) -> int:
    """Bytes one cached token takes over all layers: float32 keys plus values in the model's dtype."""
    return num_layers * num_kv_heads * head_dim * (mx.float32.size + value_itemsize)


class LayerKV:
    """One layer's keys and values, behind the interface mlx-lm's attention calls.

    Buffers grow in steps of one block up to the cache's bound and are written in
    place, like mlx-lm's own `KVCache`, so live bytes stop growing once the window
    is full. Keys are stored in float32 whatever the model computes in: a window
    key is re-rotated once per eviction for as long as it survives, and rounding
    each turn to bfloat16 would add up (linearly: ~10% of the key scale after 64
    turns); in float32 the key is rounded to the model's dtype once, when read.
    """

    def __init__(self, capacity: int, step: int):
        self.capacity = capacity
        self.step = step
        self.keys = None
        self.values = None
        self.offset = 0

    def _reserve(self, needed: int, keys: mx.array, values: mx.array) -> None:
        if self.keys is not None and needed <= self.keys.shape[2]:
            return
        if needed > self.capacity:
            raise RuntimeError(f"cache position {needed} would pass the bound {self.capacity}")
        size = min(self.capacity, -(-needed // self.step) * self.step)
        B, H, _, Dk = keys.shape
        new_k = mx.zeros((B, H, size, Dk), mx.float32)
        new_v = mx.zeros((B, H, size, values.shape[3]), values.dtype)
        if self.keys is not None:
            new_k[..., : self.offset, :] = self.keys[..., : self.offset, :]
            new_v[..., : self.offset, :] = self.values[..., : self.offset, :]
        self.keys, self.values = new_k, new_v

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        start = self.offset
        self._reserve(start + keys.shape[2], keys, values)
        self.offset = start + keys.shape[2]
        self.keys[..., start : self.offset, :] = keys
        self.values[..., start : self.offset, :] = values
        return self.keys[..., : self.offset, :].astype(values.dtype), self.values[..., : self.offset, :]

    def make_mask(self, N: int, return_array: bool = False, window_size=None):
        return create_attention_mask(N, self.offset, return_array, window_size)

    def evict(self, sink: int, count: int, rope: RopeSpec) -> None:
        """Drop `count` tokens after the sink; turn the survivors' keys down by `count`."""
        end = self.offset
        survivors_k = rope.shift(self.keys[..., sink + count : end, :], -count)
        survivors_v = self.values[..., sink + count : end, :]
        self.keys[..., sink : end - count, :] = survivors_k
        self.values[..., sink : end - count, :] = survivors_v
        self.offset = end - count

    def arrays(self) -> list:
        return [] if self.keys is None else [self.keys, self.values]

    def load(self, keys: mx.array, values: mx.array) -> None:
        """Start over from stored keys (float32) and values, as if written by `update_and_fetch`."""
        self.keys = self.values = None
        self.offset = 0
        self._reserve(keys.shape[2], keys, values)
        self.offset = keys.shape[2]
        self.keys[..., : self.offset, :] = keys
        self.values[..., : self.offset, :] = values

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes

    def frozen(self) -> tuple:
        """(keys, values, offset) as they are now; later in-place writes copy instead of overwriting them."""
        if self.keys is None:
            return None, None, self.offset
        keys, values = self.keys[:], self.values[:]
        mx.eval(keys, values)
        return keys, values, self.offset

    def thaw(self, state: tuple) -> None:
        self.keys, self.values, self.offset = state


@dataclass
class CacheSnapshot:
    """A cache's state at one moment, restorable exactly (see `SinkWindowCache.snapshot`)."""

    layers: list
    token_ids: list[int]
    committed: int
    evicted: int
    tail_pieces: int
    boundary_logits: Optional[mx.array] = field(default=None, repr=False)

    @property
    def processed(self) -> int:
        return self.evicted + len(self.token_ids)

    @property
    def committed_position(self) -> int:
        """History position where the snapshot's uncommitted tail starts."""
        return self.evicted + self.committed


class SinkWindowCache:
    """A session's cache: one `LayerKV` per layer plus the token bookkeeping.

    `token_ids` lists the cached tokens in cache order; a cached token at index i
    came from history position i if i < sink, else i + evicted.
    """

    def __init__(self, shape: CacheShape, ropes: list[RopeSpec]):
        self.shape = shape
        self.ropes = ropes
        self.layers = [LayerKV(shape.bound, shape.block) for _ in ropes]
        self.token_ids: list[int] = []
        self.committed = 0
        self.evicted = 0
        # Forward passes that wrote the current tail: 1 means it was computed in one
        # piece, which is what backends whose forward is not chunk-invariant need.
        self.tail_pieces = 0
        # Next-token logits after the last committed token: what a turn needs when
        # it cuts the history back to exactly a block boundary.
        self.boundary_logits: Optional[mx.array] = None

    @property
    def length(self) -> int:
        return len(self.token_ids)

    @property
    def tail(self) -> int:
        """Tokens computed on top of the committed part, not yet a whole block."""
        return self.length - self.committed

    @property
    def processed(self) -> int:
        """History tokens that have gone through the cache, evicted ones included."""
        return self.evicted + self.length

    @property
    def committed_position(self) -> int:
        """History position where the uncommitted tail starts."""
        return self.evicted + self.committed

    def room_in_block(self) -> int:
        return self.shape.block - self.tail

    def add_tail(self, token_ids: list[int], pieces: int = 1) -> None:
        """Record tokens whose keys and values the model just wrote to every layer, in `pieces` passes."""
        self.token_ids.extend(token_ids)
        self.tail_pieces += pieces
        if self.tail > self.shape.block:
            raise RuntimeError("the uncommitted tail outgrew its block")

    def drop_tail(self) -> list[int]:
        """Forget the uncommitted tail (its keys are overwritten next); return its ids."""
        return self.truncate(self.committed_position)

    def truncate(self, position: int) -> list[int]:
        """Cut the cache back to the history prefix [0, position); only tail tokens can go. Returns their ids."""
        index = position - self.evicted
        if not self.committed <= index <= self.length:
            raise RuntimeError(
                f"cannot cut the cache back to history position {position}: only the tail "
                f"[{self.committed_position}, {self.processed}) is uncommitted"
            )
        dropped = self.token_ids[index:]
        del self.token_ids[index:]
        for layer in self.layers:
            layer.offset = index
        if dropped and index > self.committed:
            self.tail_pieces = max(self.tail_pieces, 2)  # what is left was computed with what went
        elif index == self.committed:
            self.tail_pieces = 0
        return dropped

    def snapshot(self) -> CacheSnapshot:
        """The state now; `restore` brings it back bit for bit even after commits and evictions."""
        return CacheSnapshot(
            layers=[layer.frozen() for layer in self.layers],
            token_ids=list(self.token_ids),
            committed=self.committed,
            evicted=self.evicted,
            tail_pieces=self.tail_pieces,
            boundary_logits=self.boundary_logits,
        )

    def restore(self, snap: CacheSnapshot) -> None:
        for layer, state in zip(self.layers, snap.layers):
            layer.thaw(state)
        self.token_ids = list(snap.token_ids)
        self.committed, self.evicted = snap.committed, snap.evicted
        self.tail_pieces, self.boundary_logits = snap.tail_pieces, snap.boundary_logits

    def commit_block(self, logits: Optional[mx.array] = None) -> int:
        """Commit a full tail as a block; evict down to sink + window. Returns tokens evicted.

        `logits` are the next-token logits after the block's last token, kept as
        `boundary_logits`.
        """
        if self.tail != self.shape.block:
            raise RuntimeError("only a whole block can be committed")
        self.boundary_logits = logits
        self.tail_pieces = 0
        self.committed = self.length
        excess = self.committed - self.shape.committed_limit
        if excess <= 0:
            return 0
        sink = self.shape.sink
        for layer, rope in zip(self.layers, self.ropes):
            layer.evict(sink, excess, rope)
        del self.token_ids[sink : sink + excess]
        self.committed -= excess
        self.evicted += excess
        return excess

    def arrays(self) -> list:
        return [a for layer in self.layers for a in layer.arrays()]

    @property
    def nbytes(self) -> int:
        """Bytes held by the live key and value arrays of every layer."""
        return sum(layer.nbytes for layer in self.layers)

    def state(self) -> tuple[dict, dict[str, mx.array]]:
        """The bookkeeping as JSON-able values and the live arrays by name (lazy slices, no copy)."""
        meta = {
            "layout": LAYOUT_VERSION,
            "sink": self.shape.sink,
            "window": self.shape.window,
            "block": self.shape.block,
            "layers": len(self.layers),
            "committed": self.committed,
            "evicted": self.evicted,
            "tail_pieces": self.tail_pieces,
        }
        arrays = {"token_ids": mx.array(self.token_ids, dtype=mx.uint32)}
        if self.boundary_logits is not None:
            arrays["boundary_logits"] = self.boundary_logits
        for i, layer in enumerate(self.layers):
            if layer.offset:
                arrays[f"layers.{i}.keys"] = layer.keys[..., : layer.offset, :]
                arrays[f"layers.{i}.values"] = layer.values[..., : layer.offset, :]
        return meta, arrays

    @classmethod
    def from_state(cls, shape: CacheShape, ropes: list[RopeSpec], meta: dict, arrays: dict) -> "SinkWindowCache":
        """Rebuild a cache from what `state()` returned; ValueError names the first inconsistency.

        Every array name must be consumed and every invariant hold, so a damaged or
        foreign state is refused rather than loaded.
        """
        if meta.get("layout") != LAYOUT_VERSION:
            raise ValueError(f"cache layout {meta.get('layout')!r}, this engine reads layout {LAYOUT_VERSION}")
        stored = tuple(meta.get(k) for k in ("sink", "window", "block"))
        expected = (shape.sink, shape.window, shape.block)
        if stored != expected:
            raise ValueError(f"cache shape (sink, window, block) {stored}, this engine's is {expected}")
        if meta.get("layers") != len(ropes):
            raise ValueError(f"{meta.get('layers')!r} cache layers, the model has {len(ropes)}")
        for key in ("committed", "evicted", "tail_pieces"):
            if not _is_count(meta.get(key)):
                raise ValueError(f"{key}={meta.get(key)!r} is not a count")
        arrays = dict(arrays)
        token_ids = arrays.pop("token_ids", None)
        if token_ids is None or token_ids.ndim != 1 or token_ids.dtype != mx.uint32:
            raise ValueError("token_ids is missing or not a 1-d uint32 array")
        cache = cls(shape, ropes)
        cache.token_ids = token_ids.tolist()
        cache.committed, cache.evicted, cache.tail_pieces = meta["committed"], meta["evicted"], meta["tail_pieces"]
        cache.boundary_logits = arrays.pop("boundary_logits", None)
        if cache.boundary_logits is not None and (cache.boundary_logits.ndim != 2 or cache.boundary_logits.shape[0] != 1):
            raise ValueError(f"boundary logits of shape {cache.boundary_logits.shape}, expected (1, vocab)")
        length = cache.length
        first = None
        for i, layer in enumerate(cache.layers):
            keys, values = arrays.pop(f"layers.{i}.keys", None), arrays.pop(f"layers.{i}.values", None)
            if length == 0:
                if keys is not None or values is not None:
                    raise ValueError(f"layer {i} holds keys or values for an empty cache")
                continue
            if keys is None or values is None:
                raise ValueError(f"layer {i} has no keys or values")
            if keys.ndim != 4 or values.ndim != 4 or keys.shape[0] != 1 or keys.shape[2] != length:
                raise ValueError(f"layer {i} keys {keys.shape} do not hold {length} positions of one sequence")
            if keys.dtype != mx.float32 or keys.shape[:3] != values.shape[:3]:
                raise ValueError(f"layer {i}: keys {keys.shape} {keys.dtype}, values {values.shape} {values.dtype}")
            described = (keys.shape, values.shape, values.dtype)
            if first is not None and described != first:
                raise ValueError(f"layer {i} arrays {described} differ from layer 0's {first}")
            first = described
            layer.load(keys, values)
        if arrays:
            raise ValueError(f"unexpected arrays {sorted(arrays)}")
        try:
            cache.check_invariants()
        except AssertionError as exc:
            raise ValueError(str(exc)) from None
        if cache.committed > length:
            raise ValueError(f"{cache.committed} tokens committed of {length} cached")
        if cache.evicted and cache.committed != shape.committed_limit:
            raise ValueError(f"{cache.evicted} tokens evicted but only {cache.committed} committed")
        return cache

    def history_position(self, index: int) -> int:
        return index if index < self.shape.sink else index + self.evicted

    def check_invariants(self) -> None:
        """INV-1 (token list matches K/V length on every layer) and INV-2 (positions bounded)."""
        for i, layer in enumerate(self.layers):
            if layer.offset != self.length:
                raise AssertionError(
                    f"INV-1: layer {i} holds {layer.offset} positions for {self.length} tokens"
                )
        if self.length > self.shape.bound:
            raise AssertionError(f"INV-2: {self.length} positions pass the bound {self.shape.bound}")
        if self.committed > self.shape.committed_limit or self.tail > self.shape.block:
            raise AssertionError(
                f"INV-2: committed {self.committed} / tail {self.tail} exceed sink+window / block"
            )


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
