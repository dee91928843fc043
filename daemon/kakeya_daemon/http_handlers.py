"""The HTTP front's shared machinery: auth, CORS, errors in each API's shape, one log line per request,
and a request's turn on a pooled session.

Every client error is a 4xx with the API's own error body (OpenAI's, or Anthropic's on
`/v1/messages`); a request runs its turn through the core (admission, leases, memory)
on a session from the pool, so stopping the daemon ends it with a proper ending. The
endpoints themselves are in http_openai.py and http_anthropic.py.
"""

import asyncio
import contextlib
import contextvars
import hmac
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Optional

from aiohttp import web

from kakeya_mlx import __version__
from kakeya_mlx.errors import EngineError, InvalidArgumentError
from kakeya_mlx.events import DoneEvent, TokenEvent, TruncatedEvent
from kakeya_protocol.quote import quote

from . import openai_api as api
from .admission import Refusal
from .anthropic_api import AnthropicError
from .core import DaemonCore, GenerationRequest, Turn
from .counters import HttpMeters
from .http_metrics import CONTENT_TYPE, render_metrics
from .http_pool import Checkout, SessionPool

log = logging.getLogger("kakeya.http")

ENDPOINTS = (
    "GET /v1/models, POST /v1/chat/completions, POST /v1/completions, POST /v1/messages, "
    "POST /v1/messages/count_tokens, GET /info"
)
# Seconds a client told 429 (busy, or no generation slot or memory) waits before retrying.
RETRY_AFTER_S = 1
ANTHROPIC_PREFIX = "/v1/messages"
# Says how many tokens of the conversation the model no longer sees (the window slid past them).
EVICTED_HEADER = "X-Kakeya-Evicted-Tokens"
_CORS_MAX_AGE_S = 600


@dataclass
class TokenCounts:
    """A request's token counts, as its log line and the token meters report them."""

    prompt: int
    cached: int
    completion: int
    evicted: int


@dataclass
class _Record:
    """What the middleware logs about one request; its handler fills in the counts."""

    number: int
    started: float
    counts: Optional[TokenCounts] = None


# The request being handled in this task: set by the middleware, read by the handlers.
_RECORD: contextvars.ContextVar[_Record] = contextvars.ContextVar("kakeya_http_request")


@dataclass(frozen=True)
class HttpOptions:
    """The HTTP front's own settings (the listeners' are in http_server.ListenOptions)."""

    api_keys: tuple[str, ...] = ()
    max_body_bytes: int = 1 << 20
    max_sessions: int = 8
    frame_timeout_s: float = 30.0
    cors_origins: tuple[str, ...] = ()  # browser origins allowed; "*" allows any; empty: none


def error_response(error: api.ApiError, anthropic: bool = False) -> web.Response:
    """The error in the OpenAI shape, or in Anthropic's for its endpoints."""
    headers = {401: {"WWW-Authenticate": "Bearer"}, 429: {"Retry-After": str(RETRY_AFTER_S)}}.get(error.status)
    body = AnthropicError.from_openai(error.status, error.message, error.type).body() if anthropic else error.body()
    return web.json_response(body, status=error.status, headers=headers, dumps=api.dumps)


def from_engine(exc: EngineError, param=None) -> api.ApiError:
    if isinstance(exc, Refusal) and exc.limit == "shutting_down":
        return api.ApiError(503, exc.message, "server_error", param, "shutting_down")
    if isinstance(exc, InvalidArgumentError):
        return api.invalid(exc, param)
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


@dataclass
class Prompt:
    """What a request's turn continues: text (tokenized with or without special tokens) or token ids."""

    text: Optional[str]
    tokens: Optional[list[int]] = None
    add_special: bool = False


@dataclass
class Generation:
    """One request's turn on a pooled session. Iterate it for token and done events; truncations are counted."""

    turn: Turn
    checkout: Checkout
    endpoint: str
    record: _Record
    evicted: int  # tokens of the conversation out of the model's view, so far
    meters: HttpMeters
    first_token_at: Optional[float] = None
    _events: Optional[AsyncIterator] = field(default=None, repr=False)

    async def _pull(self):
        async for event in self.turn:
            if isinstance(event, TruncatedEvent):
                self.evicted = max(self.evicted, event.total_evicted)
                continue
            if isinstance(event, TokenEvent) and self.first_token_at is None:
                self.first_token_at = time.perf_counter()
                self.meters.ttft.observe(self.first_token_at - self.record.started, {"endpoint": self.endpoint})
            yield event

    def __aiter__(self):
        if self._events is None:
            self._events = self._pull()
        return self._events

    async def first(self):
        """The first token (or the done event, or None): the prompt has been read, its evictions counted."""
        return await anext(aiter(self), None)

    def counts(self, done: DoneEvent) -> TokenCounts:
        prompt = self.checkout.prompt_tokens
        return TokenCounts(prompt, min(done.cached_tokens, prompt), done.generated_tokens, self.evicted)


