"""The daemon core: what the socket front and the HTTP front both call.

The fronts parse requests and render replies; the core owns the session registry
(who holds each session: leases), admission of generations, the memory governor
and the sweeper that applies it, and the counters that `stats` and `/metrics`
render. A front never reads another front's state, and never the engine's
session table: it asks the core.

A front's calls, in order: take a lease on a session (`lease`), work on it
(`append`, `open_turn` then `Turn.start` and iterate the turn), release the lease.
`create_session`, `close_session`, `cancel_session`, `session_info` and the
tokenizer calls stand alone.
"""

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Mapping, Optional

from kakeya_mlx.engine import Engine
from kakeya_mlx.errors import BusyError, NotFoundError
from kakeya_protocol import params as rules
from kakeya_protocol.quote import quote

from .admission import Admission, Refusal
from .counters import Counters
from .governor import Governor, MemoryShape
from .registry import Entry, Lease, Registry
from .turns import GenerationRequest, Turn

log = logging.getLogger("kakeya.daemon")

@dataclass(frozen=True)
class Limits:
    """The settings the core enforces (a slice of DaemonConfig)."""

    max_sessions: int
    max_concurrent_generations: int
    queue_policy: str
    max_queue_wait_s: float
    max_queued_generations: int
    idle_ttl_s: float
    idle_sweep_interval_s: float
    memory_budget_bytes: Optional[int]  # None: no budget
    shutdown_grace_s: float


