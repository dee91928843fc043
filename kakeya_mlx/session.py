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


# The name of the model's cache among a stored session's cache groups; a second
# model that follows the same history (a speculative drafter) gets a group of its own.
MAIN_GROUP = "main"


class Session:
    """One conversation: history, cache, and the logits that follow the history."""

    def __init__(self, session_id: str, shape: CacheShape, ropes: list[RopeSpec]):
        self.id = session_id
        self.history: list[int] = []
        self.cache = SinkWindowCache(shape, ropes)
        self.logits: Optional[mx.array] = None  # next-token logits after the processed history
        self.created_at = time.time()
        self.last_used_at = self.created_at
        self.turn = None  # the running turn (the engine's turn.TurnState), set and cleared on the event loop
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

    def state(self) -> tuple[dict, dict[str, mx.array]]:
        """The session as JSON-able metadata and named arrays, everything a later turn depends on.

        Arrays: "history" (uint32), and per cache group "<group>/..." (the cache's
        own arrays, and "<group>/logits", the logits after the processed history,
        so continuing needs no forward pass). Not state: the running turn, and the
        speculative drafters' caches and statistics, which only make decoding faster
        (a restored session's drafters start over from its history).
        """
        cache_meta, cache_arrays = self.cache.state()
        arrays = {"history": mx.array(self.history, dtype=mx.uint32)}
        arrays.update({f"{MAIN_GROUP}/{name}": a for name, a in cache_arrays.items()})
        if self.logits is not None:
            arrays[f"{MAIN_GROUP}/logits"] = self.logits
        meta = {
            "id": self.id,
            "created_at": self.created_at,
            "last_used_at": self.last_used_at,
            "speculative": self.speculative,
            "num_draft_tokens": self.num_draft_tokens,
            "chat_reply_start": self.chat_reply_start,
            "groups": {MAIN_GROUP: cache_meta},
        }
        return meta, arrays

    @classmethod
    def from_state(
        cls, session_id: str, shape: CacheShape, ropes: list[RopeSpec], meta: dict, arrays: dict
    ) -> "Session":
        """Rebuild a session from `state()`'s output under `session_id`; ValueError names what is wrong."""
        groups = meta.get("groups")
        if not isinstance(groups, dict) or set(groups) != {MAIN_GROUP}:
            raise ValueError(f"cache groups {sorted(groups) if isinstance(groups, dict) else groups!r}, "
                             f"this engine keeps only {MAIN_GROUP!r}")
        arrays = dict(arrays)
        history = arrays.pop("history", None)
        if history is None or history.ndim != 1 or history.dtype != mx.uint32:
            raise ValueError("history is missing or not a 1-d uint32 array")
        prefix = f"{MAIN_GROUP}/"
        group = {name[len(prefix) :]: arrays.pop(name) for name in list(arrays) if name.startswith(prefix)}
        if arrays:
            raise ValueError(f"unexpected arrays {sorted(arrays)}")
        logits = group.pop("logits", None)
        session = cls(session_id, shape, ropes)
        session.history = history.tolist()
        session.cache = cache = SinkWindowCache.from_state(shape, ropes, groups[MAIN_GROUP], group)
        if cache.processed > len(session.history):
            raise ValueError(f"{cache.processed} tokens processed of a {len(session.history)}-token history")
        if any(t != session.history[cache.history_position(i)] for i, t in enumerate(cache.token_ids)):
            raise ValueError("the cached tokens are not the history's tokens at their positions")
        if logits is not None and (cache.processed == 0 or logits.ndim != 2 or logits.shape[0] != 1):
            raise ValueError(f"logits of shape {logits.shape} after {cache.processed} processed tokens")
        session.logits = logits
        for key in ("created_at", "last_used_at"):
            if not isinstance(meta.get(key), (int, float)) or isinstance(meta.get(key), bool):
                raise ValueError(f"{key}={meta.get(key)!r} is not a time")
        session.created_at, session.last_used_at = float(meta["created_at"]), float(meta["last_used_at"])
        speculative, num_draft_tokens, reply_start = (meta.get(k) for k in ("speculative", "num_draft_tokens", "chat_reply_start"))
        if speculative is not None and not isinstance(speculative, str):
            raise ValueError(f"speculative={speculative!r}")
        if num_draft_tokens is not None and not (_is_int(num_draft_tokens) and num_draft_tokens >= 1):
            raise ValueError(f"num_draft_tokens={num_draft_tokens!r}")
        if reply_start is not None and not (_is_int(reply_start) and 0 <= reply_start <= len(session.history)):
            raise ValueError(f"chat_reply_start={reply_start!r} in a {len(session.history)}-token history")
        session.speculative, session.num_draft_tokens, session.chat_reply_start = speculative, num_draft_tokens, reply_start
        return session

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


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


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
