"""One generate turn of one session, stepped by the scheduler on the compute thread.

A turn first runs the session's pending history through the model (prefill, in
block-aligned pieces the scheduler interleaves with other sessions' decoding),
then decodes: each step the scheduler feeds the turn's next token to the model,
batched with other turns, and hands back the logits that follow it.

Tokens are released only once final (see textstream.py). When a stop string is
found, the tokens that overlap it leave the history and the cache again, and the
text before the stop is re-tokenized into the history, so the history holds
exactly the text that was streamed. A full tail is committed only when more tokens
must go in, so those tokens are normally still in the uncommitted tail; if a
commit had to happen while text was held back, the cache was snapshotted first
and is restored from there.
"""

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn

from .cache import CacheSnapshot
from .events import DoneEvent, TokenEvent, TruncatedEvent
from .sampling import SamplingParams, make_sampler
from .session import Session, make_room, prefill_piece, recompute_tail
from .textstream import TextStream

log = logging.getLogger("kakeya.engine")


@dataclass(frozen=True)
class GenerateRequest:
    """A validated generate call."""

    max_tokens: int
    sampling: SamplingParams
    stop: tuple[str, ...]
    eos_token_ids: frozenset
    started_at: float


class Generation:
    """The state of one turn. `deliver(events)` is called on the compute thread with each step's events."""

    def __init__(
        self,
        session: Session,
        request: GenerateRequest,
        tokenizer,
        deliver: Callable[[list], None],
        recompute: bool,
    ):
        self.session = session
        self.request = request
        self.tokenizer = tokenizer
        self.deliver = deliver
        self.recompute = recompute
        self.stream = TextStream(tokenizer, list(request.stop))
        self.pick = make_sampler(request.sampling)
        self.started = False
        self.finished = False
        self.next_token: Optional[mx.array] = None  # sampled from session.logits, not yet fed
        self.generated: list[int] = []  # fed to the model this turn, in history order
        self.released: list[int] = []  # sent in token events
        self.snapshot: Optional[CacheSnapshot] = None
        self.events: list = []
        self.cached_before = 0
        self.prompt_done = 0
        self.t_prefilled: Optional[float] = None
        self.t_first: Optional[float] = None

    # ---- prefill -----------------------------------------------------------

    @property
    def prefilling(self) -> bool:
        return self.session.pending > 0

    def begin(self) -> None:
        """First step: make the starting state depend on the history alone."""
        session, cache = self.session, self.session.cache
        self.started = True
        if self.recompute and cache.tail_pieces > 1:
            cache.drop_tail()  # it runs again, in one piece with what is pending
            session.logits = None
        if session.logits is None and not session.pending:
            # Nothing left to run, yet no logits: run the last cached token again.
            if cache.tail:
                cache.truncate(cache.processed - 1)
            else:
                session.reset_cache()
        self.cached_before = cache.processed

    def prefill(self, model: nn.Module, budget: int) -> int:
        """Run up to `budget` pending tokens; returns how many ran."""
        done, evicted = prefill_piece(model, self.session, budget, self.recompute)
        self.prompt_done += done
        if evicted:
            self._truncated(evicted)
        return done

    def sample_first(self) -> None:
        """After prefill: pick the first token from the logits that follow the history."""
        self.t_prefilled = time.perf_counter()
        self.next_token = self._pick(self.session.logits)

    def _pick(self, logits: mx.array) -> mx.array:
        context = self.request.sampling.repetition_context
        token = self.pick(logits, self.session.history[-context:])
        mx.async_eval(token)
        return token

    # ---- decoding ----------------------------------------------------------

    def prepare_feed(self) -> mx.array:
        """Make room for the next token (committing a full tail) and return it, lazily."""
        cache = self.session.cache
        if cache.room_in_block() == 0 and self.stream.pending_tokens and self.snapshot is None:
            self.snapshot = cache.snapshot()  # a stop string may still claim tokens in this tail
        evicted = make_room(self.session)
        if evicted:
            self._truncated(evicted)
        return self.next_token

    def accept(self, token_id: int, logits: mx.array, model: nn.Module) -> None:
        """The model has run `token_id` (its keys and values are in the cache); `logits` follow it."""
        session, cache, request = self.session, self.session.cache, self.request
        session.history.append(token_id)
        cache.add_tail([token_id])
        session.logits = logits
        self.generated.append(token_id)
        if self.t_first is None:
            self.t_first = time.perf_counter()
        self.stream.add(token_id)
        if token_id in request.eos_token_ids:
            return self.finish("eos")
        if self.stream.stopped:
            return self.finish("stop_sequence")
        self._release()
        if len(self.generated) >= request.max_tokens:
            return self.finish("max_tokens")
        if self.recompute and cache.room_in_block() == 0 and cache.tail_pieces > 1:
            recompute_tail(model, session)
        self.next_token = self._pick(session.logits)

    def _release(self) -> None:
        for token_id, text in self.stream.take():
            self.released.append(token_id)
            self.events.append(TokenEvent(token_id, text))
        if self.snapshot is not None:
            first_held = len(self.session.history) - self.stream.pending_tokens
            if first_held >= self.session.cache.committed_position:
                self.snapshot = None  # nothing held back lies before the last commit any more

    def _truncated(self, evicted: int) -> None:
        self.events.append(TruncatedEvent(evicted=evicted, total_evicted=self.session.cache.evicted))

    # ---- the end -----------------------------------------------------------

    def finish(self, stop_reason: str, error: Optional[BaseException] = None) -> None:
        """End the turn: settle the history, deliver the last events and the DoneEvent."""
        if self.finished:
            return
        self.finished = True
        if error is None:
            if stop_reason == "stop_sequence":
                self._cut_at_stop()
            else:
                self.stream.flush()
                self._release()
            session = self.session
            mx.eval(session.logits, session.cache.arrays())
            session.cache.check_invariants()
        self.snapshot = None
        self.events.append(self._done(stop_reason, error))
        self.flush_events()

    def _cut_at_stop(self) -> None:
        """Drop the generated tokens that overlap the stop string; re-tokenize the text before it."""
        session, cache = self.session, self.session.cache
        self._release()  # the tokens that end before the stop string
        keep = len(session.history) - len(self.generated) + len(self.released)
        remainder = self.stream.remainder
        extra = list(self.tokenizer.encode(remainder, add_special_tokens=False)) if remainder else []
        if keep < cache.committed_position and self.snapshot is not None:
            cache.restore(self.snapshot)
        if keep < cache.committed_position:
            # The held-back text ran over more than a block: rebuild the cache from the
            # history instead (exact, the cache being canonical; the next turn pays for it).
            log.info("session %s: stop string reached back past a committed block; rebuilding its cache", session.id)
            session.reset_cache()
        else:
            cut = min(keep, cache.processed)
            if cut > cache.committed_position and not extra:
                cut -= 1  # the next turn recomputes the logits that follow the last kept token
            cache.truncate(cut)
            session.logits = None if cut < keep or extra else cache.boundary_logits
        del session.history[keep:]
        session.history.extend(extra)
        self.generated = self.generated[: len(self.released)] + extra
        text = self.stream.text
        for i, token_id in enumerate(extra):
            piece = self.tokenizer.decode(self.released + extra[: i + 1], skip_special_tokens=True)
            self.events.append(TokenEvent(token_id, piece[len(text) :]))
            text = piece
        self.released += extra

    def _done(self, stop_reason: str, error: Optional[BaseException]) -> DoneEvent:
        t_end = time.perf_counter()
        started = self.request.started_at
        t_first = self.t_first or t_end
        prefill_s = (self.t_prefilled or t_end) - started
        decode_s = t_end - t_first
        prompt, generated = self.prompt_done, len(self.generated)
        done = DoneEvent(
            stop_reason=stop_reason,
            prompt_tokens=prompt,
            generated_tokens=generated,
            cached_tokens=self.cached_before,
            ttft_s=t_first - started,
            prefill_tokens_per_s=prompt / prefill_s if prompt and prefill_s > 0 else 0.0,
            decode_tokens_per_s=(generated - 1) / decode_s if generated > 1 and decode_s > 0 else 0.0,
            total_s=t_end - started,
            text=self.tokenizer.decode(self.released, skip_special_tokens=True) if self.released else "",
            token_ids=list(self.released),
        )
        if error is not None:
            done = dataclasses.replace(
                done, stop_reason="error", error_code="internal", error_message=f"{type(error).__name__}: {error}"
            )
        return done

    def flush_events(self) -> None:
        if self.events:
            events, self.events = self.events, []
            self.deliver(events)
