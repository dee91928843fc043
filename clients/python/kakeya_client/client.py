"""The blocking client: one Unix-socket connection, a reader thread routing frames by request id."""

import itertools
import queue
import socket
import threading
from pathlib import Path
from typing import Iterator, Optional, Union

from kakeya_protocol import (
    MAX_FRAME_BYTES,
    ErrorReply,
    EventMessage,
    FrameDecoder,
    encode_frame,
    parse_server_message,
)
from kakeya_protocol import ProtocolError as FramingError

from .errors import (
    InvalidArgument,
    KakeyaError,
    NotFound,
    ProtocolError,
    Timeout,
    connect_failed,
    connection_lost,
    error_from,
    no_answer,
    not_taken,
)
from .events import DoneEvent, Event, TokensEvent, event_from
from .wire import append_params, generate_params, hello_params, resolve_socket_path, result_of, token_list

_DEFAULT = object()  # "use the client's timeout"


class Client:
    """A connection to the kakeya daemon. Thread-safe; use as a context manager.

    `timeout` bounds every wait for the daemon: each reply, and each event of a
    generate (None waits forever). Raises ConnectionFailed when no daemon runs
    at `socket_path` (default: `default_socket_path()`).
    """

    def __init__(self, socket_path: Union[str, Path, None] = None, timeout: Optional[float] = 30.0):
        self.socket_path = resolve_socket_path(socket_path)
        self.timeout = timeout
        self.server_info: dict = {}
        self._ids = itertools.count(1)
        self._routes: dict[int, queue.SimpleQueue] = {}
        self._lock = threading.Lock()  # guards _routes and _failure
        self._send_lock = threading.Lock()
        self._failure: Optional[KakeyaError] = None
        self._max_frame_bytes = MAX_FRAME_BYTES
        self._decoder = FrameDecoder()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.settimeout(timeout)
            self._sock.connect(str(self.socket_path))
        except OSError as exc:
            self._sock.close()
            raise connect_failed(self.socket_path, exc) from None
        self._reader = threading.Thread(target=self._read_forever, name="kakeya-client-reader", daemon=True)
        self._reader.start()
        try:
            self.server_info = self.call("hello", hello_params())
        except BaseException:
            self.close()
            raise
        self._max_frame_bytes = self.server_info.get("limits", {}).get("max_frame_bytes", MAX_FRAME_BYTES)
        self._decoder.max_frame_bytes = self._max_frame_bytes  # the announced limit holds both ways

    # ---- the connection --------------------------------------------------

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection. Generations still running on it are cancelled by the daemon."""
        with self._lock:
            if self._failure is None:
                self._failure = connection_lost(self.socket_path, "the client was closed")
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        if threading.current_thread() is not self._reader:
            self._reader.join(timeout=5)

    @property
    def closed(self) -> bool:
        return self._failure is not None

    def _read_forever(self) -> None:
        why = "the daemon closed the connection"
        try:
            while True:
                try:
                    data = self._sock.recv(1 << 16)
                except socket.timeout:
                    continue  # idle; the timeout is for callers, not for the reader
                if not data:
                    if self._decoder.buffered:
                        why = "the daemon closed the connection in the middle of a frame"
                    break
                for message in self._decoder.feed(data):
                    self._route(parse_server_message(message))
        except FramingError as exc:
            why = f"the daemon sent a bad frame: {exc}"
        except OSError as exc:
            why = str(exc.strerror or exc)
        self._fail(connection_lost(self.socket_path, why))

    def _route(self, message) -> None:
        if message.id is None:
            # An error about the connection itself (e.g. refused peer); the daemon closes it next.
            self._fail(error_from(message.code, message.message))
            return
        with self._lock:
            route = self._routes.get(message.id)
        if route is not None:  # else: a reply nobody waits for any more (timed out, abandoned)
            route.put(message)

    def _fail(self, error: KakeyaError) -> None:
        with self._lock:
            if self._failure is None:
                self._failure = error
            routes = list(self._routes.values())
        for route in routes:
            route.put(self._failure)

    def _open_route(self) -> tuple[int, queue.SimpleQueue]:
        with self._lock:
            if self._failure is not None:
                raise self._failure.with_traceback(None)
            rid = next(self._ids)
            route = self._routes[rid] = queue.SimpleQueue()
        return rid, route

    def _close_route(self, rid: int) -> None:
        with self._lock:
            self._routes.pop(rid, None)

    def _send(self, rid: int, method: str, params: dict) -> None:
        try:
            frame = encode_frame({"id": rid, "method": method, "params": params}, self._max_frame_bytes)
        except FramingError as exc:
            raise InvalidArgument(f"{method}: the request does not fit in one frame: {exc}") from None
        with self._send_lock:
            try:
                self._sock.sendall(frame)
            except socket.timeout:
                # Part of a frame may be out: the stream can no longer be trusted.
                error = not_taken(method, self.socket_path, self.timeout)
                self._fail(error)
                self.close()
                raise error from None
            except OSError as exc:
                if self._failure is not None:
                    raise self._failure.with_traceback(None) from None
                raise connection_lost(self.socket_path, str(exc.strerror or exc)) from None

    def _wait(self, route: queue.SimpleQueue, method: str, timeout):
        timeout = self.timeout if timeout is _DEFAULT else timeout
        try:
            item = route.get(timeout=timeout)
        except queue.Empty:
            raise no_answer(method, self.socket_path, timeout) from None
        if isinstance(item, KakeyaError):
            raise item.with_traceback(None)
        return item

    # ---- requests --------------------------------------------------------

    def call(self, method: str, params: Optional[dict] = None, *, timeout=_DEFAULT) -> dict:
        """Send any request and return its result; daemon errors raise typed exceptions."""
        rid, route = self._open_route()
        try:
            self._send(rid, method, params or {})
            return result_of(method, self._wait(route, method, timeout))
        finally:
            self._close_route(rid)

    def _send_and_forget(self, method: str, params: dict) -> None:
        """Send a request whose reply is dropped on arrival."""
        with self._lock:
            rid = next(self._ids)
        self._send(rid, method, params)

    def create_session(self) -> "Session":
        """A new, empty session on the daemon."""
        return Session(self, self.call("create_session")["session_id"])

    def session(self, session_id: str) -> "Session":
        """A handle on an existing session (made on any connection); nothing is checked until it is used."""
        return Session(self, session_id)

    def list_sessions(self) -> list[dict]:
        return self.call("list_sessions")["sessions"]

    def stats(self) -> dict:
        return self.call("stats")

    def tokenize(self, text: str) -> list[int]:
        return self.call("tokenize", {"text": text})["tokens"]

    def detokenize(self, tokens) -> str:
        return self.call("detokenize", {"tokens": token_list(tokens)})["text"]

    def shutdown(self) -> None:
        """Ask the daemon to stop gracefully (in-flight generations end as "cancelled")."""
        self.call("shutdown")


class Session:
    """One session on the daemon: an append-only token history with its resident cache."""

    def __init__(self, client: Client, session_id: str):
        self.client = client
        self.id = session_id

    def __repr__(self) -> str:
        return f"Session({self.id!r})"

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        if not self.client.closed:
            try:
                self.close()
            except NotFound:
                pass

    def append(self, tokens=None, text=None, messages=None, add_generation_prompt: bool = True) -> dict:
        """Add exactly one of token ids, text, or chat messages (rendered with the model's chat template).
        Returns {"appended": n, "history_length": n}."""
        return self.client.call("append", append_params(self.id, tokens, text, messages, add_generation_prompt))

    def generate(self, timeout=_DEFAULT, **params) -> "GenerateStream":
        """Stream a turn's events: TokensEvent, TruncatedEvent, and always a final DoneEvent.

        params: max_tokens, temperature, top_p, top_k, min_p, repetition_penalty,
        seed, stop (None values take the daemon's defaults). `timeout` bounds the
        wait for each event. Leaving the loop early cancels the generation.
        """
        return GenerateStream(self.client, generate_params(self.id, params), timeout)

    def stream_text(self, timeout=_DEFAULT, **params) -> Iterator[str]:
        """Only the generated text, chunk by chunk; raises the error if the generation fails."""
        with self.generate(timeout, **params) as stream:
            for event in stream:
                if isinstance(event, TokensEvent) and event.text:
                    yield event.text
                elif isinstance(event, DoneEvent) and event.error is not None:
                    raise event.error

    def complete(self, timeout=_DEFAULT, **params) -> tuple[str, DoneEvent]:
        """Generate to the end; returns (text, done). Raises the error if the generation fails."""
        chunks = []
        with self.generate(timeout, **params) as stream:
            for event in stream:
                if isinstance(event, TokensEvent):
                    chunks.append(event.text)
        if stream.done.error is not None:
            raise stream.done.error
        return "".join(chunks), stream.done

    def cancel(self) -> bool:
        """Cancel this session's running generation, from whichever connection started it."""
        return self.client.call("cancel", {"session_id": self.id})["cancelled"]

    def info(self) -> dict:
        return self.client.call("session_info", {"session_id": self.id})

    def close(self) -> None:
        """Close the session on the daemon, freeing its cache."""
        self.client.call("close_session", {"session_id": self.id})


class GenerateStream:
    """The events of one generate request. Iterate it; `done` holds the DoneEvent once it arrives.

    Closing it early (break, close(), the context manager, or garbage collection)
    sends cancel and reads on to the done event, so the session is free afterwards.
    """

    def __init__(self, client: Client, params: dict, timeout):
        self.client = client
        self.timeout = timeout
        self.done: Optional[DoneEvent] = None
        self.request_id, self._route = client._open_route()
        self._finished = False
        try:
            client._send(self.request_id, "generate", params)
        except BaseException:
            self._finish()
            raise

    def __iter__(self) -> "GenerateStream":
        return self

    def __next__(self) -> Event:
        while not self._finished:
            try:
                message = self.client._wait(self._route, "generate", self.timeout)
            except Timeout:
                raise  # still running: close() cancels it
            except KakeyaError:
                self._finish()
                raise
            if isinstance(message, ErrorReply):
                self._finish()
                raise error_from(message.code, message.message)
            if not isinstance(message, EventMessage):
                self._finish()
                raise ProtocolError("the daemon answered generate with a plain result instead of events")
            event = event_from(message)
            if isinstance(event, DoneEvent):
                self.done = event
                self._finish()
            if event is not None:
                return event
        raise StopIteration

    def cancel(self) -> bool:
        """Ask the daemon to stop; keep iterating to receive the remaining events and the done event."""
        if self._finished:
            return False
        return self.client.call("cancel", {"request_id": self.request_id})["cancelled"]

    def close(self) -> None:
        """Cancel the generation if it is still running and wait for its done event."""
        if self._finished:
            return
        if threading.current_thread() is self.client._reader:
            # Collected on the reader thread, which cannot wait for its own frames.
            self._finish()
            try:
                self.client._send_and_forget("cancel", {"request_id": self.request_id})
            except KakeyaError:
                pass
            return
        try:
            self.client._send_and_forget("cancel", {"request_id": self.request_id})
            for _ in self:
                pass
        except KakeyaError:
            pass  # the connection is gone or the daemon stopped answering: nothing left to wait for
        finally:
            self._finish()

    def _finish(self) -> None:
        if not self._finished:
            self._finished = True
            self.client._close_route(self.request_id)

    def __enter__(self) -> "GenerateStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_finished", True):
            self.close()
