"""The daemon's side of the session store: sessions that leave memory, and come back exactly.

- Spill: a session that must leave memory (idle_ttl_s, memory_budget_bytes,
  max_sessions) is written to the store and its memory freed; its registry entry
  stays, state "stored", and the next request naming it restores it.
- Stop and start: a requested stop saves every live session, most recently used
  first, for at most stop_save_s; the next start lists the store and enters each
  such session as stored, so its id stays valid.
- Named saves: a session saved under a name, restored later as a new session
  (a fork of the conversation), or deleted.

File names keep the two kinds apart: a live session's file is named by its id (16
hex digits), a named save `saved.<name>`. A live session's file is deleted once
the session is back in memory: from then on memory holds the only copy, so a
daemon killed later never brings back an older state of a conversation that went
on after it. Pooled HTTP sessions never come here (see docs/daemon.md).

The core decides when a session moves and holds the registry's state changes; this
module does the moving, keeps what is known of stored sessions, and turns store
errors into replies that name the session.
"""

import asyncio
import contextlib
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from kakeya_mlx.engine import Engine
from kakeya_mlx.errors import (
    CorruptSessionError,
    EngineError,
    FingerprintMismatchError,
    InvalidArgumentError,
    NotFoundError,
    StoreError,
)
from kakeya_mlx.store import SessionStore
from kakeya_protocol.messages import check_saved_name
from kakeya_protocol.quote import quote

from .counters import Counters
from .lifecycle import StartError, StoreLock
from .registry import RESIDENT, STORED, Entry, Registry, StoredInfo

log = logging.getLogger("kakeya.daemon")

# The engine issues 16 hex digits (Engine.create_session); only such files are live sessions.
LIVE_NAME = re.compile(r"^[0-9a-f]{16}$")
SAVED_PREFIX = "saved."


@dataclass(frozen=True)
class StoreSettings:
    """The store's slice of DaemonConfig."""

    directory: Optional[Path]  # None: the store's default (beside converted models)
    max_bytes: int
    eviction: str  # "spill" or "destroy"
    stop_save_s: float


def open_store(settings: StoreSettings) -> tuple[Optional[SessionStore], Optional[StoreLock], Optional[str]]:
    """(store, its lock, None), or (None, None, why) when the store cannot be used.

    Without a store the daemon keeps sessions in memory only: it destroys instead
    of spilling, saves nothing at a stop, and refuses the named-save verbs with `why`.
    """
    try:
        store = SessionStore(settings.directory, settings.max_bytes, cap_name="store_max_bytes")
    except StoreError as exc:
        return None, None, exc.message
    except OSError as exc:  # e.g. a parent directory this user may not enter
        return None, None, f"cannot use session store directory {settings.directory}: {exc.strerror or exc}"
    lock = StoreLock(store.directory)
    try:
        lock.acquire()
    except StartError as exc:
        return None, None, str(exc)
    return store, lock, None


def saved_file(name: str) -> str:
    """The store's name for a named save; InvalidArgumentError naming `name` when it is not one."""
    problem = check_saved_name(name)
    if problem is not None:
        raise InvalidArgumentError(f"name={quote(name)}: {problem}")
    return SAVED_PREFIX + name


