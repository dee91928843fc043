"""The scheduler: what the compute thread does in one step.

Each step puts every decoding turn through the model in one batched forward pass
(up to `decode_batch_size` rows; more take turns), and runs one turn's pending
prompt for up to `prefill_step_tokens` tokens, so a long prompt delays other
sessions' next tokens by at most one such piece. Turns join at any step and leave
as soon as they finish or are cancelled.

A turn's own failure (its sampler, its bookkeeping) ends that turn alone with an
error; a failure of the batched forward pass ends the turns in that batch, whose
caches are then rebuilt from their histories (exact: the cache is canonical).
"""

import logging
from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .batch import forward_batch
from .decode import Generation

log = logging.getLogger("kakeya.engine")


@dataclass(frozen=True)
class SchedulerConfig:
    """How a step is filled."""

    decode_batch_size: int = 16
    prefill_step_tokens: int = 256


class Scheduler:
    """The turns the compute thread is running, and how to advance them by one step."""

    def __init__(self, model: nn.Module, config: SchedulerConfig):
        self.model = model
        self.config = config
        self.turns: list[Generation] = []
        self._next_decode = 0
        self._next_prefill = 0
        # Read by the engine's stats (from another thread: plain ints, updated in place).
        self.counters = {"steps": 0, "decode_passes": 0, "decode_rows": 0, "largest_batch": 0, "prefill_tokens": 0}

    def add(self, turn: Generation) -> None:
        self.turns.append(turn)

    @property
    def busy(self) -> bool:
        return bool(self.turns)

    def step(self) -> None:
        """Advance every turn by one step."""
        self.counters["steps"] += 1
        for turn in self.turns:
            self._guard(turn, self._start_or_cancel, turn)
        live = [t for t in self.turns if not t.finished]
        decoding = [t for t in live if t.next_token is not None]
        prefilling = [t for t in live if t.next_token is None]
        if decoding:
            self._decode(self._take(decoding, "_next_decode", self.config.decode_batch_size))
        if prefilling:
            turn = self._take(prefilling, "_next_prefill", 1)[0]
            self._guard(turn, self._prefill, turn)
        for turn in self.turns:
            turn.flush_events()
        self.turns = [t for t in self.turns if not t.finished]

    def end_all(self, error: Optional[BaseException] = None) -> None:
        """End every turn now: cancelled (the compute thread is stopping), or failed with `error`."""
        for turn in self.turns:
            if error is not None:
                turn.session.reset_cache()
            self._guard(turn, turn.finish, "error" if error else "cancelled", error)
        self.turns = []

    # ---- parts of a step ---------------------------------------------------

    def _take(self, turns: list, cursor: str, n: int) -> list:
        """Up to n turns, starting where the last step left off, so every turn gets its share."""
        if len(turns) <= n:
            return turns
        start = getattr(self, cursor) % len(turns)
        setattr(self, cursor, start + n)
        return (turns[start:] + turns[:start])[:n]

    def _start_or_cancel(self, turn: Generation) -> None:
        if turn.session.cancel_requested.is_set():
            turn.finish("cancelled")
        elif not turn.started:
            turn.begin()
            if not turn.prefilling:
                turn.sample_first()

    def _prefill(self, turn: Generation) -> None:
        self.counters["prefill_tokens"] += turn.prefill(self.model, self.config.prefill_step_tokens)
        if not turn.prefilling:
            turn.sample_first()

    def _decode(self, turns: list[Generation]) -> None:
        alone = len(turns) == 1
        ready = []
        for turn in turns:
            self._guard(turn, turn.make_room)
            if not turn.finished:
                self._guard(turn, turn.plan, self.model, alone)
            if not turn.finished:
                ready.append(turn)
        plain = [t for t in ready if not t.drafts]
        drafting = [t for t in ready if t.drafts]
        if plain:
            self._forward(plain, self._plain_pass)
        if drafting:
            self._forward(drafting, self._draft_pass)

    def _forward(self, turns: list[Generation], run) -> None:
        counters = self.counters
        counters["decode_passes"] += 1
        counters["decode_rows"] += len(turns)
        counters["largest_batch"] = max(counters["largest_batch"], len(turns))
        try:
            takes = run(turns)
        except Exception as exc:
            log.error("a batched forward pass of %d turn(s) failed", len(turns), exc_info=exc)
            for turn in turns:
                turn.session.reset_cache()
                turn.finish("error", exc)
            return
        for turn, take in zip(turns, takes):
            self._guard(turn, *take)

    def _plain_pass(self, turns: list[Generation]) -> list:
        """Every turn's next token in one pass, read back with one host sync."""
        tokens = mx.concatenate([t.next_token for t in turns])
        caches = [t.session.cache.layers for t in turns]
        logits = forward_batch(self.model, caches, tokens[:, None], [1] * len(turns))
        mx.async_eval(tokens, logits)
        ids = tokens.tolist()
        return [(t.take_plain, ids[b], logits[b, -1:], self.model) for b, t in enumerate(turns)]

    def _draft_pass(self, turns: list[Generation]) -> list:
        """Every drafting turn's next token and drafts in one pass, right-padded to the longest."""
        rows = [[t.next_token.item(), *t.drafts] for t in turns]
        fed = [len(r) for r in rows]
        width = max(fed)
        inputs = mx.array([r + [0] * (width - len(r)) for r in rows])
        caches = [t.session.cache.layers for t in turns]
        logits = forward_batch(self.model, caches, inputs, fed)
        return [(t.take, logits[b, : fed[b]], self.model) for b, t in enumerate(turns)]

    def _guard(self, turn: Generation, fn, *args):
        """Run one turn's part of the step; a failure ends that turn alone."""
        try:
            return fn(*args)
        except Exception as exc:
            log.error("session %s: generation failed", turn.session.id, exc_info=exc)
            turn.session.reset_cache()
            turn.finish("error", exc)
            return None
