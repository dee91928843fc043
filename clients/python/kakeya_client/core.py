"""The sans-I/O core of a connection to the daemon, shared by the blocking and the asyncio client.

It owns what does not depend on how bytes move: request ids, routes (where the
frames of each request in flight go), decoding and routing what the daemon sends,
failing every waiting request at once when the connection ends, and turning a
generate's frames into typed events. A client feeds it the bytes it reads and
gives it a route object (a queue of its own kind) for each request.
"""

import itertools
from pathlib import Path
from typing import Callable, Optional, Protocol, Union

from kakeya_protocol import (
    MAX_FRAME_BYTES,
    ErrorReply,
    EventMessage,
    FrameDecoder,
    Reply,
    encode_frame,
    parse_server_message,
)
from kakeya_protocol import ProtocolError as FramingError

from .errors import InvalidArgument, KakeyaError, ProtocolError, connection_lost, error_from
from .events import DoneEvent, Event, event_from

ServerMessage = Union[Reply, ErrorReply, EventMessage]


class Route(Protocol):
    """Where the frames of one request go: a queue of the client's kind."""

    def put(self, item: Union[ServerMessage, KakeyaError]) -> Optional[bool]:
        """Take a frame or the connection's failure; True when the route wants no more (the core drops it)."""


def ends_request(message: ServerMessage) -> bool:
    """Whether this is the last frame of its request (a reply, or a generate's done event)."""
    return not isinstance(message, EventMessage) or message.event == "done"


class ClientCore:
    """Ids, routes and failure of one connection; no sockets, no threads, no event loop."""

    def __init__(self, socket_path: Path):
        self.socket_path = socket_path
        self.failure: Optional[KakeyaError] = None
        self.max_frame_bytes = MAX_FRAME_BYTES
        self._ids = itertools.count(1)
        self._routes: dict[int, Route] = {}
        self._decoder = FrameDecoder()

    def next_id(self) -> int:
        return next(self._ids)

    def check(self) -> None:
        """Raise the connection's failure, if it has one."""
        if self.failure is not None:
            raise self.failure.with_traceback(None)

    def open(self, route: Route) -> int:
        """A new request id whose frames go to `route`."""
        self.check()
        rid = self.next_id()
        self._routes[rid] = route
        return rid

    def reroute(self, rid: int, route: Route) -> None:
        """Send the rest of request `rid`'s frames to `route` (e.g. one that drains an abandoned generate)."""
        self._routes[rid] = route

    def close(self, rid: int) -> Optional[Route]:
        return self._routes.pop(rid, None)

    def frame(self, rid: int, method: str, params: dict) -> bytes:
        """The bytes of a request; InvalidArgument when it does not fit the announced frame limit."""
        self.check()
        try:
            return encode_frame({"id": rid, "method": method, "params": params}, self.max_frame_bytes)
        except FramingError as exc:
            raise InvalidArgument(f"{method}: the request does not fit in one frame: {exc}") from None

    def said_hello(self, server_info: dict) -> None:
        """The announced frame limit holds both ways from now on."""
        self.max_frame_bytes = server_info.get("limits", {}).get("max_frame_bytes", MAX_FRAME_BYTES)
        self._decoder.max_frame_bytes = self.max_frame_bytes

    def received(self, data: bytes) -> None:
        """Route every frame `data` completes; a bad frame fails the connection."""
        try:
            messages = [parse_server_message(m) for m in self._decoder.feed(data)]
        except FramingError as exc:
            self.fail(connection_lost(self.socket_path, f"the daemon sent a bad frame: {exc}"))
            return
        for message in messages:
            self._route(message)

    def ended(self, why: Optional[str] = None) -> None:
        """The byte stream ended (EOF, or `why`): fail every request still waiting."""
        if why is None:
            why = "the daemon closed the connection"
            if self._decoder.buffered:
                why += " in the middle of a frame"
        self.fail(connection_lost(self.socket_path, why))

    def _route(self, message: ServerMessage) -> None:
        if message.id is None:
            # An error about the connection itself (e.g. a refused peer); the daemon closes it next.
            self.fail(error_from(message.code, message.message))
            return
        route = self._routes.get(message.id)
        if route is not None and route.put(message):  # else: a reply nobody waits for any more
            self._routes.pop(message.id, None)

    def fail(self, error: KakeyaError) -> None:
        """Remember the first failure and hand it to every route."""
        if self.failure is None:
            self.failure = error
        routes, self._routes = self._routes, {}
        for route in routes.values():
            route.put(self.failure)


def result_of(method: str, item: Union[ServerMessage, KakeyaError]) -> dict:
    """The result of a plain (non-streaming) request, or its error raised as a typed exception."""
    if isinstance(item, KakeyaError):
        raise item.with_traceback(None)
    if isinstance(item, ErrorReply):
        raise error_from(item.code, item.message)
    if isinstance(item, EventMessage):
        raise ProtocolError(f"the daemon sent a {item.event!r} event in reply to {method}")
    return item.result


class GenerateState:
    """Where a generate stands, whichever client reads it: its done event once it came, and whether it is over.

    `on_finish` runs once, when the stream is over (its done event, an error, or `finish()`).
    """

    def __init__(self, on_finish: Callable[[], None]):
        self.done: Optional[DoneEvent] = None
        self.finished = False
        self._on_finish = on_finish

    def finish(self) -> None:
        if not self.finished:
            self.finished = True
            self._on_finish()

    def take(self, item: Union[ServerMessage, KakeyaError]) -> Optional[Event]:
        """The typed event of one of the generate's frames (None for an event this client does not know).

        Raises the generate's error: a refusal before it started, or the connection's failure.
        """
        try:
            if isinstance(item, KakeyaError):
                raise item.with_traceback(None)
            if isinstance(item, ErrorReply):
                raise error_from(item.code, item.message)
            if not isinstance(item, EventMessage):
                raise ProtocolError("the daemon answered generate with a plain result instead of events")
        except KakeyaError:
            self.finish()
            raise
        event = event_from(item)
        if isinstance(event, DoneEvent):
            self.done = event
            self.finish()
        return event


class SessionHandle:
    """What both clients' session objects are: a client and a daemon-issued session id."""

    def __init__(self, client, session_id: str):
        self.client = client
        self.id = session_id

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.id!r})"