class StoredSessions:
    """Spills, restores, saves at a stop, adopts at a start, and the named saves, over one store."""

    def __init__(
        self,
        engine: Engine,
        registry: Registry,
        counters: Counters,
        settings: StoreSettings,
        store: Optional[SessionStore],
        unavailable: Optional[str] = None,
    ):
        self.engine = engine
        self.registry = registry
        self.counters = counters
        self.settings = settings
        self.store = store
        self.unavailable = unavailable  # why there is no store, when there is none

    @property
    def spills(self) -> bool:
        """Whether sessions leaving memory go to the store (else they are destroyed)."""
        return self.store is not None and self.settings.eviction == "spill"

    @property
    def eviction(self) -> str:
        """What leaving memory means here: "spill" or "destroy" (spill falls back to it without a store)."""
        return "spill" if self.spills else "destroy"

    @property
    def max_bytes(self) -> int:
        """The store's cap; 0 without a store."""
        return self.settings.max_bytes if self.store is not None else 0

    def _require(self) -> SessionStore:
        if self.store is None:
            raise InvalidArgumentError(f"this daemon has no session store: {self.unavailable}")
        return self.store

    # ---- start -----------------------------------------------------------

    async def adopt(self) -> None:
        """Enter every live session the store holds as stored: its id is valid again, its file read on first use."""
        if self.store is None:
            return
        found = await asyncio.to_thread(self._scan)
        for name, nbytes, stored_at, info in found:
            if name not in self.registry:
                entry = self.registry.add(name, state=STORED)
                entry.stored = StoredInfo(info, nbytes, stored_at)
        if found:
            log.info(
                "the session store %s holds %d session(s) from before (%d bytes); "
                "each is restored on its first request",
                self.store.directory,
                len(found),
                sum(f[1] for f in found),
            )

    def _scan(self) -> list[tuple[str, int, float, Optional[dict]]]:
        out = []
        for stored in self._files():
            if LIVE_NAME.match(stored.name):
                out.append((stored.name, stored.nbytes, stored.last_used_at, self._described_info(stored.name)))
        return out

    def _described_info(self, name: str) -> Optional[dict]:
        try:
            extra = self.store.describe(name).get("extra")
        except EngineError as exc:
            log.warning("stored session %s: %s (it is refused if a request asks for it)", name, exc.message)
            return None
        info = extra.get("session") if isinstance(extra, dict) else None
        return info if isinstance(info, dict) else None

    # ---- leaving memory and coming back ---------------------------------

    async def spill(self, entry: Entry, reason: str, lost_why: str, forced: bool) -> bool:
        """Write a spilling session to the store and free its memory; True once it is stored.

        When the write fails, the session stays in memory (False), unless `forced`
        (memory needs the room): then it is closed and later requests hear
        `lost_why` and the failure. Never raises.
        """
        sid = entry.id
        try:
            info = await self.engine.session_info(sid)
            info["generating"] = False
            t0 = time.perf_counter()
            saved = await self.engine.save_session(sid, name=sid, extra={"session": info, "reason": reason})
            seconds = time.perf_counter() - t0
        except Exception as exc:  # an engine or store error, or a bug: the session must not vanish silently
            message = exc.message if isinstance(exc, EngineError) else f"{type(exc).__name__}: {exc}"
            self.counters.store["spill_failures"] += 1
            if not forced:
                log.warning("session %s stays in memory: writing it to the session store failed: %s", sid, message)
                return False
            self.registry.remove(sid, f"{lost_why}, and writing it to the session store failed ({message}): it is lost")
            self.counters.store["lost"] += 1
            log.warning("session %s lost: %s; writing it to the session store failed: %s", sid, reason, message)
            with contextlib.suppress(NotFoundError):
                await self.engine.close_session(sid)
            return False
        self.forget_removed(saved.evicted)
        with contextlib.suppress(NotFoundError):
            await self.engine.close_session(sid)
        entry.stored = StoredInfo(info, saved.nbytes, time.time())
        entry.state = STORED
        self.counters.store["spilled"] += 1
        log.info("session %s moved to the session store (%s): %d bytes in %.3fs", sid, reason, saved.nbytes, seconds)
        return True

    async def restore(self, entry: Entry) -> dict:
        """Bring a restoring session back into memory under its id; the reply's `restored` map.

        Its file is deleted once it is back. A damaged file or one made for another
        model or cache is refused naming the session and why; the file stays (a
        daemon serving that model restores it; close_session removes it).
        """
        store = self._require()
        sid = entry.id
        t0 = time.perf_counter()
        try:
            restored = await self.engine.restore_session(sid)
        except NotFoundError:
            why = f"stored, but its file is no longer in the session store {store.directory}"
            self.registry.remove(sid, why)
            raise NotFoundError(f"session {quote(sid)} was {why}") from None
        except EngineError as exc:
            raise refused(f"session {quote(sid)}", exc, "close_session") from None
        seconds = time.perf_counter() - t0
        if restored.session_id != sid:  # a file renamed from another live session's, checksum intact
            with contextlib.suppress(NotFoundError):
                await self.engine.close_session(restored.session_id)
            raise NotFoundError(
                f"session {quote(sid)} is stored but cannot be restored: its file holds session "
                f"{quote(restored.session_id)}; close_session removes it"
            )
        nbytes = entry.stored.nbytes if entry.stored is not None else 0
        entry.state, entry.stored = RESIDENT, None
        entry.last_used = time.monotonic()
        await self._delete_quietly(sid)
        self.counters.store["restored"] += 1
        log.info("session %s restored from the session store in %.3fs", sid, seconds)
        return {"restore_s": seconds, "stored_bytes": nbytes}

    async def discard(self, entry: Entry) -> None:
        """Delete a stored session's file (close_session of a stored session: nothing is read back)."""
        if self.store is not None:
            await self._delete_quietly(entry.id)

    async def _delete_quietly(self, name: str) -> None:
        try:
            await asyncio.to_thread(self.store.delete, name)
        except NotFoundError:
            pass
        except EngineError as exc:
            log.warning("cannot delete %s from the session store: %s", name, exc.message)

    def forget_removed(self, names: tuple) -> None:
        """Files the store removed to stay under its cap: their stored sessions are gone, and say so."""
        cap = f"store_max_bytes={self.settings.max_bytes}"
        for name in names:
            entry = self.registry.entries.get(name)
            if entry is not None and entry.state == STORED:
                why = f"removed from the session store (least recently used) to keep it under {cap}"
                self.registry.remove(name, why)
            self.counters.store["removed"] += 1
            log.info("%s removed from the session store (least recently used) to keep it under %s", name, cap)

    # ---- a requested stop --------------------------------------------------

    async def save_at_stop(self, live: list[Entry]) -> None:
        """Save `live` sessions (most recently used first) for at most stop_save_s; the log says what and how long."""
        if not live:
            return
        if self.store is None or self.settings.stop_save_s <= 0:
            why = f"no session store: {self.unavailable}" if self.store is None else "stop_save_s=0"
            log.info("%d session(s) end with the daemon (%s)", len(live), why)
            return
        bound = self.settings.stop_save_s
        where = self.store.directory
        log.info("saving %d session(s) to the session store %s (at most stop_save_s=%g)", len(live), where, bound)
        t0 = time.monotonic()
        saved, nbytes, unsaved = 0, 0, []
        for entry in live:
            remaining = t0 + bound - time.monotonic()
            if remaining <= 0:
                unsaved.append(entry.id)
                continue
            try:
                info = await self.engine.session_info(entry.id)
                info["generating"] = False
                save = self.engine.save_session(entry.id, name=entry.id, extra={"session": info, "reason": "stop"})
                # The write goes on in its thread when the bound passes: its file then appears whole or not at all.
                done = await asyncio.wait_for(asyncio.shield(asyncio.ensure_future(save)), remaining)
            except asyncio.TimeoutError:
                unsaved.append(entry.id)
                continue
            except EngineError as exc:
                log.warning("session %s not saved: %s", entry.id, exc.message)
                unsaved.append(entry.id)
                continue
            self.forget_removed(done.evicted)
            saved += 1
            nbytes += done.nbytes
        log.info("saved %d session(s), %d bytes, in %.2fs", saved, nbytes, time.monotonic() - t0)
        if unsaved:
            log.warning(
                "%d session(s) not saved (stop_save_s=%g ran out, or saving failed): %s",
                len(unsaved),
                bound,
                ", ".join(unsaved),
            )

    # ---- named saves -------------------------------------------------------

    async def save_named(self, session_id: str, name: str) -> dict:
        """Save a resident session under `name` (replacing an earlier save of that name); it stays in memory."""
        self._require()
        file = saved_file(name)
        info = await self.engine.session_info(session_id)
        info["generating"] = False
        t0 = time.perf_counter()
        saved = await self.engine.save_session(session_id, name=file, extra={"session": info})
        seconds = time.perf_counter() - t0
        self.forget_removed(saved.evicted)
        log.info("session %s saved as %s: %d bytes in %.3fs", session_id, quote(name), saved.nbytes, seconds)
        return {"name": name, "stored_bytes": saved.nbytes, "save_s": seconds}

    async def restore_named(self, name: str) -> tuple[str, dict]:
        """A new session holding the conversation saved as `name`: (its id, the reply's `restored` map)."""
        store = self._require()
        file = saved_file(name)
        t0 = time.perf_counter()
        try:
            restored = await self.engine.restore_session(file, fork=True)
        except NotFoundError:
            raise NotFoundError(f"no saved session {quote(name)} in the session store {store.directory}") from None
        except EngineError as exc:
            raise refused(f"saved session {quote(name)}", exc, "delete_saved") from None
        seconds = time.perf_counter() - t0
        nbytes = 0
        with contextlib.suppress(OSError):
            nbytes = store.path(file).stat().st_size
        log.info("saved session %s restored as session %s in %.3fs", quote(name), restored.session_id, seconds)
        return restored.session_id, {"restore_s": seconds, "stored_bytes": nbytes}

    async def delete_named(self, name: str) -> None:
        store = self._require()
        file = saved_file(name)
        try:
            await asyncio.to_thread(store.delete, file)
        except NotFoundError:
            raise NotFoundError(f"no saved session {quote(name)} in the session store {store.directory}") from None

    async def list_named(self) -> list[dict]:
        """The named saves, most recently used first: name, bytes, when saved, history length, the session saved."""
        if self.store is None:
            return []
        return await asyncio.to_thread(self._named)

    def _named(self) -> list[dict]:
        out = []
        for stored in self._files():
            if not stored.name.startswith(SAVED_PREFIX):
                continue
            item = {"name": stored.name[len(SAVED_PREFIX) :], "stored_bytes": stored.nbytes}
            try:
                header = self.store.describe(stored.name)
            except EngineError as exc:
                item["error"] = exc.message
            else:
                info = header.get("extra", {}).get("session") if isinstance(header.get("extra"), dict) else None
                item["saved_at"] = header.get("saved_at")
                item["history_length"] = header.get("history_length")
                if isinstance(info, dict):
                    item["from_session"] = info.get("session_id")
            out.append(item)
        return out

    # ---- stats -------------------------------------------------------------

    def _files(self) -> list:
        """The store's files; none while its directory cannot be read (the next write says why)."""
        if self.store is None:
            return []
        try:
            return self.store.sessions()
        except OSError:
            return []

    def stats(self) -> dict:
        """The `stats` reply's "store" map."""
        files = self._files()
        counts = self.counters.store
        return {
            "enabled": self.store is not None,
            "directory": str(self.store.directory) if self.store is not None else "",
            "eviction": self.eviction,
            "max_bytes": self.max_bytes,
            "bytes": sum(f.nbytes for f in files),
            "stored_sessions": sum(1 for f in files if LIVE_NAME.match(f.name)),
            "saved_sessions": sum(1 for f in files if f.name.startswith(SAVED_PREFIX)),
            **{key: counts[key] for key in ("spilled", "restored", "spill_failures", "lost", "removed")},
        }


def refused(what: str, exc: EngineError, remover: str) -> EngineError:
    """A store error as a reply naming `what`: damaged -> not_found, made elsewhere -> invalid_argument.

    `remover`: the request that deletes the file, which is kept until then.
    """
    if isinstance(exc, CorruptSessionError):
        return NotFoundError(f"{what} is stored but cannot be restored: {exc.message}; {remover} removes its file")
    if isinstance(exc, FingerprintMismatchError):
        return FingerprintMismatchError(
            f"{what} is stored but cannot be restored by this daemon: {exc.message}; "
            "a daemon serving the model and cache it was made with restores it",
            exc.differences,
        )
    return exc
