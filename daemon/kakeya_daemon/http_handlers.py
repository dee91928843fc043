"""The OpenAI-compatible endpoints: auth, errors in the OpenAI shape, one log line per request, and turns.

Every client error is a 4xx with an OpenAI error body; a request runs its turn
through the core (admission, leases, memory) on a session from the pool, so
stopping the daemon ends it with a proper ending: a final error event and
`[DONE]` on a stream, a 503 otherwise.
"""

import asyncio
import contextvars
import hmac
import itertools
import logging
import time
from dataclasses import dataclass
from typing import Optional

from aiohttp import web

from kakeya_mlx import __version__
from kakeya_mlx.errors import EngineError
from kakeya_mlx.events import DoneEvent, TokenEvent
from kakeya_protocol.quote import quote

from . import openai_api as api
from .admission import Refusal
from .core import DaemonCore, Turn
from .http_metrics import CONTENT_TYPE, render_metrics
from .http_pool import Checkout, SessionPool

log = logging.getLogger("kakeya.http")

ENDPOINTS = "GET /v1/models, POST /v1/chat/completions, POST /v1/completions, GET /info"
# Seconds a client told 429 (busy, or no generation slot or memory) waits before retrying.
RETRY_AFTER_S = 1


@dataclass
class _Record:
    """What the middleware logs about one request; its handler fills in the usage."""

    number: int
    started: float
    usage: Optional[dict] = None


# The request being handled in this task: set by the middleware, read by the handlers.
_RECORD: contextvars.ContextVar[_Record] = contextvars.ContextVar("kakeya_http_request")


@dataclass(frozen=True)
class HttpOptions:
    """The HTTP front's own settings (the listeners' are in http_server.ListenOptions)."""

    api_keys: tuple[str, ...] = ()
    max_body_bytes: int = 1 << 20
    max_sessions: int = 8
    frame_timeout_s: float = 30.0


def error_response(error: api.ApiError) -> web.Response:
    headers = {401: {"WWW-Authenticate": "Bearer"}, 429: {"Retry-After": str(RETRY_AFTER_S)}}.get(error.status)
    return web.json_response(error.body(), status=error.status, headers=headers, dumps=api.dumps)


def from_engine(exc: EngineError, param=None) -> api.ApiError:
    if isinstance(exc, Refusal) and exc.limit == "shutting_down":
        return api.ApiError(503, exc.message, "server_error", param, "shutting_down")
    return api.ApiError.from_code(exc.code, exc.message, param)


def from_http(exc: web.HTTPException, method: str, max_body_bytes: int) -> api.ApiError:
    if exc.status == 413:
        return api.ApiError(413, f"request body exceeds http_max_body_bytes={max_body_bytes}", code="request_too_large")
    if exc.status == 404:
        return api.ApiError(404, f"no such endpoint; see {ENDPOINTS}", code="not_found")
    if exc.status == 405:
        allowed = ", ".join(sorted(getattr(exc, "allowed_methods", ()))) or "another method"
        return api.ApiError(405, f"{method} is not allowed on this path; use {allowed}", code="method_not_allowed")
    kind = "server_error" if exc.status >= 500 else "invalid_request_error"
    return api.ApiError(exc.status, exc.reason, kind)


