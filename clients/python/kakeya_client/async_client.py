"""The asyncio client: one connection, a reader task feeding the shared sans-I/O core, so any
number of requests (generations included) run concurrently on it."""

import asyncio
import functools
from pathlib import Path
from typing import Optional, Union

from .core import ClientCore, GenerateState, SessionHandle, ends_request, result_of
from .errors import KakeyaError, NotFound, Timeout, connect_failed, connection_lost, no_answer, not_taken
from .events import DoneEvent, Event, TokensEvent
from .wire import append_params, generate_params, hello_params, resolve_socket_path, token_list

_DEFAULT = object()  # "use the client's timeout"


class _Inbox:
    """The route of a request someone awaits: an asyncio queue."""

    def __init__(self):
        self.queue: asyncio.Queue = asyncio.Queue()

    def put(self, item) -> None:
        self.queue.put_nowait(item)


class _Drain:
    """The route of an abandoned generate: frames are dropped until its done event settles `ended`."""

    def __init__(self, ended: asyncio.Future):
        self.ended = ended

    def put(self, item) -> bool:
        if isinstance(item, KakeyaError) or ends_request(item):
            if not self.ended.done():
                self.ended.set_result(None)
            return True
        return False


class AsyncClient:
    """An asyncio connection to the kakeya daemon.

    `client = await AsyncClient.connect()` or `async with AsyncClient() as client:`.
    `timeout` bounds every wait for the daemon: each reply, and each event of a
    generate (None waits forever).
    """

    def __init__(self, socket_path: Union[str, Path, None] = None, timeout: Optional[float] = 30.0):
        self.socket_path = resolve_socket_path(socket_path)
        self.timeout = timeout
        self.server_info: dict = {}
        self._core = ClientCore(self.socket_path)
        self._settling: dict[str, asyncio.Future] = {}  # session id -> end of its abandoned generate
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._stream_reader: Optional[asyncio.StreamReader] = None
        self._writer: Optional[asyncio.StreamWriter] = None
        self._reader_task: Optional[asyncio.Task] = None
        self._drain_lock = asyncio.Lock()

    @classmethod
    async def connect(
        cls, socket_path: Union[str, Path, None] = None, timeout: Optional[float] = 30.0
    ) -> "AsyncClient":
        """Connect and say hello; raises ConnectionFailed when no daemon runs at the socket."""
        client = cls(socket_path, timeout)
        await client.open()
        return client

    async def open(self) -> None:
        try:
            self._stream_reader, self._writer = await asyncio.wait_for(
                asyncio.open_unix_connection(str(self.socket_path)), self.timeout
            )
        except asyncio.TimeoutError:
            raise Timeout(f"connecting to the kakeya daemon at {self.socket_path} took over {self.timeout}s") from None
        except OSError as exc:
            raise connect_failed(self.socket_path, exc) from None
        self._loop = asyncio.get_running_loop()
        self._reader_task = asyncio.create_task(self._read_forever())
        try:
            self.server_info = await self.call("hello", hello_params())
        except BaseException:
            await self.close()
            raise
        self._core.said_hello(self.server_info)

    async def __aenter__(self) -> "AsyncClient":
        if self._writer is None:
            await self.open()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connection. Generations still running on it are cancelled by the daemon."""
        self._core.fail(connection_lost(self.socket_path, "the client was closed"))
        if self._writer is not None:
            self._writer.close()
            try:
                await self._writer.wait_closed()
            except (ConnectionError, OSError):
                pass
        if self._reader_task is not None:
            self._reader_task.cancel()
            try:
                await self._reader_task
            except asyncio.CancelledError:
                pass

    @property
    def closed(self) -> bool:
        return self._core.failure is not None

    # ---- routing ---------------------------------------------------------

    async def _read_forever(self) -> None:
        why = None
        try:
            while self._core.failure is None:
                data = await self._stream_reader.read(1 << 16)
                if not data:
                    break
                self._core.received(data)
        except OSError as exc:
            why = str(exc.strerror or exc)
        finally:
            self._core.ended(why)

    def _write(self, rid: int, method: str, params: dict) -> None:
        self._writer.write(self._core.frame(rid, method, params))

    async def _send(self, rid: int, method: str, params: dict, timeout) -> None:
        self._write(rid, method, params)
        timeout = self.timeout if timeout is _DEFAULT else timeout
        try:
            async with self._drain_lock:
                await asyncio.wait_for(self._writer.drain(), timeout)
        except asyncio.TimeoutError:
            raise not_taken(method, self.socket_path, timeout) from None
        except (ConnectionError, OSError) as exc:
            self._core.check()
            raise connection_lost(self.socket_path, str(exc)) from None

    async def _wait(self, inbox: _Inbox, method: str, timeout):
        timeout = self.timeout if timeout is _DEFAULT else timeout
        try:
            return await asyncio.wait_for(inbox.queue.get(), timeout)
        except asyncio.TimeoutError:
            raise no_answer(method, self.socket_path, timeout) from None

    def _abandon(self, rid: int, session_id: str) -> None:
        """Cancel a generate nobody reads any more; later generates on its session wait for its end."""
        inbox = self._core.close(rid)
        if not isinstance(inbox, _Inbox) or self._core.failure is not None:
            return
        while not inbox.queue.empty():
            item = inbox.queue.get_nowait()
            if isinstance(item, KakeyaError) or ends_request(item):
                return
        ended = self._loop.create_future()
        self._core.reroute(rid, _Drain(ended))
        self._settling[session_id] = ended
        ended.add_done_callback(lambda f: self._settled(session_id, f))
        try:
            self._write(self._core.next_id(), "cancel", {"request_id": rid})
        except KakeyaError:
            pass

    def _settled(self, session_id: str, ended: asyncio.Future) -> None:
        if self._settling.get(session_id) is ended:
            del self._settling[session_id]

    def _abandon_soon(self, rid: int, session_id: str) -> None:
        """_abandon from any thread (garbage collection may run anywhere)."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            self._abandon(rid, session_id)
        elif self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._abandon, rid, session_id)
            except RuntimeError:
                pass  # the loop closed meanwhile; the connection went with it

    # ---- requests --------------------------------------------------------

    async def call(self, method: str, params: Optional[dict] = None, *, timeout=_DEFAULT) -> dict:
        """Send any request and return its result; daemon errors raise typed exceptions."""
        inbox = _Inbox()
        rid = self._core.open(inbox)
        try:
            await self._send(rid, method, params or {}, timeout)
            return result_of(method, await self._wait(inbox, method, timeout))
        finally:
            self._core.close(rid)

    async def create_session(self, **defaults) -> "AsyncSession":
        """A new, empty session on the daemon; `defaults` (speculative, num_draft_tokens) apply to its generates."""
        params = {k: v for k, v in defaults.items() if v is not None}
        return AsyncSession(self, (await self.call("create_session", params))["session_id"])

    def session(self, session_id: str) -> "AsyncSession":
        """A handle on an existing session (made on any connection); nothing is checked until it is used."""
        return AsyncSession(self, session_id)

    async def list_sessions(self) -> list[dict]:
        return (await self.call("list_sessions"))["sessions"]

    async def stats(self) -> dict:
        return await self.call("stats")

    async def tokenize(self, text: str) -> list[int]:
        return (await self.call("tokenize", {"text": text}))["tokens"]

    async def detokenize(self, tokens) -> str:
        return (await self.call("detokenize", {"tokens": token_list(tokens)}))["text"]

    async def shutdown(self) -> None:
        """Ask the daemon to stop gracefully (in-flight generations end as "cancelled")."""
        await self.call("shutdown")