class DaemonCore:
    """Sessions, leases, admission, memory and counters over one engine."""

    def __init__(self, engine: Engine, limits: Limits):
        self.engine = engine
        self.limits = limits
        self.registry = Registry()
        self.counters = Counters()
        self.admission = Admission(
            limits.max_concurrent_generations,
            limits.queue_policy,
            limits.max_queue_wait_s,
            limits.max_queued_generations,
        )
        self.governor = Governor(MemoryShape(0, 0, 0), limits.memory_budget_bytes, limits.max_sessions, limits.idle_ttl_s)
        model, dropped = rules.model_sampling(engine.loaded.generation_config)
        for why in dropped:
            log.warning("ignoring %s in %s", why, engine.loaded.path / "generation_config.json")
        self.sampling_defaults, self.sampling_sources = rules.sampling_defaults(model)
        self.stopping = False
        self._tasks: set[asyncio.Task] = set()
        self._sweeper: Optional[asyncio.Task] = None

    # ---- lifecycle -------------------------------------------------------

    async def start(self) -> None:
        """Measure what the memory budget needs (only when there is one) and start the sweeper."""
        engine = self.engine
        if self.limits.memory_budget_bytes is not None:
            log.info("measuring a forward pass's working memory for memory_budget_bytes")
            shape = MemoryShape(
                engine.weights_bytes(), await engine.measure_working_bytes(), engine.full_session_kv_bytes()
            )
            self.governor.shape = shape
            log.info(
                "memory budget %d bytes: weights %d + working margin %d + %d per full session cache",
                self.limits.memory_budget_bytes,
                shape.weights_bytes,
                shape.margin_bytes,
                shape.full_session_bytes,
            )
            if shape.weights_bytes + shape.margin_bytes + shape.full_session_bytes > self.limits.memory_budget_bytes:
                log.warning("memory_budget_bytes=%d leaves no room for one full session", self.limits.memory_budget_bytes)
        self._sweeper = asyncio.create_task(self._sweep_forever())

    def turns(self) -> list[Turn]:
        return [e.turn for e in self.registry.entries.values() if e.turn is not None]

    async def stop(self) -> None:
        """Refuse new work, cancel every turn of both fronts, and wait (up to shutdown_grace_s) for them to end."""
        if self.stopping:
            return
        self.stopping = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        turns = self.turns()
        log.info("shutting down: %d generation(s) in flight", len(turns))
        for turn in turns:
            turn.cancel()
        if turns:
            await asyncio.wait([asyncio.ensure_future(t.ended()) for t in turns], timeout=self.limits.shutdown_grace_s)

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def refuse_if_stopping(self) -> None:
        if self.stopping:
            self.counters.rejections["shutting_down"] += 1
            raise Refusal("shutting_down", "the daemon is shutting down")

    # ---- sessions --------------------------------------------------------

    def _kv(self) -> dict[str, int]:
        return {sid: self.engine.session_kv_bytes(sid) for sid in self.registry.entries}

    def _refused(self, refusal: Refusal) -> Refusal:
        self.counters.rejections[refusal.limit] += 1
        return refusal

    async def create_session(
        self, pooled: bool = False, speculative: Optional[str] = None, num_draft_tokens: Optional[int] = None
    ) -> str:
        """A new session; idle pooled HTTP sessions (then, for memory, idle ones) are closed to make room.

        `speculative` and `num_draft_tokens` become the session's defaults for its generates.
        """
        self.refuse_if_stopping()
        self.engine.check_speculative(speculative, num_draft_tokens)  # before anything is closed for room
        try:
            victims = self.governor.for_new_session(self.registry, self._kv())
        except Refusal as refusal:
            raise self._refused(refusal) from None
        closing = [self._remove(entry, *self._why_room(limit)) for entry, limit in victims]
        # No suspension inside: the room just made is ours.
        session_id = await self.engine.create_session(speculative, num_draft_tokens)
        self.registry.add(session_id, pooled=pooled)
        for close in closing:
            self._spawn(close)
        return session_id

    async def create_pooled_session(self, holder: str) -> Lease:
        """A new session for the HTTP front's pool, returned already leased (exclusively) to `holder`."""
        session_id = await self.create_session(pooled=True)
        return self.registry.acquire(session_id, holder, exclusive=True)

    def _why_room(self, limit: str) -> tuple[str, str]:
        """(why, eviction kind) for a session closed to make room under `limit`."""
        if limit == "max_sessions":
            return (
                "closed (an idle pooled HTTP session, least recently used) to make room under "
                f"max_sessions={self.limits.max_sessions}",
                "pooled",
            )
        return (
            "evicted (least recently used) to keep the sessions within "
            f"memory_budget_bytes={self.limits.memory_budget_bytes}",
            "lru",
        )

    def _remove(self, entry: Entry, why: str, kind: str):
        """Forget `entry` now (later requests hear `why`) and return the awaitable that closes it in the engine."""
        self.registry.remove(entry.id, why)
        self.counters.evicted[kind] += 1
        log.info("session %s %s", entry.id, why)
        return self._close_in_engine(entry.id)

    async def _close_in_engine(self, session_id: str) -> None:
        with contextlib.suppress(NotFoundError):
            await self.engine.close_session(session_id)

    async def evict_pooled(self, session_id: str, why: str) -> None:
        """Close an idle pooled session the HTTP front chose to give up (its own cap)."""
        entry = self.registry.entries.get(session_id)
        if entry is not None and entry.idle:
            await self._remove(entry, why, "pooled")

    async def close_session(self, session_id, holder: str) -> None:
        """Close a session, ending its running generation first; busy while an HTTP turn holds it."""
        lease = self.lease(session_id, holder)
        try:
            turn = lease.entry.turn
            if turn is not None:
                await turn.close()
            self.registry.remove(session_id)
            await self._close_in_engine(session_id)
        finally:
            lease.release()
        log.info("%s: session %s closed", holder, session_id)

    def lease(self, session_id, holder: str, exclusive: bool = False) -> Lease:
        """A hold on the session (release it when done); NotFoundError says why a session is gone."""
        with self._counting_busy():
            return self.registry.acquire(session_id, holder, exclusive)

    @contextlib.contextmanager
    def _counting_busy(self):
        try:
            yield
        except BusyError:
            self.counters.rejections["busy"] += 1
            raise

    async def session_info(self, session_id) -> dict:
        self.registry.get(session_id)
        return await self.engine.session_info(session_id)

    def list_sessions(self) -> list[dict]:
        return [i for i in self.engine.list_sessions() if i["session_id"] in self.registry]

    async def append(self, lease: Lease, **content) -> dict:
        """Append tokens, text or messages (see Engine.append) to the leased session."""
        with self._counting_busy():
            return await self.engine.append(lease.entry.id, **content)

    def history(self, session_id: str) -> list[int]:
        return self.engine.session_history(session_id)

    def longest_prefix(self, tokens: list[int], among: list[str]) -> tuple[Optional[str], int]:
        return self.engine.longest_prefix_session(tokens, among=among)

    def render_messages(self, messages: list[dict], continuation: bool, add_generation_prompt: bool) -> str:
        return self.engine.render_messages(messages, continuation, add_generation_prompt)

    async def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return await self.engine.tokenize(text, add_special_tokens=add_special_tokens)

    async def detokenize(self, tokens: list[int]) -> str:
        return await self.engine.detokenize(tokens)

    # ---- turns -----------------------------------------------------------

    def generation_request(self, params: Mapping, **extra) -> GenerationRequest:
        """A generate's settings from its checked wire-style params, the defaults in force filling the gaps;
        `extra` sets fields the params do not carry (see GenerationRequest.from_params)."""
        max_new_tokens = self.engine.config.max_new_tokens
        return GenerationRequest.from_params(params, max_new_tokens, self.sampling_defaults, **extra)

    def generation_defaults(self) -> dict:
        """What a generate that leaves a field out gets, and where each value comes from ("model" or "default")."""
        return {
            "max_tokens": rules.default_max_tokens(self.engine.config.max_new_tokens),
            **self.sampling_defaults,
            "sources": dict(self.sampling_sources),
        }

    def open_turn(self, lease: Lease, request: GenerationRequest) -> Turn:
        """Accept a generate on the leased session; `start()` it, iterate it, and `close()` it when done."""
        self.refuse_if_stopping()
        entry = lease.entry
        prior = entry.turn
        if prior is not None and not prior.cancelled:
            self.counters.rejections["busy"] += 1
            raise BusyError(
                f"session {quote(entry.id)} is already generating; cancel it or wait for its done event"
            )
        turn = Turn(self, lease, request, after=prior)
        entry.turn = turn
        self.counters.turns_opened += 1
        return turn

    def _make_room_for_turn(self, entry: Entry) -> None:
        for victim, limit in self.governor.for_turn(self.registry, entry, self._kv()):
            self._spawn(self._remove(victim, *self._why_room(limit)))

    async def cancel_session(self, session_id) -> bool:
        """Cancel whatever generate waits or runs on the session, from either front; False if none."""
        turn = self.registry.get(session_id).turn
        if turn is None or turn.is_ended:
            return False
        turn.cancel()
        return True

    # ---- the sweeper -----------------------------------------------------

    async def _sweep_forever(self) -> None:
        """Close sessions idle past idle_ttl_s; evict LRU idle sessions while over the memory budget."""
        while True:
            await asyncio.sleep(self.limits.idle_sweep_interval_s)
            try:
                await self.sweep()
            except Exception:
                log.exception("idle sweep failed; will retry")

    async def sweep(self) -> None:
        now = time.monotonic()
        for entry in self.governor.expired(self.registry, now):
            await self._evict_by_sweeper(entry, f"closed after idle_ttl_s={self.limits.idle_ttl_s:g} without use", "idle")
        for entry, limit in self.governor.over_budget(self.registry, self._kv()):
            await self._evict_by_sweeper(entry, *self._why_room(limit))

    async def _evict_by_sweeper(self, entry: Entry, why: str, kind: str) -> None:
        try:
            lease = self.registry.acquire(entry.id, "the sweeper", exclusive=True)
        except (BusyError, NotFoundError):
            return  # taken or gone since the decision
        try:
            await self._remove(entry, why, kind)
        finally:
            lease.release()

    # ---- stats -----------------------------------------------------------

    def stats(self) -> dict:
        """The `stats` reply (protocol section "stats"); /metrics renders the same numbers."""
        c, engine, gov = self.counters, self.engine, self.governor
        counters = engine.counters
        kv = self._kv()
        memory = dict(engine.memory())
        memory.update(
            budget_bytes=gov.budget_bytes or 0,
            weights_bytes=gov.shape.weights_bytes,
            margin_bytes=gov.shape.margin_bytes,
            held_bytes=gov.held_bytes(self.registry, kv) if gov.budget_bytes is not None else 0,
        )
        entries = self.registry.entries.values()
        return {
            "uptime_s": c.uptime_s,
            "model": engine.model_info()["name"],
            "sessions": {
                "active": len(self.registry),
                "max": self.limits.max_sessions,
                "pooled": sum(1 for e in entries if e.pooled),
                "leased": sum(1 for e in entries if e.leases),
                "evicted_idle": c.evicted["idle"],
                "evicted_lru": c.evicted["lru"],
                "evicted_pooled": c.evicted["pooled"],
            },
            "generations": {
                "active": self.admission.active,
                "total": counters["generations"],
                "queued": self.admission.queued,
            },
            "tokens": {"in": counters["tokens_in"], "out": counters["tokens_out"]},
            "speculative": {"drafted": counters["draft_tokens"], "accepted": counters["accepted_tokens"]},
            "scheduler": engine.scheduler_counters(),
            "tokens_per_s": {
                "prefill": _rate(counters["tokens_in"], counters["prefill_s"]),
                "decode": _rate(counters["tokens_out"], counters["decode_s"]),
            },
            "memory": memory,
            "rejections": dict(c.rejections),
            "connections": c.connections,
            "requests": c.requests,
            "http": {"connections": c.http_connections, "requests": c.http.total_requests()},
        }


def _rate(tokens: int, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else 0.0