class HttpFront:
    """The parts every endpoint shares, over the daemon core and a session pool."""

    def __init__(self, core: DaemonCore, options: HttpOptions):
        self.core = core
        self.options = options
        self.model_name = core.engine.model_info()["name"]
        self.max_new_tokens = core.engine.config.max_new_tokens
        self.started_at = time.time()
        self.meters = core.counters.http
        self.pool = SessionPool(core, options.max_sessions)
        self._numbers = itertools.count(1)

    # -- middleware: CORS, auth, the error envelope, metrics and the request's log line

    @web.middleware
    async def middleware(self, request: web.Request, handler):
        started = time.perf_counter()
        resource = request.match_info.route.resource
        endpoint = resource.canonical if resource is not None else "unmatched"
        record = _Record(next(self._numbers), started)
        _RECORD.set(record)
        anthropic = request.path.startswith(ANTHROPIC_PREFIX)
        status = 500
        try:
            origin = request.headers.get("Origin")
            if origin is not None:
                self._check_origin(origin)
                if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
                    response = self._preflight(request)
                    status = response.status
                    return response
            if self.options.api_keys and endpoint != "/healthz":
                self._authorize(request)
            response = await handler(request)
            status = response.status
            return response
        except api.ApiError as exc:
            status = exc.status
            return error_response(exc, anthropic)
        except AnthropicError as exc:
            status = exc.status
            return web.json_response(exc.body(), status=exc.status, dumps=api.dumps)
        except EngineError as exc:
            error = from_engine(exc)
            status = error.status
            return error_response(error, anthropic)
        except web.HTTPException as exc:
            error = from_http(exc, request.method, self.options.max_body_bytes)
            status = error.status
            return error_response(error, anthropic)
        except asyncio.CancelledError:
            status = 499  # the client went away (nginx's code for it)
            raise
        except Exception:
            log.exception("http %d: unhandled error in %s %s", record.number, request.method, endpoint)
            status = 500
            error = api.ApiError(500, "internal error; see the daemon log", "server_error", code="internal")
            return error_response(error, anthropic)
        finally:
            elapsed = time.perf_counter() - started
            self.meters.requests.inc({"endpoint": endpoint, "code": str(status)})
            self.meters.latency.observe(elapsed, {"endpoint": endpoint})
            _log_request(request, record, endpoint, status, elapsed)

    def _origin_allowed(self, origin: str) -> bool:
        allowed = self.options.cors_origins
        return "*" in allowed or origin in allowed

    def _check_origin(self, origin: str) -> None:
        """A browser page may call the API only from an allowed origin (a page elsewhere must not drive it)."""
        if not self._origin_allowed(origin):
            configured = ",".join(self.options.cors_origins)
            raise api.ApiError(
                403,
                f"requests from origin {quote(origin)} are not allowed (http_cors_origins={configured!r})",
                "permission_error",
                code="origin_not_allowed",
            )

    def _preflight(self, request: web.Request) -> web.Response:
        headers = {
            "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
            "Access-Control-Allow-Headers": request.headers.get("Access-Control-Request-Headers", ""),
            "Access-Control-Max-Age": str(_CORS_MAX_AGE_S),
        }
        return web.Response(status=204, headers=headers)

    async def on_response_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        """CORS headers on every response to an allowed origin, streams included."""
        origin = request.headers.get("Origin")
        if origin is not None and self._origin_allowed(origin):
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Expose-Headers"] = EVICTED_HEADER
            response.headers.add("Vary", "Origin")

    def _authorize(self, request: web.Request) -> None:
        """A bearer key (OpenAI's clients) or an x-api-key header (Anthropic's)."""
        header = request.headers.get("Authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            key = request.headers.get("x-api-key", "")
        if not key.strip():
            raise api.ApiError(
                401,
                "missing API key: send the header 'Authorization: Bearer <key>' (or 'x-api-key: <key>')",
                "authentication_error",
                code="invalid_api_key",
            )
        # aiohttp keeps a header's non-UTF-8 bytes as surrogate escapes: compare the bytes that came.
        given = key.strip().encode("utf-8", "surrogateescape")
        if not any(hmac.compare_digest(given, k.encode()) for k in self.options.api_keys):
            raise api.ApiError(401, "incorrect API key", "authentication_error", code="invalid_api_key")

    async def json_body(self, request: web.Request) -> dict:
        limit = self.options.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise api.ApiError(
                413,
                f"request body of {request.content_length} bytes exceeds http_max_body_bytes={limit}",
                code="request_too_large",
            )
        try:
            async with asyncio.timeout(self.options.frame_timeout_s):
                raw = await request.read()
        except TimeoutError:
            log.warning(
                "http %d: the request body did not arrive within frame_timeout_s=%g",
                _RECORD.get().number,
                self.options.frame_timeout_s,
            )
            raise api.ApiError(
                408,
                f"the request body did not arrive within frame_timeout_s={self.options.frame_timeout_s:g}",
                code="timeout",
            ) from None
        return api.parse_body(raw)

    def check_model(self, body: dict) -> str:
        """The id replies carry. One model is served, so any id names it (the served name, the folder, ...)."""
        api.get(body, "model", lambda v: isinstance(v, str), "a string")
        return self.model_name

    # -- endpoints every API shares

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
        return web.json_response(self._model_card())

    async def metrics(self, request: web.Request) -> web.Response:
        text = render_metrics(self.core.stats(), self.meters, len(self.pool), self.pool.max_sessions)
        return web.Response(body=text.encode(), headers={"Content-Type": CONTENT_TYPE})

    # -- a request's turn

    @contextlib.asynccontextmanager
    async def generation(
        self, request: web.Request, endpoint: str, prompt: Prompt, wanted: GenerationRequest
    ) -> AsyncIterator[Generation]:
        """Lease a pooled session holding the prompt and start the turn; on exit end it and give the session back."""
        self.core.refuse_if_stopping()
        record = _RECORD.get()
        holder = f"http {record.number} ({request.method} {endpoint})"
        checkout = await self.pool.checkout(prompt.text, prompt.tokens, prompt.add_special, holder)
        text_after, length_after = None, 0
        try:
            evicted = (await self.core.session_info(checkout.session_id))["evicted_tokens"]
            turn = self.core.open_turn(checkout.lease, wanted)
            try:
                await turn.start()
                yield Generation(turn, checkout, endpoint, record, evicted, self.meters)
            finally:
                await turn.close()
            done = turn.done
            if done is not None and done.stop_reason in ("eos", "stop_sequence", "max_tokens") and checkout.text:
                # The history is now this text: the next turn of the conversation matches it.
                text_after = checkout.text + await self.core.detokenize(done.token_ids)
                length_after = checkout.prompt_tokens + done.generated_tokens
        finally:
            self.pool.release(checkout, text_after, length_after)

    def account(self, generation: Generation, done: DoneEvent) -> TokenCounts:
        """Count the turn's tokens in the meters and the request's log line."""
        counts = generation.counts(done)
        tokens, endpoint = self.meters.tokens, generation.endpoint
        tokens.inc({"endpoint": endpoint, "kind": "prompt"}, counts.prompt)
        tokens.inc({"endpoint": endpoint, "kind": "cached"}, counts.cached)
        tokens.inc({"endpoint": endpoint, "kind": "completion"}, counts.completion)
        generation.record.counts = counts
        return counts


def evicted_headers(evicted: int) -> dict:
    """The header saying the conversation did not fit, when it did not."""
    return {EVICTED_HEADER: str(evicted)} if evicted else {}


def _log_request(request: web.Request, record: _Record, endpoint: str, status: int, elapsed: float) -> None:
    c = record.counts
    tokens = ""
    if c is not None:
        tokens = f": {c.prompt} prompt ({c.cached} cached) + {c.completion} generated tokens"
        if c.evicted:
            tokens += f", {c.evicted} evicted"
    where = endpoint if endpoint != "unmatched" else quote(request.path)
    log.info("http %d: %s %s %d%s in %.3fs", record.number, request.method, where, status, tokens, elapsed)
