"""The daemon core: what the socket front and the HTTP front both call.

The fronts parse requests and render replies; the core owns the session registry
(who holds each session: leases), admission of generations, the memory governor
and the sweeper that applies it, and the counters that `stats` and `/metrics`
render. A front never reads another front's state, and never the engine's
session table: it asks the core.

A front's calls, in order: take a lease on a session (`lease`), work on it
(`append`, `open_turn` then `Turn.start` and iterate the turn), release the lease.
`create_session`, `close_session`, `cancel_session`, `session_info`, the named
saves and the tokenizer calls stand alone.

A session that must leave memory (idle_ttl_s, memory_budget_bytes, max_sessions)
is spilled to the session store or destroyed (the `eviction` setting; pooled HTTP
sessions are always destroyed). A stored session's entry stays; whatever needs its
state first brings it back (`ensure_resident`) and says so in its reply. Applying
the governor's decisions is residency.py's; reading and writing the store, stored.py's.
"""

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Mapping, Optional

from kakeya_mlx.engine import Engine
from kakeya_mlx.errors import BusyError
from kakeya_mlx.store import SessionStore
from kakeya_protocol import params as rules
from kakeya_protocol.quote import quote

from .admission import Admission, Refusal
from .counters import Counters
from .governor import Governor, MemoryShape
from .registry import RESIDENT, RESTORING, SPILLING, STORED, Entry, Lease, Registry
from .residency import Residency
from .stored import StoredSessions, StoreSettings
from .turns import GenerationRequest, Turn

log = logging.getLogger("kakeya.daemon")

