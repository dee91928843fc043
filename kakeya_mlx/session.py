"""A session: an append-only token history and the sink+window cache that follows it.

Everything here runs on the engine's compute thread. The cache advances only in
canonical blocks aligned to absolute history positions (see cache.py), so the
state after a history does not depend on how that history was chunked.
"""

import threading
import time
from dataclasses import dataclass
from typing import Iterator, Optional, Union

import mlx.core as mx
import mlx.nn as nn

from .cache import CacheShape, SinkWindowCache
from .events import DoneEvent, TokenEvent, TruncatedEvent
from .rope import RopeSpec
from .sampling import SamplingParams, make_sampler
from .textstream import TextStream


@dataclass(frozen=True)
class GenerateRequest:
    """A validated generate call."""

    max_tokens: int
    sampling: SamplingParams
    stop: tuple[str, ...]
    eos_token_ids: frozenset
    started_at: float


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
        # Where the assistant turn opened by the last `messages` append begins in the
        # history; None when the history does not end inside such a turn (see chat.py).
        self.chat_reply_start: Optional[int] = None

    @property
    def pending(self) -> int:
        """History tokens appended but not yet run through the model."""
        return len(self.history) - self.cache.processed

    def info(self) -> dict:
        cache, shape = self.cache, self.cache.shape
        return {
            "session_id": self.id,
            "history_length": len(self.history),
            "cached_tokens": cache.length,
            "pending_tokens": self.pending,
            "evicted_tokens": cache.evicted,
            "kv_bytes": cache.nbytes,
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


def _forward(model: nn.Module, session: Session, tokens: Union[list[int], mx.array]) -> mx.array:
    """Run tokens on top of the cache; return the logits after the last one (lazy)."""
    inputs = tokens if isinstance(tokens, mx.array) else mx.array(tokens)[None]
    return model(inputs, cache=session.cache.layers)[:, -1, :]


def _complete_block(model: nn.Module, session: Session, recompute: bool) -> int:
    """Commit a full tail, first recomputing it as one block if asked. Returns tokens evicted."""
    if recompute:
        block = session.cache.drop_tail()
        session.logits = _forward(model, session, block)
        session.cache.add_tail(block)
    return session.cache.commit_block()


def advance(model: nn.Module, session: Session, recompute: bool) -> Iterator[int]:
    """Run the pending history through the model in block-aligned pieces.

    Yields the number of tokens evicted after each piece, so a scheduler can
    interleave other work between pieces of a long prompt.
    """
    cache = session.cache
    while session.pending:
        start = cache.processed
        piece = session.history[start : start + min(session.pending, cache.room_in_block())]
        session.logits = _forward(model, session, piece)
        cache.add_tail(piece)
        evicted = _complete_block(model, session, recompute) if cache.room_in_block() == 0 else 0
        mx.eval(session.logits, cache.arrays())
        yield evicted


def generate(
    model: nn.Module,
    tokenizer,
    session: Session,
    request: GenerateRequest,
    recompute: bool,
) -> Iterator[Union[TokenEvent, TruncatedEvent, DoneEvent, None]]:
    """Prefill what is pending, then decode; one yielded item per scheduling step.

    Yields None between prefill pieces, a TokenEvent per token, a TruncatedEvent
    whenever the window slides, and always ends with a DoneEvent. The next step
    is queued before the current token is read back, as mlx-lm does, so the host
    waits on the device once per token.
    """
    cache = session.cache
    cached_before = cache.processed
    pending_before = session.pending
    stream = TextStream(tokenizer, list(request.stop))
    pick = make_sampler(request.sampling)
    context = request.sampling.repetition_context
    generated: list[int] = []
    stop_reason = "max_tokens"
    t_first = None

    def truncated(evicted: int) -> TruncatedEvent:
        return TruncatedEvent(evicted=evicted, total_evicted=cache.evicted)

    for evicted in advance(model, session, recompute):
        yield truncated(evicted) if evicted else None
        # Pieces are whole blocks or tail, so stopping between them leaves the
        # cache canonical; the rest of the prompt stays pending for the next turn.
        if session.cancel_requested.is_set():
            break
    t_prefilled = time.perf_counter()

    token = pick(session.logits, session.history[-context:]) if not session.pending else None
    for step in range(request.max_tokens):
        if session.cancel_requested.is_set():
            stop_reason = "cancelled"
            break
        # Queue the forward pass of this token before reading its value back.
        next_logits = _forward(model, session, token[None])
        mx.async_eval(token, next_logits)
        token_id = token.item()
        session.history.append(token_id)
        cache.add_tail([token_id])
        session.logits = next_logits
        if cache.room_in_block() == 0:
            evicted = _complete_block(model, session, recompute)
            if evicted:
                yield truncated(evicted)
        generated.append(token_id)
        if t_first is None:
            t_first = time.perf_counter()
        if token_id in request.eos_token_ids:
            yield TokenEvent(token_id, stream.flush())
            stop_reason = "eos"
            break
        text = stream.add(token_id)
        if stream.stopped:
            yield TokenEvent(token_id, text)
            stop_reason = "stop_sequence"
            break
        if step + 1 == request.max_tokens:
            yield TokenEvent(token_id, text + stream.flush())
            break
        token = pick(session.logits, session.history[-context:])
        mx.async_eval(token)
        yield TokenEvent(token_id, text)
    mx.eval(session.logits, cache.arrays())
    cache.check_invariants()

    t_end = time.perf_counter()
    t_first = t_first or t_end
    prefill_s = t_prefilled - request.started_at
    decode_s = t_end - t_first
    prompt_tokens = pending_before - session.pending
    yield DoneEvent(
        stop_reason=stop_reason,
        prompt_tokens=prompt_tokens,
        generated_tokens=len(generated),
        cached_tokens=cached_before,
        ttft_s=t_first - request.started_at,
        prefill_tokens_per_s=prompt_tokens / prefill_s if prompt_tokens and prefill_s > 0 else 0.0,
        decode_tokens_per_s=(len(generated) - 1) / decode_s if len(generated) > 1 and decode_s > 0 else 0.0,
        total_s=t_end - request.started_at,
        text=stream.text,
        token_ids=generated,
    )