class AsyncSession(SessionHandle):
    """One session on the daemon: an append-only token history with its resident cache."""

    client: AsyncClient

    async def __aenter__(self) -> "AsyncSession":
        return self

    async def __aexit__(self, *exc) -> None:
        if not self.client.closed:
            try:
                await self.close()
            except NotFound:
                pass

    async def append(self, tokens=None, text=None, messages=None, add_generation_prompt: bool = True) -> dict:
        """Add exactly one of token ids, text, or chat messages (rendered with the model's chat template).
        Returns {"appended": n, "history_length": n, "tokens": [the token ids appended]}."""
        return await self.client.call("append", append_params(self.id, tokens, text, messages, add_generation_prompt))

    def generate(self, timeout=_DEFAULT, **params) -> "AsyncGenerateStream":
        """Stream a turn's events (`async for`): TokensEvent, TruncatedEvent, and always a final DoneEvent.

        params: max_tokens, temperature, top_p, top_k, min_p, repetition_penalty,
        frequency_penalty, presence_penalty, seed, stop, constraint (e.g.
        {"type": "json_schema", "schema": {...}}), logprobs, top_logprobs (None
        values take the daemon's defaults; see protocol/SPEC.md). `timeout` bounds the
        wait for each event. Leaving the loop early cancels the generation.
        """
        return AsyncGenerateStream(self, generate_params(self.id, params), timeout)

    def stream_text(self, timeout=_DEFAULT, **params) -> "AsyncTextStream":
        """Only the generated text, chunk by chunk (`async for`); raises the error if the generation fails."""
        return AsyncTextStream(self.generate(timeout, **params))

    async def complete(self, timeout=_DEFAULT, **params) -> tuple[str, DoneEvent]:
        """Generate to the end; returns (text, done). Raises the error if the generation fails."""
        chunks = []
        async with self.generate(timeout, **params) as stream:
            async for event in stream:
                if isinstance(event, TokensEvent):
                    chunks.append(event.text)
        if stream.done.error is not None:
            raise stream.done.error
        return "".join(chunks), stream.done

    async def cancel(self) -> bool:
        """Cancel this session's running generation, from whichever connection started it."""
        return (await self.client.call("cancel", {"session_id": self.id}))["cancelled"]

    async def info(self) -> dict:
        return await self.client.call("session_info", {"session_id": self.id})

    async def close(self) -> None:
        """Close the session on the daemon, freeing its cache."""
        await self.client.call("close_session", {"session_id": self.id})