NO_STORE = StoreSettings(directory=None, max_bytes=1, eviction="destroy", stop_save_s=0.0)


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

    def __init__(
        self,
        engine: Engine,
        limits: Limits,
        store: Optional[SessionStore] = None,
        store_settings: StoreSettings = NO_STORE,
        store_unavailable: str = "none was configured",
    ):
        """`store`: where sessions go when they leave memory, are saved at a stop or by name (None: nowhere)."""
        self.engine = engine
        self.limits = limits
        self.registry = Registry()
        self.counters = Counters()
        self.stored = StoredSessions(engine, self.registry, self.counters, store_settings, store, store_unavailable)
        self.admission = Admission(
            limits.max_concurrent_generations,
            limits.queue_policy,
            limits.max_queue_wait_s,
            limits.max_queued_generations,
        )
        self.governor = Governor(MemoryShape(0, 0, 0), limits.memory_budget_bytes, limits.max_sessions, limits.idle_ttl_s)
        self.residency = Residency(
            engine, self.registry, self.counters, self.governor, self.stored, limits.idle_sweep_interval_s
        )
        model, dropped = rules.model_sampling(engine.loaded.generation_config)
        for why in dropped:
            log.warning("ignoring %s in %s", why, engine.loaded.path / "generation_config.json")
        self.sampling_defaults, self.sampling_sources = rules.sampling_defaults(model)
        self.stopping = False

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
        await self.stored.adopt()
        self.residency.start()

    def turns(self) -> list[Turn]:
        return [e.turn for e in self.registry.entries.values() if e.turn is not None]

    async def stop(self) -> None:
        """Refuse new work, cancel every turn of both fronts, and wait (up to shutdown_grace_s) for them to end."""
        if self.stopping:
            return
        self.stopping = True
        self.residency.stop_sweeping()
        turns = self.turns()
        log.info("shutting down: %d generation(s) in flight", len(turns))
        for turn in turns:
            turn.cancel()
        if turns:
            await asyncio.wait([asyncio.ensure_future(t.ended()) for t in turns], timeout=self.limits.shutdown_grace_s)

    async def save_for_stop(self) -> None:
        """After `stop`, once no request runs: save the live sessions to the store, within stop_save_s."""
        await self.residency.save_for_stop()

    def _spawn(self, coro) -> asyncio.Task:
        return self.residency.spawn(coro)

    def refuse_if_stopping(self) -> None:
        if self.stopping:
            self.counters.rejections["shutting_down"] += 1
            raise Refusal("shutting_down", "the daemon is shutting down")

    # ---- sessions --------------------------------------------------------

    def _refused(self, refusal: Refusal) -> Refusal:
        self.counters.rejections[refusal.limit] += 1
        return refusal

    async def create_session(
        self, pooled: bool = False, speculative: Optional[str] = None, num_draft_tokens: Optional[int] = None
    ) -> str:
        """A new session; idle pooled HTTP sessions (then idle ones, see the governor) leave memory to make room.

        `speculative` and `num_draft_tokens` become the session's defaults for its generates.
        """
        self.refuse_if_stopping()
        self.engine.check_speculative(speculative, num_draft_tokens)  # before anything leaves for room
        try:
            victims = self.governor.for_new_session(self.registry, self.residency.kv(), spill=self.stored.spills)
        except Refusal as refusal:
            raise self._refused(refusal) from None
        leaving = [self.residency.evict(entry, limit) for entry, limit in victims]
        # No suspension inside: the room just made is ours.
        session_id = await self.engine.create_session(speculative, num_draft_tokens)
        self.registry.add(session_id, pooled=pooled)
        await self.residency.gone(leaving)
        return session_id

    async def create_pooled_session(self, holder: str) -> Lease:
        """A new session for the HTTP front's pool, returned already leased (exclusively) to `holder`."""
        session_id = await self.create_session(pooled=True)
        return self.registry.acquire(session_id, holder, exclusive=True)

    async def ensure_resident(self, entry: Entry) -> Optional[dict]:
        """Bring a stored session back into memory first; the reply's `restored` map when it was (Residency).

        A refusal for room is the caller's to count.
        """
        return await self.residency.ensure_resident(entry)

    async def evict_pooled(self, session_id: str, why: str) -> None:
        """Close an idle pooled session the HTTP front chose to give up (its own cap)."""
        entry = self.registry.entries.get(session_id)
        if entry is not None and entry.idle:
            self.counters.evicted["pooled"] += 1
            await self.residency.remove(entry, why)

    async def close_session(self, session_id, holder: str) -> None:
        """Close a session, ending its running generation first; busy while an HTTP turn holds it.

        A stored session is not read back: its file is deleted.
        """
        lease = self.lease(session_id, holder)
        try:
            entry = lease.entry
            turn = entry.turn
            if turn is not None:
                await turn.close()
            await self.residency.settle(entry)
            if entry.state == STORED:
                await self.stored.discard(entry)
            await self.residency.remove(entry)
        finally:
            lease.release()
        log.info("%s: session %s closed", holder, session_id)

    def lease(self, session_id, holder: str, exclusive: bool = False, use: bool = True) -> Lease:
        """A hold on the session (release it when done); NotFoundError says why a session is gone.

        `use`: whether the hold restarts the session's idle time.
        """
        with self._counting():
            return self.registry.acquire(session_id, holder, exclusive, use)

    @contextlib.contextmanager
    def _counting(self):
        """Count a refusal (busy, or a limit's) that passes through, in stats.rejections."""
        try:
            yield
        except BusyError:
            self.counters.rejections["busy"] += 1
            raise
        except Refusal as refusal:
            self.counters.rejections[refusal.limit] += 1
            raise

    async def session_info(self, session_id) -> dict:
        """The session's info (restoring a stored one first: then with "restored"), and its state."""
        with self._counting():
            restored = await self.ensure_resident(self.registry.get(session_id))
        # No suspension between the check above and the engine's answer: it is still resident.
        info = await self.engine.session_info(session_id)
        info["state"] = RESIDENT
        if restored is not None:
            info["restored"] = restored
        return info

    def list_sessions(self) -> list[dict]:
        """Every session, resident or not, each with its state; a stored one as it was when it was written."""
        resident = {i["session_id"]: i for i in self.engine.list_sessions()}
        out = []
        for entry in list(self.registry.entries.values()):
            info = resident.get(entry.id)
            if info is None or entry.state not in (RESIDENT, SPILLING):
                stored = entry.stored
                info = dict(stored.info or {}) if stored is not None else {}
                info.update(session_id=entry.id, generating=False)
                if stored is not None:
                    info.update(stored_bytes=stored.nbytes, stored_at=stored.stored_at)
            out.append({**info, "state": entry.state})
        return out

    async def list_saved(self) -> list[dict]:
        return await self.stored.list_named()

    async def append(self, lease: Lease, **content) -> dict:
        """Append tokens, text or messages (see Engine.append) to the leased session, restoring it first if stored."""
        with self._counting():
            restored = await self.ensure_resident(lease.entry)
            result = await self.engine.append(lease.entry.id, **content)
        if restored is not None:
            result["restored"] = restored
        return result

    # ---- named saves -----------------------------------------------------

    async def save_session(self, session_id, name: str, holder: str) -> dict:
        """Save a session under `name` (restoring it first if stored); it stays where it is. Not a use."""
        lease = self.lease(session_id, holder, use=False)
        try:
            with self._counting():
                restored = await self.ensure_resident(lease.entry)
                result = await self.stored.save_named(session_id, name)
        finally:
            lease.release()
        if restored is not None:
            result["restored"] = restored
        return result

    async def restore_session(self, name: str) -> dict:
        """A new session holding the conversation saved as `name` (a fork of it)."""
        self.refuse_if_stopping()
        full = self.governor.shape.full_session_bytes
        try:
            victims = self.governor.for_new_session(
                self.registry, self.residency.kv(), spill=self.stored.spills, arriving_bytes=full
            )
        except Refusal as refusal:
            raise self._refused(refusal) from None
        await self.residency.make_room(victims)
        session_id, restored = await self.stored.restore_named(name)
        self.registry.add(session_id)
        info = await self.engine.session_info(session_id)
        return {"session_id": session_id, "name": name, "history_length": info["history_length"], "restored": restored}

    async def delete_saved(self, name: str) -> None:
        await self.stored.delete_named(name)

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

    async def make_room_for_turn(self, entry: Entry) -> None:
        """Take idle sessions out of memory until `entry`'s cache may grow to full size; Refusal when it cannot."""
        await self.residency.make_room(self.governor.for_turn(self.registry, entry, self.residency.kv()))

    async def cancel_session(self, session_id) -> bool:
        """Cancel whatever generate waits or runs on the session, from either front; False if none."""
        turn = self.registry.get(session_id).turn
        if turn is None or turn.is_ended:
            return False
        turn.cancel()
        return True

    # ---- stats -----------------------------------------------------------

    def stats(self) -> dict:
        """The `stats` reply (protocol section "stats"); /metrics renders the same numbers."""
        c, engine, gov = self.counters, self.engine, self.governor
        counters = engine.counters
        kv = self.residency.kv()
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
                "active": sum(1 for e in entries if e.state in (RESIDENT, SPILLING)),
                "stored": sum(1 for e in entries if e.state in (STORED, RESTORING)),
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
            "store": self.stored.stats(),
            "rejections": dict(c.rejections),
            "connections": c.connections,
            "requests": c.requests,
            "http": {"connections": c.http_connections, "requests": c.http.total_requests()},
        }


def _rate(tokens: int, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else 0.0
