"""The memory governor: which sessions must leave memory, and when.

It budgets by what sessions hold, not by what MLX reports at an instant (that
includes a running prefill's scratch, and a budget sized for N sessions kept
about N/2). Held bytes = the weights + a working margin measured at start + each
resident session's KV bytes, a session with a turn counted at its cache's full
size (its cache may grow to that during the turn). Pure decisions: it returns the
entries to evict and leaves the evicting to the core.

Each decision names the limit it serves ("max_sessions" or "memory_budget_bytes").
Who goes first: idle pooled HTTP sessions (caches kept for stateless requests),
least recently used first, then other idle sessions the same way: for memory
always, for max_sessions only where they are spilled to the session store (the
core decides what leaving memory means; closing a client's conversation to make
room is the client's decision). A session with a lease or a turn is never chosen,
nor one that is not resident. A session being spilled holds nothing any more (the
room is promised); one being restored holds its cache's full size.
"""

from dataclasses import dataclass
from typing import Iterable, Optional

from .admission import Refusal
from .registry import RESIDENT, RESTORING, Entry, Registry


@dataclass(frozen=True)
class MemoryShape:
    """The fixed parts of what the daemon holds."""

    weights_bytes: int
    margin_bytes: int  # scratch of one forward pass, measured at start
    full_session_bytes: int  # one session's cache at its bound


class Governor:
    """Limits on resident sessions: max_sessions, memory_budget_bytes, idle_ttl_s."""

    def __init__(self, shape: MemoryShape, budget_bytes: Optional[int], max_sessions: int, idle_ttl_s: float):
        self.shape = shape
        self.budget_bytes = budget_bytes  # None: no budget
        self.max_sessions = max_sessions
        self.idle_ttl_s = idle_ttl_s

    def cost(self, entry: Entry, kv_bytes: int) -> int:
        if entry.state == RESTORING:
            return self.shape.full_session_bytes
        if entry.state != RESIDENT:
            return 0
        return self.shape.full_session_bytes if entry.turn is not None else kv_bytes

    def held_bytes(self, registry: Registry, kv: dict[str, int]) -> int:
        """Weights, margin and what every resident session holds (kv: session id -> its KV bytes now)."""
        fixed = self.shape.weights_bytes + self.shape.margin_bytes
        return fixed + sum(self.cost(e, kv.get(e.id, 0)) for e in registry.entries.values())

    def for_new_session(
        self, registry: Registry, kv: dict[str, int], spill: bool = False, arriving_bytes: int = 0
    ) -> list[tuple[Entry, str]]:
        """(entry, limit) pairs to take out of memory so one more session fits; Refusal when it cannot.

        `spill`: idle sessions that are not pooled may leave for max_sessions too.
        `arriving_bytes`: what the new session brings (a restored copy's cache).
        """
        return self._for_sessions(registry, kv, spill, adding=1, extra=arriving_bytes)

    def for_restore(self, registry: Registry, kv: dict[str, int], spill: bool = False) -> list[tuple[Entry, str]]:
        """(entry, limit) pairs to take out of memory for a session being restored (already counted, at full size)."""
        return self._for_sessions(registry, kv, spill, adding=0, extra=0)

    def _for_sessions(self, registry: Registry, kv: dict[str, int], spill: bool, adding: int, extra: int):
        in_memory = sum(1 for e in registry.entries.values() if e.state in (RESIDENT, RESTORING))
        over = in_memory + adding - self.max_sessions
        victims: list[Entry] = []
        if over > 0:
            victims = [e for e in _evictable(registry) if spill or e.pooled][:over]
            if len(victims) < over:
                left = "idle session is left to move to the session store" if spill else (
                    "idle pooled HTTP session is left to close"
                )
                raise Refusal(
                    "max_sessions",
                    f"session limit reached (max_sessions={self.max_sessions}) and no {left}; "
                    "close a session or raise max_sessions",
                )
        for_memory = self._fitted(registry, kv, extra=extra, keep=None, chosen=victims)
        return [(e, "max_sessions") for e in victims] + [(e, "memory_budget_bytes") for e in for_memory]

    def for_turn(self, registry: Registry, entry: Entry, kv: dict[str, int]) -> list[tuple[Entry, str]]:
        """(entry, limit) pairs to evict so `entry`'s cache may grow to full size in a turn; Refusal when it cannot.

        Once the turn is registered on the entry, the entry already counts at full size.
        """
        growth = self.shape.full_session_bytes - self.cost(entry, kv.get(entry.id, 0))
        return [(e, "memory_budget_bytes") for e in self._fitted(registry, kv, extra=growth, keep=entry, chosen=[])]

    def over_budget(self, registry: Registry, kv: dict[str, int]) -> list[tuple[Entry, str]]:
        """(entry, limit) pairs: idle entries to evict until what is held fits the budget again, as far as they allow."""
        return [(e, "memory_budget_bytes") for e in self._fit(registry, kv, extra=0, keep=None, chosen=[])[0]]

    def expired(self, registry: Registry, now: float) -> list[Entry]:
        """Idle resident entries unused for longer than idle_ttl_s (none when it is 0).

        An entry whose spill failed is left alone until its `spill_retry_at`.
        """
        if self.idle_ttl_s <= 0:
            return []
        return [
            e
            for e in registry.idle()
            if e.state == RESIDENT and now - e.last_used > self.idle_ttl_s and now >= e.spill_retry_at
        ]

    def _fitted(self, registry: Registry, kv: dict[str, int], extra: int, keep: Optional[Entry], chosen: list):
        victims, held = self._fit(registry, kv, extra, keep, chosen)
        if self.budget_bytes is not None and held > self.budget_bytes:
            s = self.shape
            raise Refusal(
                "memory_budget_bytes",
                f"memory budget exhausted: weights ({s.weights_bytes} bytes), the working margin "
                f"({s.margin_bytes}) and the sessions' caches would hold {held} bytes, over "
                f"memory_budget_bytes={self.budget_bytes}, and no idle session is left to evict",
            )
        return victims

    def _fit(self, registry, kv, extra, keep, chosen) -> tuple[list[Entry], int]:
        """(idle entries to evict, bytes held after evicting them), evicting until the budget is met or none is left."""
        held = self.held_bytes(registry, kv) + extra - sum(self.cost(e, kv.get(e.id, 0)) for e in chosen)
        victims: list[Entry] = []
        if self.budget_bytes is None:
            return victims, held
        for entry in _evictable(registry, exclude=[keep, *chosen]):
            if held <= self.budget_bytes:
                break
            victims.append(entry)
            held -= self.cost(entry, kv.get(entry.id, 0))
        return victims, held


def _evictable(registry: Registry, exclude: Iterable[Optional[Entry]] = ()) -> list[Entry]:
    """Idle resident entries in eviction order: pooled ones first, each group least recently used first."""
    skip = {id(e) for e in exclude if e is not None}
    idle = [e for e in registry.idle() if e.state == RESIDENT and id(e) not in skip]
    return [e for e in idle if e.pooled] + [e for e in idle if not e.pooled]