class AsyncGenerateStream:
    """The events of one generate request; the request is sent when iteration starts.

    Leaving early (break, aclose(), `async with`, or garbage collection) cancels
    the generation; a later generate on the same session waits for it to end.
    """

    def __init__(self, session: AsyncSession, params: dict, timeout):
        self.client = session.client
        self.session_id = session.id
        self.timeout = timeout
        self.request_id: Optional[int] = None
        self._params = params
        self._inbox: Optional[_Inbox] = None
        self._state = GenerateState(lambda: None)  # replaced once the request has an id

    @property
    def done(self) -> Optional[DoneEvent]:
        return self._state.done

    async def _start(self) -> None:
        if self.request_id is not None or self._state.finished:
            return
        settling = self.client._settling.get(self.session_id)
        if settling is not None:
            wait = self.client.timeout if self.timeout is _DEFAULT else self.timeout
            try:
                await asyncio.wait_for(asyncio.shield(settling), wait)
            except asyncio.TimeoutError:
                pass  # let the daemon decide (it answers busy if the session is still generating)
        self._inbox = _Inbox()
        self.request_id = self.client._core.open(self._inbox)
        self._state = GenerateState(functools.partial(self.client._core.close, self.request_id))
        try:
            await self.client._send(self.request_id, "generate", self._params, self.timeout)
        except BaseException:
            self._state.finish()
            raise

    def __aiter__(self) -> "AsyncGenerateStream":
        return self

    async def __anext__(self) -> Event:
        await self._start()
        while not self._state.finished:
            # A Timeout leaves the stream running: aclose() cancels it.
            event = self._state.take(await self.client._wait(self._inbox, "generate", self.timeout))
            if event is not None:
                return event
        raise StopAsyncIteration

    async def cancel(self) -> bool:
        """Ask the daemon to stop; keep iterating to receive the remaining events and the done event."""
        if self.request_id is None or self._state.finished:
            return False
        return (await self.client.call("cancel", {"request_id": self.request_id}))["cancelled"]

    async def aclose(self) -> None:
        """Cancel the generation if it is still running and wait for its done event."""
        if self.request_id is None or self._state.finished:
            self._state.finished = True
            return
        try:
            self.client._write(self.client._core.next_id(), "cancel", {"request_id": self.request_id})
            async for _ in self:
                pass
        except KakeyaError:
            pass  # the connection is gone or the daemon stopped answering: nothing left to wait for
        finally:
            if not self._state.finished:  # interrupted (e.g. the task was cancelled): let the reader drain it
                self._state.finished = True
                self.client._abandon(self.request_id, self.session_id)

    async def __aenter__(self) -> "AsyncGenerateStream":
        await self._start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    def __del__(self) -> None:
        state = getattr(self, "_state", None)
        if getattr(self, "request_id", None) is not None and state is not None and not state.finished:
            state.finished = True
            self.client._abandon_soon(self.request_id, self.session_id)


class AsyncTextStream:
    """The text chunks of one generate (`async for`); `done` holds the DoneEvent at the end."""

    def __init__(self, stream: AsyncGenerateStream):
        self.stream = stream

    @property
    def done(self) -> Optional[DoneEvent]:
        return self.stream.done

    def __aiter__(self) -> "AsyncTextStream":
        return self

    async def __anext__(self) -> str:
        while True:
            event = await self.stream.__anext__()
            if isinstance(event, TokensEvent) and event.text:
                return event.text
            if isinstance(event, DoneEvent) and event.error is not None:
                raise event.error

    async def aclose(self) -> None:
        await self.stream.aclose()

    async def __aenter__(self) -> "AsyncTextStream":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()
