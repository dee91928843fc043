"""A turn: one generate on either front, from acceptance to its end, and its settings.

The core opens turns (`DaemonCore.open_turn`); a front starts one, iterates its
events and closes it. Its end is an awaitable event (`ended()`), reached when the
engine lets go of the session, or at once for a turn cancelled before it started.
"""

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Optional, Union

from kakeya_mlx.constrain import Constraint
from kakeya_mlx.turn import TurnStream
from kakeya_mlx.events import DoneEvent
from kakeya_mlx.sampling import SamplingParams
from kakeya_protocol import params as rules

from .admission import Refusal
from .registry import Lease

if TYPE_CHECKING:
    from .core import DaemonCore

log = logging.getLogger("kakeya.daemon")


@dataclass(frozen=True)
class GenerationRequest:
    """A generate's settings after the shared rules (kakeya_protocol.params) applied their defaults."""

    max_tokens: int
    sampling: SamplingParams
    stop: tuple[str, ...]
    speculative: Optional[str] = None  # None: the session's default, else the daemon's
    num_draft_tokens: Optional[int] = None
    # A constraint spec (compiled when the turn starts; errors name `constraint_field`), or one compiled already.
    constraint: Union[Mapping, Constraint, None] = None
    constraint_field: str = "constraint"
    logprobs: bool = False
    top_logprobs: int = 0

    @classmethod
    def from_params(
        cls, params: Mapping, max_new_tokens: int, sampling_defaults: Optional[Mapping] = None, **extra
    ) -> "GenerationRequest":
        """From checked wire-style params (max_tokens, temperature, ..., stop, speculative, num_draft_tokens,
        constraint, logprobs, top_logprobs); absent or None takes the default. `extra` sets the other fields.

        Sampling follows `rules.resolve_sampling`: the request's fields, else `sampling_defaults`
        (the model's and the documented ones, see DaemonCore), else the engine's (off).
        """
        max_tokens = params.get("max_tokens")
        sampling = rules.resolve_sampling(dict(params), dict(sampling_defaults or {}))
        top_logprobs = params.get("top_logprobs")
        fields = {
            "speculative": params.get("speculative"),
            "num_draft_tokens": params.get("num_draft_tokens"),
            "constraint": params.get("constraint"),
            "logprobs": bool(params.get("logprobs")),
            "top_logprobs": top_logprobs if top_logprobs is not None else rules.RULES["top_logprobs"].default,
            **extra,
        }
        return cls(
            max_tokens if max_tokens is not None else rules.default_max_tokens(max_new_tokens),
            SamplingParams(**sampling),
            tuple(params.get("stop") or ()),
            **fields,
        )