class OpenAIFront:
    """The request handlers of the HTTP front, over the daemon core and a session pool."""

    def __init__(self, core: DaemonCore, options: HttpOptions):
        self.core = core
        self.options = options
        self.model_name = core.engine.model_info()["name"]
        self.max_new_tokens = core.engine.config.max_new_tokens
        self.started_at = time.time()
        self.meters = core.counters.http
        self.pool = SessionPool(core, options.max_sessions)
        self._numbers = itertools.count(1)

    # -- middleware: auth, the error envelope, metrics and the request's log line

    @web.middleware
    async def middleware(self, request: web.Request, handler):
        started = time.perf_counter()
        resource = request.match_info.route.resource
        endpoint = resource.canonical if resource is not None else "unmatched"
        record = _Record(next(self._numbers), started)
        _RECORD.set(record)
        status = 500
        try:
            if self.options.api_keys and endpoint != "/healthz":
                self._authorize(request)
            response = await handler(request)
            status = response.status
            return response
        except api.ApiError as exc:
            status = exc.status
            return error_response(exc)
        except EngineError as exc:
            error = from_engine(exc)
            status = error.status
            return error_response(error)
        except web.HTTPException as exc:
            error = from_http(exc, request.method, self.options.max_body_bytes)
            status = error.status
            return error_response(error)
        except asyncio.CancelledError:
            status = 499  # the client went away (nginx's code for it)
            raise
        except Exception:
            log.exception("http %d: unhandled error in %s %s", record.number, request.method, endpoint)
            status = 500
            return error_response(api.ApiError(500, "internal error; see the daemon log", "server_error", code="internal"))
        finally:
            elapsed = time.perf_counter() - started
            self.meters.requests.inc({"endpoint": endpoint, "code": str(status)})
            self.meters.latency.observe(elapsed, {"endpoint": endpoint})
            _log_request(request, record, endpoint, status, elapsed)

    def _authorize(self, request: web.Request) -> None:
        header = request.headers.get("Authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise api.ApiError(
                401,
                "missing API key: send the header 'Authorization: Bearer <key>'",
                "authentication_error",
                code="invalid_api_key",
            )
        # aiohttp keeps a header's non-UTF-8 bytes as surrogate escapes: compare the bytes that came.
        given = key.strip().encode("utf-8", "surrogateescape")
        if not any(hmac.compare_digest(given, k.encode()) for k in self.options.api_keys):
            raise api.ApiError(401, "incorrect API key", "authentication_error", code="invalid_api_key")

    async def _json_body(self, request: web.Request) -> dict:
        limit = self.options.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise api.ApiError(
                413, f"request body of {request.content_length} bytes exceeds http_max_body_bytes={limit}",
                code="request_too_large",
            )
        try:
            async with asyncio.timeout(self.options.frame_timeout_s):
                raw = await request.read()
        except TimeoutError:
            log.warning(
                "http %d: the request body did not arrive within frame_timeout_s=%g", _RECORD.get().number,
                self.options.frame_timeout_s,
            )
            raise api.ApiError(
                408, f"the request body did not arrive within frame_timeout_s={self.options.frame_timeout_s:g}",
                code="timeout",
            ) from None
        return api.parse_body(raw)

    def _check_model(self, body: dict) -> None:
        model = api.get(body, "model", lambda v: isinstance(v, str), "a string")
        if model is not None and model != self.model_name:
            raise api.ApiError(
                404,
                f"model {quote(model)} is not served here; this server serves {self.model_name!r}",
                param="model",
                code="model_not_found",
            )

    # -- endpoints

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "model": self.model_name})

    async def info(self, request: web.Request) -> web.Response:
        """The model, the generation defaults in force and the limits (the socket's `hello` says the same)."""
        limits = self.core.limits
        return web.json_response(
            {
                "server": f"kakeya-mlx/{__version__}",
                "model": self.core.engine.model_info(),
                "generation_defaults": self.core.generation_defaults(),
                "limits": {
                    "max_new_tokens": self.max_new_tokens,
                    "max_sessions": limits.max_sessions,
                    "max_concurrent_generations": limits.max_concurrent_generations,
                    "http_max_body_bytes": self.options.max_body_bytes,
                    "http_max_sessions": self.options.max_sessions,
                },
            },
            dumps=api.dumps,
        )

    def _model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": int(self.started_at), "owned_by": "kakeya-mlx"}

    async def list_models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [self._model_card()]})

    async def get_model(self, request: web.Request) -> web.Response:
        self._check_model({"model": request.match_info["model"]})
        return web.json_response(self._model_card())

    async def metrics(self, request: web.Request) -> web.Response:
        text = render_metrics(self.core.stats(), self.meters, len(self.pool), self.pool.max_sessions)
        return web.Response(body=text.encode(), headers={"Content-Type": CONTENT_TYPE})

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._json_body(request)
        self._check_model(body)
        api.reject_unsupported(body, chat=True)
        params = api.generation_params(body, True, self.max_new_tokens)
        messages = api.chat_messages(body.get("messages"))
        try:
            text = self.core.render_messages(messages, continuation=False, add_generation_prompt=True)
        except EngineError as exc:
            raise from_engine(exc, param="messages") from None
        return await self._complete(request, "/v1/chat/completions", body, params, text, None, add_special=False)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._json_body(request)
        self._check_model(body)
        api.reject_unsupported(body, chat=False)
        params = api.generation_params(body, False, self.max_new_tokens)
        if "prompt" not in body:
            raise api.ApiError(400, "prompt: required", param="prompt", code="missing_required_parameter")
        text, tokens = api.completion_prompt(body["prompt"])
        return await self._complete(request, "/v1/completions", body, params, text, tokens, add_special=True)

    # -- generation

    async def _complete(self, request, endpoint, body, params, text, tokens, add_special) -> web.StreamResponse:
        stream, include_usage = api.stream_options(body)
        self.core.refuse_if_stopping()
        generation = self.core.generation_request(params)
        record = _RECORD.get()
        holder = f"http {record.number} ({request.method} {endpoint})"
        checkout = await self.pool.checkout(text, tokens, add_special, holder)
        text_after, length_after = None, 0
        try:
            turn = self.core.open_turn(checkout.lease, generation)
            try:
                await turn.start()
                reply = api.Reply(endpoint == "/v1/chat/completions", self.model_name)
                run = _Run(reply, endpoint, checkout, request, record)
                if stream:
                    response = await self._stream(turn, run, include_usage)
                else:
                    response = await self._collect(turn, run)
            finally:
                await turn.close()
            done = turn.done
            if done is not None and done.stop_reason in api.FINISH_REASONS and checkout.text is not None:
                text_after = checkout.text + await self.core.detokenize(done.token_ids)
                length_after = checkout.prompt_tokens + done.generated_tokens
            return response
        finally:
            self.pool.release(checkout, text_after, length_after)

    def _first_token(self, run: "_Run") -> None:
        if run.first_token_at is None:
            run.first_token_at = time.perf_counter()
            self.meters.ttft.observe(run.first_token_at - run.record.started, {"endpoint": run.endpoint})

    def _account(self, run: "_Run", done: DoneEvent) -> dict:
        usage = api.usage(run.checkout.prompt_tokens, done)
        tokens, endpoint = self.meters.tokens, run.endpoint
        tokens.inc({"endpoint": endpoint, "kind": "prompt"}, usage["prompt_tokens"])
        tokens.inc({"endpoint": endpoint, "kind": "cached"}, usage["prompt_tokens_details"]["cached_tokens"])
        tokens.inc({"endpoint": endpoint, "kind": "completion"}, usage["completion_tokens"])
        run.record.usage = usage
        return usage

    async def _collect(self, turn: Turn, run: "_Run") -> web.Response:
        pieces, done = [], None
        async for event in turn:
            if isinstance(event, TokenEvent):
                self._first_token(run)
                pieces.append(event.text)
            elif isinstance(event, DoneEvent):
                done = event
        if done is None or done.stop_reason not in api.FINISH_REASONS:
            raise api.generation_error(done or DoneEvent(stop_reason="cancelled"))
        usage = self._account(run, done)
        body = run.reply.whole("".join(pieces), api.FINISH_REASONS[done.stop_reason], usage)
        return web.json_response(body, dumps=api.dumps)

    async def _stream(self, turn: Turn, run: "_Run", include_usage: bool) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(run.request)

        async def send(obj) -> None:
            await response.write(b"data: " + api.dumps(obj).encode() + b"\n\n")

        try:
            reply = run.reply
            if reply.chat:
                await send(reply.chunk({"role": "assistant", "content": ""}))
            done = None
            async for event in turn:
                if isinstance(event, TokenEvent):
                    self._first_token(run)
                    if event.text:
                        await send(reply.chunk(event.text))
                elif isinstance(event, DoneEvent):
                    done = event
            if done is None or done.stop_reason not in api.FINISH_REASONS:
                await send(api.generation_error(done or DoneEvent(stop_reason="cancelled")).body())
            else:
                usage = self._account(run, done)
                await send(reply.chunk(None, api.FINISH_REASONS[done.stop_reason]))
                if include_usage:
                    await send(reply.usage_chunk(usage))
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except ConnectionError:
            pass  # the client left; closing the turn cancels the generation
        return response


@dataclass
class _Run:
    """One request's turn as the handlers track it."""

    reply: api.Reply
    endpoint: str
    checkout: Checkout
    request: web.Request
    record: _Record
    first_token_at: Optional[float] = None


def _log_request(request: web.Request, record: _Record, endpoint: str, status: int, elapsed: float) -> None:
    usage = record.usage
    tokens = ""
    if usage is not None:
        tokens = (
            f": {usage['prompt_tokens']} prompt ({usage['prompt_tokens_details']['cached_tokens']} cached) + "
            f"{usage['completion_tokens']} generated tokens"
        )
    where = endpoint if endpoint != "unmatched" else quote(request.path)
    log.info("http %d: %s %s %d%s in %.3fs", record.number, request.method, where, status, tokens, elapsed)
