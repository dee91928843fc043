"""The session registry: every session the daemon holds, who holds it right now, and why gone ones went.

An entry is held through leases. A socket request that touches a session takes a
shared lease (several may run at once; the engine itself refuses an append during
a generation); an HTTP turn and the sweeper take exclusive ones, so nobody
appends into an HTTP prompt half way or uses a session while it is evicted.
Only an entry with no lease and no turn may be evicted.
"""

import asyncio
import collections
import time
from dataclasses import dataclass, field
from typing import Optional

from kakeya_mlx.errors import BusyError, NotFoundError
from kakeya_protocol.quote import quote

# Where a session's state lives (the wire's "state"): in memory; being written to the
# session store; in the store only (a request brings it back before using it); being read back.
RESIDENT, SPILLING, STORED, RESTORING = "resident", "spilling", "stored", "restoring"


@dataclass(frozen=True)
class StoredInfo:
    """What the daemon knows of a session in the store without reading it back."""

    info: Optional[dict]  # its session_info when it was written; None when the file's header is unreadable
    nbytes: int
    stored_at: float  # seconds since the epoch


@dataclass(eq=False)
class Lease:
    """A hold on one session, released exactly once (release() is idempotent)."""

    entry: "Entry"
    holder: str  # who, in words, for messages and logs: "conn 3 request 7", "POST /v1/completions", "the sweeper"
    exclusive: bool
    released: bool = False
    use: bool = True  # whether holding it is a use of the session (restarts its idle time)

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.entry.leases.remove(self)
            if self.use:
                self.entry.last_used = time.monotonic()


@dataclass(eq=False)
class Entry:
    """One session as the daemon sees it; the engine holds its history and cache."""

    id: str
    # Made by the HTTP front for cache reuse: such sessions are the first closed when room is needed.
    pooled: bool = False
    state: str = RESIDENT
    leases: list[Lease] = field(default_factory=list)
    turn: Optional[object] = None  # the core's Turn while a generate waits or runs
    created_at: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)
    # The task writing it to the store or reading it back (state spilling or restoring).
    moving: Optional[asyncio.Task] = None
    stored: Optional[StoredInfo] = None  # set while it is stored
    # An idle spill that failed is not tried again before this (time.monotonic()).
    spill_retry_at: float = 0.0

    @property
    def idle(self) -> bool:
        """Nothing holds it: it may be evicted."""
        return not self.leases and self.turn is None

    def holders(self) -> str:
        return ", ".join(lease.holder for lease in self.leases)


class Registry:
    """Sessions by id, with leases; remembers (boundedly) why removed sessions went."""

    def __init__(self, remembered_removals: int = 1024):
        self.entries: dict[str, Entry] = {}
        self._gone: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._remembered = remembered_removals

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self.entries

    def add(self, session_id: str, pooled: bool = False, state: str = RESIDENT) -> Entry:
        entry = self.entries[session_id] = Entry(session_id, pooled=pooled, state=state)
        return entry

    def get(self, session_id) -> Entry:
        """The entry, or NotFoundError saying why the session is gone (when the daemon removed it)."""
        entry = self.entries.get(session_id) if isinstance(session_id, str) else None
        if entry is None:
            why = self._gone.get(session_id) if isinstance(session_id, str) else None
            if why is not None:
                raise NotFoundError(f"session {quote(session_id)} was {why}")
            raise NotFoundError(f"no session {quote(session_id)} (it was closed, evicted, or never existed)")
        return entry

    def remove(self, session_id: str, why: Optional[str] = None) -> None:
        """Forget a session; `why` (e.g. "closed after idle_ttl_s=60 without use") is told to later requests."""
        self.entries.pop(session_id, None)
        if why is not None:
            self._gone[session_id] = why
            while len(self._gone) > self._remembered:
                self._gone.popitem(last=False)

    def acquire(self, session_id: str, holder: str, exclusive: bool = False, use: bool = True) -> Lease:
        """A lease on the session; NotFoundError if it is gone, BusyError if the holds conflict.

        `use`: whether this hold counts as a use (a save does not restart the idle time).
        """
        entry = self.get(session_id)
        held_exclusively = any(lease.exclusive for lease in entry.leases)
        if held_exclusively or (exclusive and (entry.leases or entry.turn is not None)):
            raise BusyError(
                f"session {quote(session_id)} is in use by {entry.holders() or 'a generation'}; "
                "try again when it is done"
            )
        lease = Lease(entry, holder, exclusive, use=use)
        entry.leases.append(lease)
        if use:
            entry.last_used = time.monotonic()
        return lease

    def leases_held(self) -> int:
        return sum(len(e.leases) for e in self.entries.values())

    def idle(self) -> list[Entry]:
        """Entries nothing holds, least recently used first."""
        return sorted((e for e in self.entries.values() if e.idle), key=lambda e: e.last_used)
