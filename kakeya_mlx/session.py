"""A session: an append-only token history and the sink+window cache that follows it.

Everything that touches a session's cache runs on the engine's compute thread.
The cache advances only in canonical blocks aligned to absolute history positions
(see cache.py), so the state after a history does not depend on how that history
was chunked.
"""

import threading
import time
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .batch import forward_one
from .cache import CacheShape, SinkWindowCache
from .rope import RopeSpec


class Session:
    """One conversation: history, cache, and the logits that follow the history."""

    def __init__(self, session_id: str, shape: CacheShape, ropes: list[RopeSpec]):
        self.id = session_id
        self.history: list[int] = []
        self.cache = SinkWindowCache(shape, ropes)
        self.logits: Optional[mx.array] = None  # next-token logits after the processed history
        self.created_at = time.time()
        self.last_used_at = self.created_at
        self.turn = None  # the running turn (the engine's _Turn), set and cleared on the event loop
        self.cancel_requested = threading.Event()
        self.speculation = None  # speculative.Speculation, made by the first turn that drafts
        self.speculative: Optional[str] = None  # this session's default mode, None: the engine's
        self.num_draft_tokens: Optional[int] = None
        # Where the assistant turn opened by the last `messages` append begins in the
        # history; None when the history does not end inside such a turn (see chat.py).
        self.chat_reply_start: Optional[int] = None

    @property
    def pending(self) -> int:
        """History tokens appended but not yet run through the model."""
        return len(self.history) - self.cache.processed

    def reset_cache(self) -> None:
        """Forget the cache; the history stays and is run through the model again when needed.

        Exact, because the cache state after a history is canonical.
        """
        self.cache = SinkWindowCache(self.cache.shape, self.cache.ropes)
        self.logits = None

    @property
    def kv_bytes(self) -> int:
        """Bytes held by this session's caches: its own and its draft model's."""
        draft = self.speculation.draft if self.speculation is not None else None
        return self.cache.nbytes + (draft.cache.nbytes if draft is not None else 0)

    def info(self) -> dict:
        cache, shape = self.cache, self.cache.shape
        return {
            "session_id": self.id,
            "history_length": len(self.history),
            "cache_length": cache.length,
            "pending_tokens": self.pending,
            "evicted_tokens": cache.evicted,
            "kv_bytes": self.kv_bytes,
            "positions": {
                "first": 0,
                "last": cache.length - 1,
                "bound": shape.bound,
                "window_first_history_index": cache.history_position(min(shape.sink, cache.length)),
            },
            "sink": shape.sink,
            "window": shape.window,
            "block": shape.block,
            "generating": self.turn is not None,
            "created_at": self.created_at,
            "last_used_at": self.last_used_at,
        }


def make_room(session: Session) -> int:
    """Commit a full tail before more tokens go in; returns the tokens evicted."""
    cache = session.cache
    if cache.room_in_block() > 0:
        return 0
    return cache.commit_block(session.logits)


def recompute_tail(model: nn.Module, session: Session) -> None:
    """Recompute the uncommitted tail in one pass from the committed state (lazily).

    For backends whose forward pass is not chunk-invariant: afterwards the tail's
    keys, values and the session's logits are what one pass over exactly those
    tokens gives, whatever pieces they arrived in.
    """
    cache = session.cache
    tail = cache.drop_tail()
    if tail:
        session.logits = forward_one(model, cache.layers, tail)[-1:]
        cache.add_tail(tail)


def prefill_piece(model: nn.Module, session: Session, budget: int, recompute: bool) -> tuple[int, int]:
    """Run up to `budget` pending history tokens through the model, one block-aligned piece per pass.

    Returns (tokens processed, tokens evicted). Pieces end at block boundaries,
    so stopping between any two of them leaves the cache canonical.
    """
    cache = session.cache
    done = evicted = 0
    while session.pending and done < budget:
        evicted += make_room(session)
        start = cache.processed
        size = min(session.pending, cache.room_in_block(), budget - done)
        piece = session.history[start : start + size]
        session.logits = forward_one(model, cache.layers, piece)[-1:]
        cache.add_tail(piece)
        done += size
        if recompute and cache.room_in_block() == 0 and cache.tail_pieces > 1:
            recompute_tail(model, session)
        mx.eval(session.logits, cache.arrays())
    return done, evicted
