"""Which sessions are in memory: taking them out (spill or destroy), bringing them back, the sweeper.

The governor decides who must leave memory and for which limit; this applies it.
A session leaving memory is decided at once, without suspension (from then on it
counts as gone), and finished by a task: a spill to the session store (the default)
or a close (`eviction = "destroy"`, and pooled HTTP sessions always, see
docs/daemon.md). A stored session comes back when a request needs its state
(`ensure_resident`). Moves run as tasks of their own, so a request cancelled while
it waits leaves them to finish; whoever needs the session next waits for them.
"""

import asyncio
import contextlib
import logging
import time
from typing import Optional

from kakeya_mlx.engine import Engine
from kakeya_mlx.errors import EngineError, NotFoundError

from .counters import Counters
from .governor import Governor
from .registry import RESIDENT, RESTORING, SPILLING, STORED, Entry, Registry
from .stored import StoredSessions

log = logging.getLogger("kakeya.daemon")


class Residency:
    """Evictions, spills and restores over the registry, as the governor decides; the idle sweeper."""

    def __init__(
        self,
        engine: Engine,
        registry: Registry,
        counters: Counters,
        governor: Governor,
        stored: StoredSessions,
        idle_sweep_interval_s: float,
    ):
        self.engine = engine
        self.registry = registry
        self.counters = counters
        self.governor = governor
        self.stored = stored
        self.idle_sweep_interval_s = idle_sweep_interval_s
        self._tasks: set[asyncio.Task] = set()
        self._sweeper: Optional[asyncio.Task] = None

    def start(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep_forever())

    def stop_sweeping(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()

    def spawn(self, coro) -> asyncio.Task:
        """Run `coro` as a task the residency keeps until it ends (moves, and the core's turn watchers)."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def kv(self) -> dict[str, int]:
        """KV bytes of every session the engine holds (resident, or being spilled)."""
        return {
            sid: self.engine.session_kv_bytes(sid)
            for sid, e in self.registry.entries.items()
            if e.state in (RESIDENT, SPILLING)
        }

    # ---- leaving memory --------------------------------------------------

    def _why(self, limit: str, pooled: bool) -> tuple[str, str, str]:
        """(why it was closed, for later requests; the eviction kind; why it was spilled, for the log)."""
        g = self.governor
        if limit == "idle_ttl_s":
            ttl = f"idle_ttl_s={g.idle_ttl_s:g}"
            return f"closed after {ttl} without use", "idle", f"unused for {ttl}"
        if limit == "max_sessions" and pooled:
            why = "closed (an idle pooled HTTP session, least recently used) to make room under "
            return why + f"max_sessions={g.max_sessions}", "pooled", ""
        room = f"make room under max_sessions={g.max_sessions}" if limit == "max_sessions" else (
            f"keep the sessions within memory_budget_bytes={g.budget_bytes}"
        )
        return f"evicted (least recently used) to {room}", "lru", f"least recently used, to {room}"

    def evict(self, entry: Entry, limit: str) -> asyncio.Task:
        """Take an idle resident session out of memory for `limit`: spilled, or destroyed (pooled ones always).

        Decided now (it no longer counts as held); the returned task finishes it.
        A spill that fails keeps an idle session in memory; one that memory needs
        (any limit but idle_ttl_s) is then lost, and later requests hear why.
        """
        why, kind, reason = self._why(limit, entry.pooled)
        self.counters.evicted[kind] += 1
        if entry.pooled or not self.stored.spills:
            return self.spawn(self.remove(entry, why))
        entry.state = SPILLING
        entry.moving = self.spawn(self._spill(entry, reason, why, forced=limit != "idle_ttl_s"))
        return entry.moving

    async def _spill(self, entry: Entry, reason: str, why: str, forced: bool) -> None:
        try:
            if not await self.stored.spill(entry, reason, why, forced) and not forced:
                entry.spill_retry_at = time.monotonic() + self.governor.idle_ttl_s
        finally:
            if entry.state == SPILLING:
                entry.state = RESIDENT
            entry.moving = None

    def remove(self, entry: Entry, why: Optional[str] = None):
        """Forget `entry` now (later requests hear `why`) and return the awaitable that closes it in the engine."""
        self.registry.remove(entry.id, why)
        if why is not None:
            log.info("session %s %s", entry.id, why)
        return self._close_in_engine(entry.id)

    async def _close_in_engine(self, session_id: str) -> None:
        with contextlib.suppress(NotFoundError):
            await self.engine.close_session(session_id)

    async def gone(self, leaving: list[asyncio.Task]) -> None:
        """Wait until sessions taken out of memory have let go of it (a cancelled waiter leaves them running)."""
        if leaving:
            await asyncio.wait(leaving)

    async def make_room(self, victims: list[tuple[Entry, str]]) -> None:
        await self.gone([self.evict(entry, limit) for entry, limit in victims])

    # ---- coming back -----------------------------------------------------

    async def ensure_resident(self, entry: Entry) -> Optional[dict]:
        """Bring a stored session back into memory (after any spill or restore of it under way).

        Returns the reply's `restored` map when this call waited for a restore,
        else None. Raises why the session cannot be restored (stored.refused), the
        Refusal when memory has no room for it (uncounted), or NotFoundError when it
        went meanwhile.
        """
        restored = None
        while True:
            if entry.moving is not None:
                restored = await asyncio.shield(entry.moving) or restored
                continue
            self.registry.get(entry.id)  # gone meanwhile: says why
            if entry.state != STORED:
                return restored
            entry.state = RESTORING
            entry.moving = self.spawn(self._restore(entry))

    async def _restore(self, entry: Entry) -> dict:
        try:
            await self.make_room(self.governor.for_restore(self.registry, self.kv(), spill=self.stored.spills))
            return await self.stored.restore(entry)
        finally:
            if entry.state == RESTORING:
                entry.state = STORED
            entry.moving = None

    async def settle(self, entry: Entry) -> None:
        """Wait until no spill or restore of `entry` is under way, whatever its outcome."""
        while entry.moving is not None:
            with contextlib.suppress(EngineError):  # a refusal for room included
                await asyncio.shield(entry.moving)

    # ---- the sweeper and a stop ---------------------------------------------

    async def _sweep_forever(self) -> None:
        """Sessions idle past idle_ttl_s leave memory; idle ones too while over the memory budget."""
        while True:
            await asyncio.sleep(self.idle_sweep_interval_s)
            try:
                await self.sweep()
            except Exception:
                log.exception("idle sweep failed; will retry")

    async def sweep(self) -> None:
        expired = self.governor.expired(self.registry, time.monotonic())
        await self.make_room([(e, "idle_ttl_s") for e in expired])
        await self.make_room(self.governor.over_budget(self.registry, self.kv()))

    async def save_for_stop(self) -> None:
        """Save the live sessions (pooled ones are not) to the store, within stop_save_s; once nothing runs.

        Spills and restores under way finish first, within the same bound.
        """
        moving = [e.moving for e in self.registry.entries.values() if e.moving is not None]
        if moving:
            await asyncio.wait(moving, timeout=self.stored.settings.stop_save_s)
        live = [e for e in self.registry.entries.values() if e.state == RESIDENT and not e.pooled]
        live.sort(key=lambda e: e.last_used, reverse=True)
        await self.stored.save_at_stop(live)
