"""The blocking client: one Unix-socket connection, a reader thread feeding the shared sans-I/O core."""

import functools
import queue
import socket
import threading
from pathlib import Path
from typing import Iterator, Optional, Union

from .core import ClientCore, GenerateState, SessionHandle, result_of
from .errors import KakeyaError, NotFound, connect_failed, connection_lost, no_answer, not_taken
from .events import DoneEvent, Event, TokensEvent
from .wire import append_params, generate_params, hello_params, resolve_socket_path, token_list

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
        self._core = ClientCore(self.socket_path)
        self._lock = threading.Lock()  # the reader thread routes while callers open requests
        self._send_lock = threading.Lock()
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
        with self._lock:
            self._core.said_hello(self.server_info)

    # ---- the connection --------------------------------------------------

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection. Generations still running on it are cancelled by the daemon."""
        with self._lock:
            self._core.fail(connection_lost(self.socket_path, "the client was closed"))
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        if threading.current_thread() is not self._reader:
            self._reader.join(timeout=5)

    @property
    def closed(self) -> bool:
        return self._core.failure is not None

    def _read_forever(self) -> None:
        why = None
        try:
            while self._core.failure is None:
                try:
                    data = self._sock.recv(1 << 16)
                except socket.timeout:
                    continue  # idle; the timeout is for callers, not for the reader
                if not data:
                    break
                with self._lock:
                    self._core.received(data)
        except OSError as exc:
            why = str(exc.strerror or exc)
        with self._lock:
            self._core.ended(why)

    def _open(self) -> tuple[int, queue.SimpleQueue]:
        route = queue.SimpleQueue()
        with self._lock:
            return self._core.open(route), route

    def _close_route(self, rid: int) -> None:
        with self._lock:
            self._core.close(rid)

    def _send(self, rid: int, method: str, params: dict) -> None:
        with self._lock:
            frame = self._core.frame(rid, method, params)
        with self._send_lock:
            try:
                self._sock.sendall(frame)
            except socket.timeout:
                # Part of a frame may be out: the stream can no longer be trusted.
                error = not_taken(method, self.socket_path, self.timeout)
                with self._lock:
                    self._core.fail(error)
                self.close()
                raise error from None
            except OSError as exc:
                self._core.check()
                raise connection_lost(self.socket_path, str(exc.strerror or exc)) from None

    def _wait(self, route: queue.SimpleQueue, method: str, timeout):
        timeout = self.timeout if timeout is _DEFAULT else timeout
        try:
            return route.get(timeout=timeout)
        except queue.Empty:
            raise no_answer(method, self.socket_path, timeout) from None

    # ---- requests --------------------------------------------------------

    def call(self, method: str, params: Optional[dict] = None, *, timeout=_DEFAULT) -> dict:
        """Send any request and return its result; daemon errors raise typed exceptions."""
        rid, route = self._open()
        try:
            self._send(rid, method, params or {})
            return result_of(method, self._wait(route, method, timeout))
        finally:
            self._close_route(rid)

    def _send_and_forget(self, method: str, params: dict) -> None:
        """Send a request whose reply is dropped on arrival."""
        with self._lock:
            rid = self._core.next_id()
        self._send(rid, method, params)

    def create_session(self, **defaults) -> "Session":
        """A new, empty session on the daemon; `defaults` (speculative, num_draft_tokens) apply to its generates."""
        params = {k: v for k, v in defaults.items() if v is not None}
        return Session(self, self.call("create_session", params)["session_id"])

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


class Session(SessionHandle):
    """One session on the daemon: an append-only token history with its resident cache."""

    client: Client

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
        Returns {"appended": n, "history_length": n, "tokens": [the token ids appended]}."""
        return self.client.call("append", append_params(self.id, tokens, text, messages, add_generation_prompt))

    def generate(self, timeout=_DEFAULT, **params) -> "GenerateStream":
        """Stream a turn's events: TokensEvent, TruncatedEvent, and always a final DoneEvent.

        params: max_tokens, temperature, top_p, top_k, min_p, repetition_penalty,
        frequency_penalty, presence_penalty, seed, stop, constraint (e.g.
        {"type": "json_schema", "schema": {...}}), logprobs, top_logprobs (None
        values take the daemon's defaults; see protocol/SPEC.md). `timeout` bounds the
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
        self.request_id, self._route = client._open()
        self._state = GenerateState(functools.partial(client._close_route, self.request_id))
        try:
            client._send(self.request_id, "generate", params)
        except BaseException:
            self._state.finish()
            raise

    @property
    def done(self) -> Optional[DoneEvent]:
        return self._state.done

    def __iter__(self) -> "GenerateStream":
        return self

    def __next__(self) -> Event:
        while not self._state.finished:
            # A Timeout leaves the stream running: close() cancels it.
            event = self._state.take(self.client._wait(self._route, "generate", self.timeout))
            if event is not None:
                return event
        raise StopIteration

    def cancel(self) -> bool:
        """Ask the daemon to stop; keep iterating to receive the remaining events and the done event."""
        if self._state.finished:
            return False
        return self.client.call("cancel", {"request_id": self.request_id})["cancelled"]

    def close(self) -> None:
        """Cancel the generation if it is still running and wait for its done event."""
        if self._state.finished:
            return
        if threading.current_thread() is self.client._reader:
            # Collected on the reader thread, which cannot wait for its own frames.
            self._state.finish()
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
            self._state.finish()

    def __enter__(self) -> "GenerateStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        state = getattr(self, "_state", None)
        if state is not None and not state.finished:
            self.close()
