"""The HTTP front's session pool: stateless requests that reuse resident caches.

A request's prompt is matched against the pool's idle sessions; the one whose
history is the longest prefix of it is leased (exclusively, for the request's
whole turn) and only the missing suffix is appended. Matching works at two levels.
Token level: a session whose whole history is a prefix of the prompt's tokens.
Text level: a session whose history came from text (the rendered chat prompt plus
the decoded reply) that is a prefix of the new prompt's text; the new prompt then
continues that exact history with only the remaining text tokenized, which keeps
chat turns cached even where re-tokenizing the model's own reply would split it
differently.

Pooled sessions are registry entries like any other (they count in max_sessions,
the governor may close them first when room is needed); the pool keeps at most
`http_max_sessions` of them. Any HTTP endpoint that runs turns uses this pool.
"""

import time
from dataclasses import dataclass, field
from typing import Optional

from kakeya_mlx.errors import BusyError, InvalidArgumentError, NotFoundError

from .admission import Refusal
from .core import DaemonCore
from .registry import Lease


@dataclass
class _Pooled:
    """What the pool knows of one of its sessions' history."""

    # Text whose tokenization, piece by piece, is the session's history; None when unknown.
    text: Optional[str]
    # Whether that text was tokenized with the tokenizer's special tokens (completions) or not (chat).
    add_special: bool
    # The history length `text` describes: a session appended to by anyone else no longer matches by text.
    length: int = 0
    last_used: float = field(default_factory=time.monotonic)


@dataclass
class Checkout:
    """A pooled session leased for one request, its history already extended to the prompt."""

    lease: Lease
    prompt_tokens: int
    text: Optional[str]
    reused: int = 0  # of the prompt's tokens, those the session held already

    @property
    def session_id(self) -> str:
        return self.lease.entry.id


class SessionPool:
    """At most `max_sessions` pooled sessions; longest-prefix reuse; the least recently used idle one goes first."""

    def __init__(self, core: DaemonCore, max_sessions: int):
        self.core = core
        self.max_sessions = max_sessions
        self._pooled: dict[str, _Pooled] = {}

    def __len__(self) -> int:
        self._prune()
        return len(self._pooled)

    def _prune(self) -> None:
        """Forget sessions the core closed (idle timeout, memory, max_sessions, a socket close_session)."""
        for sid in [s for s in self._pooled if s not in self.core.registry]:
            del self._pooled[sid]

    def _idle_ids(self) -> list[str]:
        entries = self.core.registry.entries
        return [sid for sid in self._pooled if sid in entries and entries[sid].idle]

    def _try_lease(self, session_id: str, holder: str) -> Optional[Lease]:
        try:
            return self.core.lease(session_id, holder, exclusive=True)
        except (BusyError, NotFoundError):
            return None  # taken or closed since it was matched

    async def checkout(self, text: Optional[str], tokens: Optional[list[int]], add_special: bool, holder: str) -> Checkout:
        """Lease a session whose history is the prompt: the longest matching one, extended, or a new one."""
        core = self.core
        if tokens is None:
            tokens = await core.tokenize(text, add_special_tokens=add_special)
            if not tokens:
                raise InvalidArgumentError("prompt: the prompt tokenizes to nothing")
        self._prune()
        sid, reused = core.longest_prefix(tokens, among=self._idle_ids())
        lease = None
        if text is not None:
            lease, tokens, reused = await self._text_match(text, add_special, tokens, reused, holder)
        if lease is None and sid is not None:
            lease = self._try_lease(sid, holder)
            if lease is not None and core.history(sid) != tokens[:reused]:
                lease.release()  # appended to by someone else meanwhile
                lease = None
        created = lease is None
        if created:
            await self._make_room()
            lease, reused = await core.create_pooled_session(holder), 0
            self._pooled[lease.entry.id] = _Pooled(None, add_special)
        try:
            if len(tokens) > reused:
                await core.append(lease, tokens=tokens[reused:])
        except BaseException:
            lease.release()
            if created:
                await core.evict_pooled(lease.entry.id, "closed: the request that made it failed")
            raise
        pooled = self._pooled[lease.entry.id]
        pooled.text, pooled.add_special, pooled.length = text, add_special, len(tokens)
        pooled.last_used = time.monotonic()
        return Checkout(lease, len(tokens), text, reused)

    async def _text_match(self, text: str, add_special: bool, tokens: list[int], reused: int, holder: str):
        """(lease, prompt tokens, reused) for the longest text-level match beating `reused` tokens, else (None, ...)."""
        best = None
        for sid in self._idle_ids():
            p = self._pooled[sid]
            if p.text is None or p.add_special != add_special or not text.startswith(p.text):
                continue
            if best is None or len(p.text) > len(self._pooled[best].text):
                best = sid
        if best is None or self._pooled[best].length <= reused:
            return None, tokens, reused
        lease = self._try_lease(best, holder)
        if lease is None:
            return None, tokens, reused
        history = self.core.history(best)
        match = self._pooled[best]
        if len(history) != match.length:  # a socket client appended to it: its text no longer describes it
            lease.release()
            return None, tokens, reused
        rest = text[len(match.text) :]
        try:
            extra = await self.core.tokenize(rest, add_special_tokens=False) if rest else []
        except BaseException:
            lease.release()
            raise
        return lease, history + extra, len(history)

    def release(self, checkout: Checkout, text: Optional[str], length: int) -> None:
        """Give the session back; `text` is the text of its first `length` history tokens (None if unknown)."""
        pooled = self._pooled.get(checkout.session_id)
        if pooled is not None:
            pooled.text, pooled.length = text, length
            pooled.last_used = time.monotonic()
        checkout.lease.release()

    async def _make_room(self) -> None:
        self._prune()
        while len(self._pooled) >= self.max_sessions:
            idle = self._idle_ids()
            if not idle:
                self.core.counters.rejections["http_max_sessions"] += 1
                raise Refusal(
                    "http_max_sessions",
                    f"all {self.max_sessions} sessions of the HTTP front are in use "
                    f"(http_max_sessions={self.max_sessions}); try again shortly",
                )
            victim = min(idle, key=lambda s: self._pooled[s].last_used)
            del self._pooled[victim]
            why = f"closed (least recently used) to make room under http_max_sessions={self.max_sessions}"
            await self.core.evict_pooled(victim, why)

