"""Socket requests: each protocol method mapped onto the core, and a generate's events onto frames.

`hello` is answered before the next frame is read; every other request runs as
its own task, so requests on one connection are multiplexed. A generate is
accepted (its session leased, its turn registered) before its task starts, so a
`cancel` right behind it finds it.
"""

import asyncio
import logging
from typing import Optional

from kakeya_mlx import __version__
from kakeya_mlx.errors import EngineError
from kakeya_mlx.events import DoneEvent, TokenEvent, TruncatedEvent
from kakeya_protocol import PROTOCOL_VERSION, RequestError, make_error, make_event, make_result, parse_request
from kakeya_protocol.quote import quote

from .config import DaemonConfig
from .connection import Connection
from .core import DaemonCore, Turn
from .registry import Lease

log = logging.getLogger("kakeya.daemon")

# An internal error's own text is bounded before it goes to the client and the log.
_MAX_INTERNAL_MESSAGE = 500


def done_data(done: DoneEvent) -> dict:
    data = {
        "stop_reason": done.stop_reason,
        "prompt_tokens": done.prompt_tokens,
        "generated_tokens": done.generated_tokens,
        "cached_tokens": done.cached_tokens,
        "draft_tokens": done.draft_tokens,
        "accepted_tokens": done.accepted_tokens,
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


def event_frames(
    request_id: int,
    events: list,
    logprobs: bool = False,
    top_logprobs: bool = False,
    restored: Optional[dict] = None,
) -> list[dict]:
    """Event frames for a batch of engine events, merging runs of tokens into one frame.

    With `logprobs` (and `top_logprobs`) a tokens event carries each token's log
    probability (and its alternatives as [token id, logprob] pairs); nil for a token
    that has none (re-tokenized before a stop string). `restored`: the done event's
    "restored" map, when the turn restored its session first.
    """
    frames, run = [], []

    def flush_tokens():
        if run:
            data = {"tokens": [ev.token_id for ev in run], "text": "".join(ev.text for ev in run)}
            if logprobs:
                data["logprobs"] = [ev.logprob for ev in run]
            if top_logprobs:
                data["top_logprobs"] = [
                    None if ev.top_logprobs is None else [[t, lp] for t, lp in ev.top_logprobs] for ev in run
                ]
            frames.append(make_event(request_id, "tokens", data))
            run.clear()

    for ev in events:
        if isinstance(ev, TokenEvent):
            run.append(ev)
            continue
        flush_tokens()
        if isinstance(ev, TruncatedEvent):
            data = {"evicted": ev.evicted, "total_evicted": ev.total_evicted}
            frames.append(make_event(request_id, "truncated", data))
        elif isinstance(ev, DoneEvent):
            data = done_data(ev)
            if restored is not None:
                data["restored"] = restored
            frames.append(make_event(request_id, "done", data))
    flush_tokens()
    return frames


class Dispatcher:
    """Runs the requests of socket connections against the core."""

    def __init__(self, core: DaemonCore, config: DaemonConfig):
        self.core = core
        self.config = config
        self._methods = {
            "create_session": self._create_session,
            "append": self._append,
            "cancel": self._cancel,
            "session_info": self._session_info,
            "close_session": self._close_session,
            "list_sessions": self._list_sessions,
            "save_session": self._save_session,
            "restore_session": self._restore_session,
            "delete_saved": self._delete_saved,
            "tokenize": self._tokenize,
            "detokenize": self._detokenize,
            "stats": self._stats,
            "shutdown": self._shutdown,
        }
        self.on_shutdown = None  # set by the daemon: called once a shutdown request is answered
        self.http_urls: list[str] = []  # set by the daemon when the HTTP front serves

    async def handle(self, conn: Connection, message: dict, size: int) -> None:
        """One frame from `conn`, in arrival order."""
        self.core.counters.requests += 1
        try:
            req = parse_request(message, hello_done=conn.hello_done)
        except RequestError as exc:
            log.info("conn %d: request %s rejected: %s: %s", conn.number, exc.id, exc.code, exc.message)
            await conn.send(make_error(exc.id, exc.code, exc.message))
            return
        if req.method == "hello":
            await conn.send(self._hello(conn, req.id, req.params))
            return
        if req.id in conn.requests:
            why = f"request id {req.id} is already in flight on this connection"
            await conn.send(make_error(req.id, "invalid_argument", why))
            return
        try:
            self.core.refuse_if_stopping()
            if req.method == "generate":
                task = self._accept_generate(conn, req.id, req.params)
            else:
                task = asyncio.create_task(self._run(conn, req.id, req.method, req.params))
        except EngineError as exc:
            await conn.send(self._error_reply(conn, req.id, req.method, exc))
            return
        conn.track(req.id, task, size)

    def _hello(self, conn: Connection, request_id: int, params: dict) -> dict:
        version = params.get("protocol")
        if version != PROTOCOL_VERSION:
            return make_error(
                request_id,
                "invalid_argument",
                f"protocol version {quote(version)} is not supported; this server speaks version {PROTOCOL_VERSION}",
            )
        if not conn.hello_done:
            log.info("conn %d: hello from %s", conn.number, quote(params.get("client") or "an unnamed client"))
        conn.hello_done = True
        c = self.config
        return make_result(
            request_id,
            {
                "protocol": PROTOCOL_VERSION,
                "server": f"kakeya-mlx/{__version__}",
                "model": self.core.engine.model_info(),
                "generation_defaults": self.core.generation_defaults(),
                "limits": {
                    "max_frame_bytes": c.max_frame_bytes,
                    "max_sessions": c.max_sessions,
                    "max_concurrent_generations": c.max_concurrent_generations,
                    "max_append_tokens": c.max_append_tokens,
                    "max_new_tokens": c.max_new_tokens,
                    "idle_ttl_s": c.idle_ttl_s,
                    "eviction": self.core.stored.eviction,
                    "store_max_bytes": self.core.stored.max_bytes,
                    "stop_save_s": c.stop_save_s if self.core.stored.store is not None else 0.0,
                    "max_requests_per_connection": c.max_requests_per_connection,
                    "frame_timeout_s": c.frame_timeout_s,
                },
                "http": {"enabled": bool(self.http_urls), "urls": list(self.http_urls)},
            },
        )

    def _error_reply(self, conn: Connection, request_id: int, method: str, exc: EngineError) -> dict:
        log.info("conn %d: %s (request %d) failed: %s: %s", conn.number, method, request_id, exc.code, exc.message)
        return make_error(request_id, exc.code, exc.message)

    async def _run(self, conn: Connection, request_id: int, method: str, params: dict) -> None:
        try:
            reply = make_result(request_id, await self._methods[method](conn, request_id, params))
        except EngineError as exc:
            reply = self._error_reply(conn, request_id, method, exc)
        except Exception as exc:  # an OSError of the method's own (a file, say) included: it is not the client's
            log.exception("conn %d: internal error in %s (request %d)", conn.number, method, request_id)
            text = f"internal error: {type(exc).__name__}: {exc}"[:_MAX_INTERNAL_MESSAGE]
            reply = make_error(request_id, "internal", text)
        await conn.send_quietly(reply)  # a client that is gone is cleaned up by its reader loop

    # ---- generate --------------------------------------------------------

    def _accept_generate(self, conn: Connection, request_id: int, params: dict) -> asyncio.Task:
        """Lease the session and register the turn now; its task starts, streams and ends it."""
        lease = self.core.lease(params["session_id"], f"conn {conn.number} request {request_id}")
        try:
            turn = self.core.open_turn(lease, self.core.generation_request(params))
        except BaseException:
            lease.release()
            raise
        conn.turns[request_id] = turn
        return asyncio.create_task(self._generate(conn, request_id, turn, lease))

    async def _generate(self, conn: Connection, request_id: int, turn: Turn, lease: Lease) -> None:
        try:
            try:
                await turn.start()
            except EngineError as exc:
                await conn.send_quietly(self._error_reply(conn, request_id, "generate", exc))
                return
            except Exception as exc:
                log.exception("conn %d: internal error starting generate (request %d)", conn.number, request_id)
                text = f"internal error: {type(exc).__name__}: {exc}"[:_MAX_INTERNAL_MESSAGE]
                await conn.send_quietly(make_error(request_id, "internal", text))
                return
            await self._stream(conn, request_id, turn)
        except (ConnectionError, OSError):
            pass
        finally:
            await turn.close()
            lease.release()
            conn.turns.pop(request_id, None)

    async def _stream(self, conn: Connection, request_id: int, turn: Turn) -> None:
        """Forward events, coalescing the tokens that pile up while the client reads slowly."""
        pending: list = []
        ready = asyncio.Event()
        ended = False

        async def pump() -> None:
            nonlocal ended
            try:
                async for event in turn:
                    pending.append(event)
                    ready.set()
            finally:
                ended = True
                ready.set()

        pump_task = asyncio.create_task(pump())
        done: Optional[DoneEvent] = None
        try:
            while done is None and not (ended and not pending):
                if not pending:
                    ready.clear()
                    await ready.wait()
                batch = pending[:]
                pending.clear()
                done = next((e for e in batch if isinstance(e, DoneEvent)), None)
                r = turn.request
                for frame in event_frames(request_id, batch, r.logprobs, r.top_logprobs > 0, turn.restored):
                    await conn.send(frame)
        finally:
            pump_task.cancel()
        if done is None:
            done = DoneEvent(stop_reason="error", error_code="internal", error_message="the generation ended without a result")
            log.error("conn %d: session %s: generation ended without a done event", conn.number, turn.session_id)
            await conn.send(make_event(request_id, "done", done_data(done)))

    # ---- the other methods ------------------------------------------------

    async def _create_session(self, conn: Connection, rid: int, params: dict) -> dict:
        session_id = await self.core.create_session(
            speculative=params.get("speculative"), num_draft_tokens=params.get("num_draft_tokens")
        )
        log.info("conn %d: session %s created", conn.number, session_id)
        return {"session_id": session_id}

    async def _append(self, conn: Connection, rid: int, params: dict) -> dict:
        lease = self.core.lease(params["session_id"], f"conn {conn.number} request {rid}")
        content = {k: params[k] for k in ("tokens", "text", "messages", "add_generation_prompt") if k in params}
        try:
            if "tokens" in content:
                return await self.core.append(lease, **content)
            async with conn.tokenizer:
                return await self.core.append(lease, **content)
        finally:
            lease.release()

    async def _cancel(self, conn: Connection, rid: int, params: dict) -> dict:
        if "request_id" in params:
            turn = conn.turns.get(params["request_id"])
            if turn is None or turn.is_ended:
                return {"cancelled": False}
            turn.cancel()
            return {"cancelled": True}
        return {"cancelled": await self.core.cancel_session(params["session_id"])}

    async def _session_info(self, conn: Connection, rid: int, params: dict) -> dict:
        return await self.core.session_info(params["session_id"])

    async def _close_session(self, conn: Connection, rid: int, params: dict) -> dict:
        await self.core.close_session(params["session_id"], f"conn {conn.number} request {rid}")
        return {"closed": True}

    async def _list_sessions(self, conn: Connection, rid: int, params: dict) -> dict:
        return {"sessions": self.core.list_sessions(), "saved": await self.core.list_saved()}

    async def _save_session(self, conn: Connection, rid: int, params: dict) -> dict:
        holder = f"conn {conn.number} request {rid}"
        return await self.core.save_session(params["session_id"], params["name"], holder)

    async def _restore_session(self, conn: Connection, rid: int, params: dict) -> dict:
        result = await self.core.restore_session(params["name"])
        name, sid = quote(params["name"]), result["session_id"]
        log.info("conn %d: saved session %s restored as session %s", conn.number, name, sid)
        return result

    async def _delete_saved(self, conn: Connection, rid: int, params: dict) -> dict:
        await self.core.delete_saved(params["name"])
        return {"deleted": True}

    async def _tokenize(self, conn: Connection, rid: int, params: dict) -> dict:
        async with conn.tokenizer:
            return {"tokens": await self.core.tokenize(params["text"])}

    async def _detokenize(self, conn: Connection, rid: int, params: dict) -> dict:
        async with conn.tokenizer:
            return {"text": await self.core.detokenize(params["tokens"])}

    async def _stats(self, conn: Connection, rid: int, params: dict) -> dict:
        return self.core.stats()

    async def _shutdown(self, conn: Connection, rid: int, params: dict) -> dict:
        log.info("conn %d: shutdown requested", conn.number)
        if self.on_shutdown is not None:
            asyncio.get_running_loop().call_soon(self.on_shutdown)
        return {"ok": True}
