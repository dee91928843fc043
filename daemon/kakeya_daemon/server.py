"""The daemon: a Unix-socket server that dispatches protocol requests to one engine.

Each connection has a reader loop; every request after `hello` runs as its own
task, so requests on one connection are multiplexed. Sessions outlive
connections (a client may reconnect and continue one); a generation does not:
when its connection goes, it is cancelled at once.
"""

import asyncio
import collections
import contextlib
import itertools
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import AsyncIterator, Optional

import mlx.core as mx
from kakeya_mlx import __version__
from kakeya_mlx.engine import Engine, EngineConfig
from kakeya_mlx.errors import BusyError, EngineError, NotFoundError
from kakeya_mlx.events import DoneEvent, TokenEvent, TruncatedEvent
from kakeya_mlx.sampling import SamplingParams
from kakeya_protocol import (
    PROTOCOL_VERSION,
    FrameDecoder,
    ProtocolError,
    RequestError,
    encode_frame,
    make_error,
    make_event,
    make_result,
    parse_request,
)

from .admission import Admission
from .config import AUTO_BUDGET_FRACTION, ConfigError, DaemonConfig, load_config
from .lifecycle import SocketLock, StartError, claim_socket_path, ensure_private_dir, peer_credentials
from .logs import setup_logging
from .openai_http import HttpOptions, HttpServer, start_http
from .stats import Stats, stats_reply

log = logging.getLogger("kakeya.daemon")

# How long shutdown waits for cancelled streams to deliver their done events.
_SHUTDOWN_GRACE_S = 10.0
# Evicted session ids remembered so a later request learns why its session is gone.
_REMEMBERED_EVICTIONS = 1024


def resolve_memory_budget(configured: int) -> Optional[int]:
    """Bytes of MLX active memory allowed; None for no budget (see DaemonConfig.memory_budget_bytes)."""
    if configured > 0:
        return configured
    if configured < 0:
        return None
    try:
        working_set = mx.device_info().get("max_recommended_working_set_size")
    except Exception:  # backends without device info have no budget to derive
        return None
    return int(working_set * AUTO_BUDGET_FRACTION) if working_set else None


class Connection:
    """One client connection: its writer, the hello flag, its in-flight requests."""

    def __init__(self, number: int, writer: asyncio.StreamWriter, max_frame_bytes: int):
        self.number = number
        self.writer = writer
        self.max_frame_bytes = max_frame_bytes
        self.write_lock = asyncio.Lock()
        self.hello_done = False
        self.closed = False
        self.requests: dict[int, asyncio.Task] = {}
        self.generations: dict[int, "Generation"] = {}

    async def send(self, message: dict) -> None:
        """Write one frame; a reply too large for a frame becomes an error reply."""
        try:
            frame = encode_frame(message, self.max_frame_bytes)
        except ProtocolError as exc:
            log.warning("conn %d: reply to request %s not sent: %s", self.number, message.get("id"), exc)
            frame = encode_frame(
                make_error(
                    message.get("id"),
                    "resource_exhausted",
                    f"the reply does not fit in one frame (max_frame_bytes={self.max_frame_bytes}): {exc}",
                ),
                self.max_frame_bytes,
            )
        async with self.write_lock:
            if self.closed or self.writer.is_closing():
                raise ConnectionResetError("connection closed")
            self.writer.write(frame)
            await self.writer.drain()

    async def send_quietly(self, message: dict) -> None:
        """Send, ignoring a connection that is already gone."""
        with contextlib.suppress(ConnectionError, OSError):
            await self.send(message)


class Generation:
    """A generate request from the moment it is accepted until its done event."""

    def __init__(self, conn: Connection, request_id: int, session_id: str):
        self.conn = conn
        self.request_id = request_id
        self.session_id = session_id
        self.task: Optional[asyncio.Task] = None
        self.running = False  # its task has begun
        self.started = False  # the engine runs it (before that it waits for admission)
        self.cancelling = False
        self.finished = asyncio.Event()


def _done_data(done: DoneEvent) -> dict:
    data = {
        "stop_reason": done.stop_reason,
        "prompt_tokens": done.prompt_tokens,
        "generated_tokens": done.generated_tokens,
        "cached_tokens": done.cached_tokens,
        "timings": {
            "ttft_s": done.ttft_s,
            "prefill_tokens_per_s": done.prefill_tokens_per_s,
            "decode_tokens_per_s": done.decode_tokens_per_s,
            "total_s": done.total_s,
        },
    }
    if done.stop_reason == "error":
        data["error"] = {"code": done.error_code or "internal", "message": done.error_message or "generation failed"}
    return data