class Turn:
    """One generate on either front, from acceptance to its end. Iterate it for the engine's events.

    `start()` waits for a cancelled earlier turn of the session to end, for a
    stored session to be restored (`restored` then holds the reply's map), for
    memory room and for a generation slot; `cancel()` works at any point; `ended()`
    returns once the engine has let go of the session (or the turn never started),
    and `done` then holds its DoneEvent. `close()` is cancel plus wait.
    """

    def __init__(self, core: "DaemonCore", lease: Lease, request: GenerationRequest, after: Optional["Turn"]):
        self.core = core
        self.lease = lease
        self.session_id = lease.entry.id
        self.request = request
        self.stream: Optional[TurnStream] = None
        self.done: Optional[DoneEvent] = None
        self.restored: Optional[dict] = None
        self.cancelled = False
        self._after = after
        self._cancel_requested = asyncio.Event()
        self._ended = asyncio.Event()
        self._has_slot = False
        self._replayed = False

    async def start(self) -> bool:
        """Begin generating; False when cancelled first (`done` is then a "cancelled" DoneEvent with zero counts).

        Raises the engine's or the admission's error when the turn cannot start.
        """
        core = self.core
        try:
            r = self.request
            constraint = r.constraint
            if constraint is not None and not isinstance(constraint, Constraint):
                constraint = await core.engine.compile_constraint(dict(constraint), r.constraint_field)
            after = self._after
            if after is not None and not after.is_ended and not await self._unless_cancelled(after.ended()):
                return self._end_unstarted()
            if self.cancelled:
                return self._end_unstarted()
            self.restored = await core.ensure_resident(self.lease.entry)
            if self.cancelled:
                return self._end_unstarted()
            await core.make_room_for_turn(self.lease.entry)
            admission = core.admission
            if not admission.try_acquire() and not await self._unless_cancelled(admission.wait(admission.enqueue())):
                return self._end_unstarted()
            self._has_slot = True
            if self.cancelled or core.stopping:
                return self._end_unstarted()
            self.stream = core.engine.generate(
                self.session_id,
                max_tokens=r.max_tokens,
                sampling=r.sampling,
                stop=list(r.stop),
                constraint=constraint,
                logprobs=r.logprobs,
                top_logprobs=r.top_logprobs,
                speculative=r.speculative,
                num_draft_tokens=r.num_draft_tokens,
            )
        except Refusal as refusal:
            core.counters.rejections[refusal.limit] += 1
            self._finish(None)
            raise
        except BaseException:
            self._finish(None)
            raise
        core._spawn(self._watch())
        return True

    async def _unless_cancelled(self, awaitable) -> bool:
        """Await `awaitable` unless the turn is cancelled first: True once it completed, False if it was cut short."""
        work = asyncio.ensure_future(awaitable)
        cancel = asyncio.ensure_future(self._cancel_requested.wait())
        try:
            await asyncio.wait({work, cancel}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            cancel.cancel()
            if not work.done():
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await work
        if work.cancelled():
            return False
        work.result()  # raise what it raised
        return True

    async def _watch(self) -> None:
        await self.stream.ended()
        self._finish(self.stream.done)

    def _end_unstarted(self) -> bool:
        self._finish(DoneEvent(stop_reason="cancelled"))
        return False

    def _finish(self, done: Optional[DoneEvent]) -> None:
        if self._ended.is_set():
            return
        self.done = done
        if self._has_slot:
            self._has_slot = False
            self.core.admission.release()
        entry = self.lease.entry
        if entry.turn is self:
            entry.turn = None
        entry.last_used = time.monotonic()
        self.core.counters.turns_ended += 1
        if done is not None and self.stream is not None:
            _log_done(self.lease.holder, self.session_id, done)
        self._ended.set()

    def cancel(self) -> None:
        """Ask the turn to stop (idempotent); it still ends with a DoneEvent, stop reason "cancelled"."""
        if self._ended.is_set():
            return
        self.cancelled = True
        self._cancel_requested.set()
        if self.stream is not None:
            self.stream.cancel()

    @property
    def is_ended(self) -> bool:
        return self._ended.is_set()

    async def ended(self) -> None:
        await self._ended.wait()

    async def close(self) -> None:
        """Cancel if still running and wait for the end; safe to call from a cancelled task's cleanup."""
        self.cancel()
        if self.stream is not None:
            await asyncio.shield(self._ended.wait())

    def __aiter__(self) -> "Turn":
        return self

    async def __anext__(self):
        if self.stream is not None:
            event = await self.stream.__anext__()
            if isinstance(event, DoneEvent):
                # Free the session before the front can send `done`: a client may
                # send its next generate the moment it reads it.
                self._finish(event)
            return event
        if self.done is not None and not self._replayed:  # cancelled before it started
            self._replayed = True
            return self.done
        raise StopAsyncIteration


def _log_done(holder: str, session_id: str, done: DoneEvent) -> None:
    log.info(
        "%s: session %s generation done (%s): %d prompt + %d generated tokens (%d cached), "
        "ttft %.3fs, prefill %.1f tok/s, decode %.1f tok/s",
        holder,
        session_id,
        done.stop_reason,
        done.prompt_tokens,
        done.generated_tokens,
        done.cached_tokens,
        done.ttft_s,
        done.prefill_tokens_per_s,
        done.decode_tokens_per_s,
    )
    if done.stop_reason == "error":
        log.error("%s: session %s generation failed: %s", holder, session_id, done.error_message)
