"""A turn of one session as the event loop sees it: the state the compute thread
hands events to, and the stream a caller iterates.

The compute thread calls `TurnState.deliver` with each step's events; they cross
to the event loop with `call_soon_threadsafe`, so the loop alone touches the queue.
"""

import asyncio
import time
import weakref
from typing import Optional

from .events import DoneEvent
from .session import Session


class TurnState:
    """A turn's state, shared by the compute thread (which delivers events) and the loop."""

    def __init__(self, session: Session):
        self.session = session
        self.done: Optional[DoneEvent] = None
        self.loop = asyncio.get_running_loop()
        # Bounded by the turn itself: at most max_tokens token events, a truncated
        # event per block, and one done event.
        self.events: asyncio.Queue = asyncio.Queue()
        self.ended = asyncio.Event()
        self.on_done = None

    def cancel(self) -> None:
        if not self.ended.is_set():
            self.session.cancel_requested.set()

    def deliver(self, events: list) -> None:
        """Called on the compute thread with one step's events; hands them to the loop."""
        self.loop.call_soon_threadsafe(self._receive, events)

    def _receive(self, events: list) -> None:
        for event in events:
            self.events.put_nowait(event)
            if isinstance(event, DoneEvent):
                if self.on_done is not None:
                    self.on_done(event)
                self.finish(event)

    def finish(self, done: Optional[DoneEvent] = None) -> None:
        """The compute thread has let go of the session: free it and wake every waiter."""
        self.done = done
        session = self.session
        if session.turn is self:
            session.turn = None
        session.last_used_at = time.time()
        self.ended.set()


class TurnStream:
    """A running turn of one session: an async iterator of its events, and its end as an awaitable.

    The turn ends (`ended()` returns) once the compute thread has let go of the
    session; its DoneEvent is queued at that same moment. `cancel()` is the one
    way to stop a turn; `aclose()` cancels and waits. A stream dropped unread
    cancels its turn.
    """

    def __init__(self, turn: TurnState):
        self.session_id = turn.session.id
        self._turn = turn
        weakref.finalize(self, turn.cancel)

    @property
    def done(self) -> Optional[DoneEvent]:
        """The turn's DoneEvent once it has ended, else None."""
        return self._turn.done

    @property
    def is_ended(self) -> bool:
        return self._turn.ended.is_set()

    def cancel(self) -> None:
        """Ask the turn to stop (idempotent); it still ends with a DoneEvent."""
        self._turn.cancel()

    async def ended(self) -> None:
        """Wait until the turn has ended and the session is free."""
        await self._turn.ended.wait()

    def __aiter__(self) -> "TurnStream":
        return self

    async def __anext__(self):
        turn = self._turn
        if turn.events.empty() and turn.ended.is_set():
            raise StopAsyncIteration
        return await turn.events.get()

    async def aclose(self) -> None:
        """Cancel the turn if it is still running and wait for its end."""
        self.cancel()
        await self.ended()


async def cancel_and_wait(session: Session) -> None:
    """Cancel the session's turn, if any, and wait until the compute thread lets go of it."""
    turn = session.turn
    if turn is not None:
        turn.cancel()
        await turn.ended.wait()