def _log_done(conn: Connection, gen: Generation, done: DoneEvent) -> None:
    log.info(
        "conn %d: session %s generation done (%s): %d prompt + %d generated tokens, "
        "ttft %.3fs, prefill %.1f tok/s, decode %.1f tok/s",
        conn.number,
        gen.session_id,
        done.stop_reason,
        done.prompt_tokens,
        done.generated_tokens,
        done.ttft_s,
        done.prefill_tokens_per_s,
        done.decode_tokens_per_s,
    )


def _frames(request_id: int, events: list) -> list[dict]:
    """Event frames for a batch of engine events, merging runs of tokens into one frame."""
    frames, tokens, text = [], [], []

    def flush_tokens():
        if tokens:
            frames.append(make_event(request_id, "tokens", {"tokens": list(tokens), "text": "".join(text)}))
            tokens.clear()
            text.clear()

    for ev in events:
        if isinstance(ev, TokenEvent):
            tokens.append(ev.token_id)
            text.append(ev.text)
            continue
        flush_tokens()
        if isinstance(ev, TruncatedEvent):
            data = {"evicted": ev.evicted, "total_evicted": ev.total_evicted}
            frames.append(make_event(request_id, "truncated", data))
        elif isinstance(ev, DoneEvent):
            frames.append(make_event(request_id, "done", _done_data(ev)))
    flush_tokens()
    return frames


class Daemon:
    """One model, one engine, one socket. Use `running_daemon` or start()/stop()."""

    def __init__(self, config: DaemonConfig, loaded=None):
        config.validate()
        self.config = config
        self.socket_path: Path = config.socket_path()
        self.engine: Optional[Engine] = None
        self.stats = Stats()
        self.admission = Admission(
            config.max_sessions,
            config.max_concurrent_generations,
            config.queue_policy,
            config.max_queue_wait_s,
            resolve_memory_budget(config.memory_budget_bytes),
        )
        self._loaded = loaded
        self._lock = SocketLock(self.socket_path)
        self._server: Optional[asyncio.AbstractServer] = None
        self._http: Optional[HttpServer] = None
        self._sweeper: Optional[asyncio.Task] = None
        self._handlers: set[asyncio.Task] = set()
        self._connections: set[Connection] = set()
        self._generations: set[Generation] = set()
        self._in_use: collections.Counter = collections.Counter()  # session id -> requests using it
        self._evicted: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._numbers = itertools.count(1)
        self._stopping = False
        self._stop_task: Optional[asyncio.Task] = None
        self._stopped = asyncio.Event()
        self._methods = {
            "create_session": self._create_session,
            "append": self._append,
            "cancel": self._cancel,
            "session_info": self._session_info,
            "close_session": self._close_session,
            "list_sessions": self._list_sessions,
            "tokenize": self._tokenize,
            "detokenize": self._detokenize,
            "stats": self._stats,
            "shutdown": self._shutdown,
        }

    # ---- lifecycle -------------------------------------------------------

    async def start(self) -> None:
        """Claim the socket, load the model, start the engine, then listen."""
        ensure_private_dir(self.socket_path.parent)
        self._lock.acquire()
        try:
            claim_socket_path(self.socket_path)
            loaded = self._loaded
            if loaded is None:
                from kakeya_mlx.loader import load_model

                # On this thread, not a worker: MLX arrays made on a thread that then exits
                # can abort the process at exit (seen with MLX 0.32). Nothing is served yet.
                loaded = load_model(self.config.model, dtype=self.config.dtype or None, progress=_progress)
            self.engine = Engine(
                loaded,
                EngineConfig(
                    sink=self.config.sink,
                    window=self.config.window or None,
                    block=self.config.block,
                    max_append_tokens=self.config.max_append_tokens,
                    max_new_tokens=self.config.max_new_tokens,
                ),
            )
            await self.engine.start()
            self._server = await asyncio.start_unix_server(self._serve_connection, path=os.fspath(self.socket_path))
            os.chmod(self.socket_path, 0o600)
            if self.config.http_enabled:
                self._http = await self._start_http()
        except BaseException:
            if self._server is not None:
                self._server.close()
            if self.engine is not None:
                await self.engine.stop()
            self._remove_socket()
            self._lock.release()
            raise
        self._sweeper = asyncio.create_task(self._sweep_forever())
        budget = self.admission.memory_budget_bytes
        info = self.engine.model_info()
        log.info(
            "serving %s on %s (sink=%d window=%d block=%d, max_sessions=%d, max_concurrent_generations=%d, "
            "memory budget %s)",
            info["name"],
            self.socket_path,
            info["sink"],
            info["window"],
            info["block"],
            self.config.max_sessions,
            self.config.max_concurrent_generations,
            f"{budget} bytes" if budget else "none",
        )

    async def _start_http(self) -> HttpServer:
        c = self.config
        options = HttpOptions(
            host=c.http_host,
            port=c.http_port or None,
            unix_socket=c.http_socket or None,
            api_keys=tuple(k.strip() for k in c.http_api_keys.split(",") if k.strip()),
            max_body_bytes=c.http_max_body_bytes,
            max_sessions=c.http_max_sessions,
        )
        try:
            return await start_http(self.engine, options, _HttpHooks(self))
        except OSError as exc:
            where = f"{c.http_host}:{c.http_port}" if c.http_port else c.http_socket
            raise StartError(f"cannot serve the HTTP front on {where}: {exc.strerror or exc}") from exc

    def request_stop(self) -> None:
        """Begin a graceful shutdown (signal handlers and the shutdown method call this)."""
        if self._stop_task is None:
            self._stop_task = asyncio.get_running_loop().create_task(self.stop())

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def stop(self) -> None:
        """Stop accepting, end in-flight generations as "cancelled", close, remove the socket."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        log.info("shutting down: %d generation(s) in flight", len(self._generations))
        if self._server is not None:
            self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._http is not None:
            await self._http.stop()
        pending = [g.task for g in list(self._generations) if g.task is not None]
        for gen in list(self._generations):
            await self._cancel_generation(gen)
        if pending:
            await asyncio.wait(pending, timeout=_SHUTDOWN_GRACE_S)
        for conn in list(self._connections):
            conn.writer.close()
        if self._handlers:
            await asyncio.wait(list(self._handlers), timeout=_SHUTDOWN_GRACE_S)
        if self.engine is not None:
            await self.engine.stop()
        self._remove_socket()
        self._lock.release()
        log.info("stopped")
        self._stopped.set()

    def _remove_socket(self) -> None:
        if self._server is not None and self._lock.held:
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()

    # ---- connections -----------------------------------------------------

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._handlers.add(asyncio.current_task())
        try:
            await self._connection_loop(reader, writer)
        finally:
            self._handlers.discard(asyncio.current_task())

    async def _connection_loop(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Connection(next(self._numbers), writer, self.config.max_frame_bytes)
        try:
            uid, pid = peer_credentials(writer.get_extra_info("socket"))
        except OSError as exc:
            uid, pid = None, None
            log.debug("conn %d: peer credentials unavailable: %s", conn.number, exc)
        if uid is not None and uid != os.getuid():
            self.admission.rejections["peer_uid"] += 1
            log.warning("conn %d: refused a connection from uid %d (pid %s)", conn.number, uid, pid)
            refusal = f"this daemon serves uid {os.getuid()} only; connection from uid {uid} refused"
            await conn.send_quietly(make_error(None, "protocol_error", refusal))
            writer.close()
            return
        if self._stopping:
            writer.close()
            return
        self._connections.add(conn)
        self.stats.connections += 1
        log.info("conn %d: connected (pid %s)", conn.number, pid if pid is not None else "unknown")
        decoder = FrameDecoder(self.config.max_frame_bytes)
        reason = "closed by the client"
        try:
            while True:
                data = await reader.read(1 << 16)
                if not data:
                    if self._stopping:
                        reason = "the daemon is shutting down"
                    elif decoder.buffered:
                        reason = f"closed by the client in the middle of a frame ({decoder.buffered} bytes unread)"
                    break
                try:
                    messages = decoder.feed(data)
                except ProtocolError as exc:
                    reason = f"protocol error: {exc}"
                    await conn.send_quietly(make_error(None, "protocol_error", str(exc)))
                    break
                for message in messages:
                    await self._dispatch(conn, message)
        except (ConnectionError, OSError) as exc:
            reason = f"connection lost: {exc}"
        finally:
            conn.closed = True
            self._connections.discard(conn)
            self.stats.connections -= 1
            # Generations belong to their connection: end them now, freeing their sessions.
            gens = list(conn.generations.values())
            for gen in gens:
                self._abort(gen)
            if gens:
                await asyncio.wait([g.task for g in gens])
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()
            log.info("conn %d: disconnected (%s)", conn.number, reason)

    async def _dispatch(self, conn: Connection, message: dict) -> None:
        self.stats.requests += 1
        try:
            req = parse_request(message)
        except RequestError as exc:
            log.info("conn %d: request %s rejected: %s: %s", conn.number, exc.id, exc.code, exc.message)
            await conn.send(make_error(exc.id, exc.code, exc.message))
            return
        if req.method == "hello":
            await conn.send(self._hello(conn, req.id, req.params))
            return
        if not conn.hello_done:
            why = f"the first request on a connection must be 'hello', not {req.method!r}"
            await conn.send(make_error(req.id, "protocol_error", why))
            return
        if req.id in conn.requests:
            why = f"request id {req.id} is already in flight on this connection"
            await conn.send(make_error(req.id, "invalid_argument", why))
            return
        if self._stopping:
            self.admission.rejections["shutting_down"] += 1
            await conn.send(make_error(req.id, "resource_exhausted", "the daemon is shutting down"))
            return
        gen = None
        if req.method == "generate":
            gen = Generation(conn, req.id, req.params["session_id"])
            conn.generations[req.id] = gen
            self._generations.add(gen)
        task = asyncio.create_task(self._run_request(conn, req, gen))
        conn.requests[req.id] = task
        task.add_done_callback(lambda _t, rid=req.id: conn.requests.pop(rid, None))
        if gen is not None:
            gen.task = task
            task.add_done_callback(lambda _t, g=gen: self._forget(g))

    def _hello(self, conn: Connection, request_id: int, params: dict) -> dict:
        version = params.get("protocol")
        if version != PROTOCOL_VERSION:
            return make_error(
                request_id,
                "invalid_argument",
                f"protocol version {version!r} is not supported; this server speaks version {PROTOCOL_VERSION}",
            )
        conn.hello_done = True
        log.info("conn %d: hello from %s", conn.number, params.get("client") or "an unnamed client")
        return make_result(
            request_id,
            {
                "protocol": PROTOCOL_VERSION,
                "server": f"kakeya-mlx/{__version__}",
                "model": self.engine.model_info(),
                "limits": {
                    "max_frame_bytes": self.config.max_frame_bytes,
                    "max_sessions": self.config.max_sessions,
                    "max_concurrent_generations": self.config.max_concurrent_generations,
                    "max_append_tokens": self.config.max_append_tokens,
                    "max_new_tokens": self.config.max_new_tokens,
                    "idle_ttl_s": self.config.idle_ttl_s,
                },
            },
        )

    async def _run_request(self, conn: Connection, req, gen: Optional[Generation]) -> None:
        try:
            if gen is not None:
                await self._generate(conn, gen, req.params)
            else:
                result = await self._methods[req.method](conn, req.params)
                await conn.send(make_result(req.id, result))
        except EngineError as exc:
            if isinstance(exc, BusyError):
                self.admission.rejections["busy"] += 1
            message = self._explain(exc, req.params)
            log.info("conn %d: %s (request %d) failed: %s: %s", conn.number, req.method, req.id, exc.code, message)
            await conn.send_quietly(make_error(req.id, exc.code, message))
        except (ConnectionError, OSError):
            pass  # the client is gone; its reader loop cleans up
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("conn %d: internal error in %s (request %d)", conn.number, req.method, req.id)
            await conn.send_quietly(make_error(req.id, "internal", f"internal error: {type(exc).__name__}: {exc}"))

    def _explain(self, exc: EngineError, params: dict) -> str:
        """Say why a session is gone when the daemon evicted it."""
        sid = params.get("session_id")
        if isinstance(exc, NotFoundError) and isinstance(sid, str) and sid in self._evicted:
            return f"session {sid!r} was {self._evicted[sid]}"
        return exc.message

    # ---- sessions --------------------------------------------------------

    @contextlib.contextmanager
    def _using(self, session_id):
        """Mark a session as in use by a request so eviction leaves it alone."""
        key = session_id if isinstance(session_id, str) else None
        self._in_use[key] += 1
        try:
            yield
        finally:
            self._in_use[key] -= 1
            if self._in_use[key] <= 0:
                del self._in_use[key]

    async def _create_session(self, conn: Connection, params: dict) -> dict:
        await self._check_memory()
        # No await between the check and the creation, so concurrent creates cannot overshoot.
        self.admission.check_session_slot(len(self.engine.list_sessions()))
        session_id = await self.engine.create_session()
        log.info("conn %d: session %s created", conn.number, session_id)
        return {"session_id": session_id}

    async def _append(self, conn: Connection, params: dict) -> dict:
        sid = params.get("session_id")
        given = {k: params[k] for k in ("tokens", "text", "messages") if k in params}
        with self._using(sid):
            return await self.engine.append(
                sid, add_generation_prompt=params.get("add_generation_prompt", True), **given
            )

    async def _session_info(self, conn: Connection, params: dict) -> dict:
        return await self.engine.session_info(params.get("session_id"))

    async def _close_session(self, conn: Connection, params: dict) -> dict:
        sid = params.get("session_id")
        await self.engine.close_session(sid)
        log.info("conn %d: session %s closed", conn.number, sid)
        return {"closed": True}

    async def _list_sessions(self, conn: Connection, params: dict) -> dict:
        return {"sessions": self.engine.list_sessions()}

    async def _tokenize(self, conn: Connection, params: dict) -> dict:
        return {"tokens": await self.engine.tokenize(params.get("text"))}

    async def _detokenize(self, conn: Connection, params: dict) -> dict:
        return {"text": await self.engine.detokenize(params.get("tokens"))}

    def stats_reply(self) -> dict:
        """The `stats` method's reply; the HTTP front's /metrics reads the same."""
        return stats_reply(self.stats, self.engine, self.admission, self.engine.model_info()["name"])

    async def _stats(self, conn: Connection, params: dict) -> dict:
        return self.stats_reply()

    async def _shutdown(self, conn: Connection, params: dict) -> dict:
        log.info("conn %d: shutdown requested", conn.number)
        asyncio.get_running_loop().call_soon(self.request_stop)
        return {"ok": True}

    async def _evict(self, session_id: str, reason: str, limit: str) -> None:
        with contextlib.suppress(NotFoundError):
            await self.engine.close_session(session_id)
            self._evicted[session_id] = reason
            while len(self._evicted) > _REMEMBERED_EVICTIONS:
                self._evicted.popitem(last=False)
            if limit == "idle_ttl_s":
                self.stats.evicted_idle += 1
            else:
                self.stats.evicted_lru += 1
            log.info("session %s evicted: %s", session_id, reason)

    def _idle_sessions(self) -> list[dict]:
        """Sessions nothing is using, least recently used first."""
        idle = [s for s in self.engine.list_sessions() if not s["generating"] and s["session_id"] not in self._in_use]
        return sorted(idle, key=lambda s: s["last_used_at"])

    async def _evict_lru(self) -> bool:
        idle = self._idle_sessions()
        if not idle:
            return False
        budget = self.admission.memory_budget_bytes
        await self._evict(
            idle[0]["session_id"],
            f"evicted (least recently used) to keep MLX memory within memory_budget_bytes={budget}",
            "memory_budget_bytes",
        )
        return True

    def _active_bytes(self) -> int:
        return self.engine.memory()["active_bytes"]

    async def _check_memory(self) -> None:
        await self.admission.check_memory(self._active_bytes, self._evict_lru)

    async def _sweep_forever(self) -> None:
        """Close sessions idle longer than idle_ttl_s; evict LRU sessions while over the memory budget."""
        ttl = self.config.idle_ttl_s
        while True:
            await asyncio.sleep(self.config.idle_sweep_interval_s)
            try:
                if ttl > 0:
                    now = time.time()
                    for s in self._idle_sessions():
                        if now - s["last_used_at"] > ttl:
                            reason = f"closed after idle_ttl_s={ttl:g} without use"
                            await self._evict(s["session_id"], reason, "idle_ttl_s")
                await self.admission.fit_memory(self._active_bytes, self._evict_lru)
            except Exception:
                log.exception("idle sweep failed; will retry")

    # ---- generation ------------------------------------------------------

    async def _generate(self, conn: Connection, gen: Generation, params: dict) -> None:
        gen.running = True
        if gen.cancelling or conn.closed:  # cancelled before its task began
            await self._send_cancelled(gen)
            return
        try:
            with self._using(gen.session_id):
                await self._run_generation(conn, gen, params)
        except asyncio.CancelledError:
            if gen.started or not gen.cancelling:
                raise
            await self._send_cancelled(gen)

    def _forget(self, gen: Generation) -> None:
        gen.finished.set()
        self._generations.discard(gen)
        gen.conn.generations.pop(gen.request_id, None)

    def _abort(self, gen: Generation) -> None:
        """End a generation at once, without a done event (its connection is gone)."""
        gen.cancelling = True
        if gen.running and gen.task is not None:
            gen.task.cancel()

    @staticmethod
    async def _send_cancelled(gen: Generation) -> None:
        """End a generate the engine never started (cancelled while waiting for admission)."""
        done = make_event(gen.request_id, "done", _done_data(DoneEvent(stop_reason="cancelled")))
        await gen.conn.send_quietly(done)

    def _generation_on(self, session_id: str) -> Optional[Generation]:
        for gen in self._generations:
            if gen.session_id == session_id and gen.started and not gen.finished.is_set():
                return gen
        return None

    async def _wait_out_cancelled(self, session_id: str) -> None:
        """A generation on this session that is being cancelled frees it shortly: wait for that."""
        gen = self._generation_on(session_id)
        while gen is not None and gen.cancelling:
            await gen.finished.wait()
            gen = self._generation_on(session_id)

    async def _run_generation(self, conn: Connection, gen: Generation, params: dict) -> None:
        sid = gen.session_id
        max_tokens = params.get("max_tokens", min(256, self.config.max_new_tokens))
        sampling = SamplingParams(
            temperature=params.get("temperature", 0.0),
            top_p=params.get("top_p", 1.0),
            top_k=params.get("top_k", 0),
            min_p=params.get("min_p", 0.0),
            repetition_penalty=params.get("repetition_penalty", 1.0),
            seed=params.get("seed"),
        )
        stop = params.get("stop", [])
        await self._wait_out_cancelled(sid)
        info = await self.engine.session_info(sid)
        if info["generating"]:
            raise BusyError(f"session {sid!r} is already generating; cancel it or wait for its done event")
        await self._check_memory()
        await self.admission.acquire_generation()
        try:
            if self._stopping:
                await self._send_cancelled(gen)
                return
            await self._wait_out_cancelled(sid)
            stream = self.engine.generate(sid, max_tokens=max_tokens, sampling=sampling, stop=stop)
            gen.started = True
            await self._stream(conn, gen, stream)
        finally:
            self.admission.release_generation()

    async def _stream(self, conn: Connection, gen: Generation, stream: AsyncIterator) -> None:
        """Forward events, coalescing the tokens that pile up while the client reads slowly."""
        pending: list = []
        ready = asyncio.Event()
        ended = False

        async def pump() -> None:
            nonlocal ended
            try:
                async for event in stream:
                    pending.append(event)
                    ready.set()
            finally:
                ended = True
                ready.set()

        # Start the engine's stream here, so that its cleanup is armed before anything can cancel it.
        try:
            pending.append(await stream.__anext__())
        except StopAsyncIteration:
            ended = True
        pump_task = asyncio.create_task(pump()) if not ended else None
        done: Optional[DoneEvent] = None
        sent_tokens = 0
        try:
            while True:
                batch = pending[:]
                pending.clear()
                done = next((e for e in batch if isinstance(e, DoneEvent)), done)
                sent_tokens += sum(isinstance(e, TokenEvent) for e in batch)
                for frame in _frames(gen.request_id, batch):
                    await conn.send(frame)
                if done is not None:
                    _log_done(conn, gen, done)
                    break
                if ended and not pending:
                    break
                if not pending:
                    ready.clear()
                    await ready.wait()
        except BaseException as exc:
            if done is None:
                gone = isinstance(exc, (asyncio.CancelledError, ConnectionError))
                why = "its connection closed" if gone else repr(exc)
                log.info(
                    "conn %d: session %s generation stopped after %d tokens: %s",
                    conn.number,
                    gen.session_id,
                    sent_tokens,
                    why,
                )
            raise
        finally:
            await asyncio.shield(self._end_stream(pump_task, stream))
        if done is None:
            failure = pump_task.exception() if pump_task is not None and not pump_task.cancelled() else None
            done = DoneEvent(
                stop_reason="error",
                error_code="internal",
                error_message=f"the generation ended without a result: {failure!r}",
            )
            log.error("conn %d: session %s generation failed: %r", conn.number, gen.session_id, failure)
            await conn.send(make_event(gen.request_id, "done", _done_data(done)))

    @staticmethod
    async def _end_stream(pump_task: Optional[asyncio.Task], stream) -> None:
        """Stop pulling events; closing the stream cancels the generation if it is still running."""
        if pump_task is not None:
            pump_task.cancel()
            with contextlib.suppress(BaseException):
                await pump_task
        with contextlib.suppress(BaseException):
            await stream.aclose()

    async def _cancel_generation(self, gen: Generation) -> bool:
        """End a generation with a done event (stop reason "cancelled"); False if it already ended."""
        if gen.finished.is_set():
            return False
        gen.cancelling = True
        if gen.started:
            with contextlib.suppress(NotFoundError):
                return await self.engine.cancel(gen.session_id)
            return False
        if gen.running and gen.task is not None:
            gen.task.cancel()  # it is waiting for admission; see _generate
        return True

    async def _cancel(self, conn: Connection, params: dict) -> dict:
        if "request_id" in params:
            gen = conn.generations.get(params["request_id"])
            return {"cancelled": gen is not None and await self._cancel_generation(gen)}
        sid = params.get("session_id")
        await self.engine.session_info(sid)  # not_found for an unknown session
        cancelled = False
        for gen in [g for g in self._generations if g.session_id == sid]:
            cancelled = await self._cancel_generation(gen) or cancelled
        return {"cancelled": cancelled}


class _HttpHooks:
    """What the daemon lends its HTTP front: the same admission, memory budget and stats."""

    def __init__(self, daemon: Daemon):
        self._daemon = daemon

    @contextlib.asynccontextmanager
    async def generation_slot(self):
        daemon = self._daemon
        if daemon._stopping:
            raise daemon.admission.reject("shutting_down", "the daemon is shutting down")
        await daemon._check_memory()
        await daemon.admission.acquire_generation()
        try:
            yield
        finally:
            daemon.admission.release_generation()

    def stats(self) -> dict:
        return self._daemon.stats_reply()

    def count_rejection(self, reason: str) -> None:
        self._daemon.admission.rejections[reason] += 1


def _progress(message: str) -> None:
    log.info("%s", message)


@contextlib.asynccontextmanager
async def running_daemon(config: DaemonConfig, loaded=None) -> AsyncIterator[Daemon]:
    """Start a daemon in the running event loop; stop it gracefully on exit.

    `loaded` (a LoadedModel) skips loading `config.model`, so tests can share one.
    """
    daemon = Daemon(config, loaded=loaded)
    await daemon.start()
    try:
        yield daemon
    finally:
        await daemon.stop()


async def serve(config: DaemonConfig) -> None:
    """Run until SIGTERM, SIGINT or a shutdown request. Raises StartError if it cannot start."""
    daemon = Daemon(config)
    try:
        await daemon.start()
    except (StartError, asyncio.CancelledError):
        raise
    except EngineError as exc:
        raise StartError(exc.message) from exc
    except Exception as exc:
        raise StartError(f"{type(exc).__name__}: {exc}") from exc
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _on_signal, daemon, sig)
    await daemon.wait_stopped()


def _on_signal(daemon: Daemon, sig: signal.Signals) -> None:
    log.info("received %s", sig.name)
    daemon.request_stop()


def main(argv: Optional[list[str]] = None) -> int:
    """`kakeya serve`: 0 after a graceful stop, 1 when the daemon cannot start, 2 for bad settings."""
    try:
        config = load_config(argv)
    except ConfigError as exc:
        print(f"kakeya serve: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help, or argparse's own usage errors
        return exc.code if isinstance(exc.code, int) else 2
    setup_logging(config.log_level)
    debug = config.log_level == "debug"
    try:
        asyncio.run(serve(config))
    except StartError as exc:
        log.error("cannot start: %s", exc, exc_info=debug)
        return 1
    except KeyboardInterrupt:  # before the signal handlers were installed
        log.info("interrupted while starting")
        return 130
    except Exception as exc:
        log.error("daemon failed: %s: %s", type(exc).__name__, exc, exc_info=True)
        return 1
    return 0
