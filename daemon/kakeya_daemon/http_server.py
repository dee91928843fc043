"""The HTTP front's listeners: aiohttp on loopback TCP and/or a Unix socket, under the daemon's bounds.

aiohttp parses HTTP; its per-connection protocol is subclassed here (aiohttp's
`web.RequestHandler`, created by our own listener factory) for what aiohttp does
not do itself: a cap on open connections (`http_max_connections`), a time limit
for a request to arrive once begun (`frame_timeout_s`), refusing peers of another
user on the Unix socket, and errors from its HTTP parser in the OpenAI shape
instead of plain text. The sockets were bound before the model loaded (listeners.py).
"""

import asyncio
import logging
from dataclasses import dataclass
from typing import Optional

from aiohttp import web

from kakeya_protocol.quote import quote

from . import openai_api as api
from .core import DaemonCore
from .http_anthropic import AnthropicEndpoints
from .http_handlers import HttpFront, HttpOptions
from .http_openai import OpenAIEndpoints
from .lifecycle import check_peer
from .listeners import HttpListeners

log = logging.getLogger("kakeya.http")


@dataclass(frozen=True)
class ListenOptions:
    """How many connections the HTTP front keeps, and for how long (where it listens: listeners.HttpListeners)."""

    max_connections: int = 64
    keepalive_s: float = 75.0
    frame_timeout_s: float = 30.0


def _raw_error(status: int, reason: str, error: api.ApiError) -> bytes:
    body = api.dumps(error.body()).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


class _Connection(web.RequestHandler):
    """One HTTP connection: aiohttp's protocol plus the daemon's bounds.

    A connection refused (another user's process, or one past http_max_connections)
    gets its answer to its first request, then is closed: answering before reading
    the request would make the kernel reset the connection over the unread bytes,
    and the client would see no answer at all.
    """

    def __init__(self, server: "HttpServer", *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._front = server
        self._counted = False
        self._deadline: Optional[asyncio.TimerHandle] = None
        self.in_request = False
        self.refusal: Optional[api.ApiError] = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        front = self._front
        refusal, _pid = check_peer(transport.get_extra_info("socket"))
        if refusal is not None:
            self._refuse("peer_uid", api.ApiError(403, refusal, "permission_error", code="peer_uid"))
        elif front.open_connections >= front.listen.max_connections:
            message = f"too many HTTP connections (http_max_connections={front.listen.max_connections}); try again"
            self._refuse("http_max_connections", api.ApiError(503, message, "server_error", code="http_max_connections"))
        else:
            self._counted = True
            front.open_connections += 1
            front.core.counters.http_connections += 1
        self._start_clock()  # its first request must arrive within frame_timeout_s

    def _refuse(self, limit: str, error: api.ApiError) -> None:
        self._front.core.counters.rejections[limit] += 1
        log.warning("http: refused a connection: %s", error.message)
        self.refusal = error

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        if self._counted:
            self._counted = False
            self._front.open_connections -= 1
            self._front.core.counters.http_connections -= 1
        self._stop_clock()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self.in_request and self._deadline is None:
            self._start_clock()
        super().data_received(data)

    def request_began(self) -> None:
        self.in_request = True
        self._stop_clock()

    def request_ended(self) -> None:
        self.in_request = False

    def _start_clock(self) -> None:
        self._deadline = asyncio.get_running_loop().call_later(self._front.listen.frame_timeout_s, self._timed_out)

    def _stop_clock(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _timed_out(self) -> None:
        self._deadline = None
        if self.in_request or self.transport is None:
            return
        timeout = self._front.listen.frame_timeout_s
        log.warning("http: closing a connection: a request stayed incomplete for frame_timeout_s=%g", timeout)
        message = f"the request did not arrive whole within frame_timeout_s={timeout:g}"
        self.transport.write(_raw_error(408, "Request Timeout", api.ApiError(408, message, code="timeout")))
        self.transport.close()

    def handle_error(self, request, status: int = 500, exc=None, message=None) -> web.StreamResponse:
        """aiohttp's answer to a request its parser refused: the same status, in the OpenAI error shape."""
        if status >= 500:
            log.error("http: internal error handling a request: %r", exc)
            error = api.ApiError(status, "internal error; see the daemon log", "server_error", code="internal")
        else:
            text = getattr(exc, "message", None) or message or "bad request"
            log.info("http: refused a malformed request: %d %s", status, quote(str(text), 200))
            error = api.ApiError(status, f"malformed HTTP request: {quote(str(text), 200)}", code="bad_request")
        response = web.json_response(error.body(), status=status, dumps=api.dumps)
        response.force_close()
        return response


class HttpServer:
    """A running HTTP front; `urls` lists where it listens."""

    def __init__(self, core: DaemonCore, options: HttpOptions, listen: ListenOptions, bound: HttpListeners):
        self.core = core
        self.listen = listen
        self.bound = bound
        self.front = HttpFront(core, options)
        self.open_connections = 0
        self.urls = list(bound.urls)
        self._listeners: list[asyncio.AbstractServer] = []
        self._runner: Optional[web.AppRunner] = None

    async def start(self) -> None:
        """Serve on the bound sockets."""
        front = self.front
        openai_endpoints, anthropic_endpoints = OpenAIEndpoints(front), AnthropicEndpoints(front)
        app = web.Application(
            middlewares=[self._bounds, front.middleware], client_max_size=front.options.max_body_bytes
        )
        app.on_response_prepare.append(front.on_response_prepare)
        app.router.add_get("/healthz", front.healthz)
        app.router.add_get("/info", front.info)
        app.router.add_get("/metrics", front.metrics)
        app.router.add_get("/v1/models", front.list_models)
        app.router.add_get("/v1/models/{model}", front.get_model)
        app.router.add_post("/v1/chat/completions", openai_endpoints.chat_completions)
        app.router.add_post("/v1/completions", openai_endpoints.completions)
        app.router.add_post("/v1/messages", anthropic_endpoints.messages)
        app.router.add_post("/v1/messages/count_tokens", anthropic_endpoints.count_tokens)
        # handler_cancellation: a client that disconnects cancels its handler, which closes its turn.
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=5.0)
        await self._runner.setup()
        loop = asyncio.get_running_loop()
        try:
            for sock in self.bound.sockets:
                self._listeners.append(await loop.create_server(self._make_connection, sock=sock))
        except BaseException:
            await self.stop()
            raise
        log.info("HTTP front listening on %s", ", ".join(self.urls))

    def _make_connection(self) -> _Connection:
        listen = self.listen
        return _Connection(
            self,
            self._runner.server,
            loop=asyncio.get_running_loop(),
            keepalive_timeout=listen.keepalive_s,
            access_log=None,
        )

    @web.middleware
    async def _bounds(self, request: web.Request, handler):
        protocol = request.protocol
        if isinstance(protocol, _Connection) and protocol.refusal is not None:
            response = web.json_response(protocol.refusal.body(), status=protocol.refusal.status, dumps=api.dumps)
            response.force_close()
            return response
        if isinstance(protocol, _Connection):
            protocol.request_began()
        try:
            return await handler(request)
        finally:
            if isinstance(protocol, _Connection):
                protocol.request_ended()

    def stop_accepting(self) -> None:
        for server in self._listeners:
            server.close()

    async def stop(self) -> None:
        """Stop listening, let in-flight requests end (their turns were ended by the core), release the socket."""
        self.stop_accepting()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self.bound.close()


async def start_http(core: DaemonCore, options: HttpOptions, listen: ListenOptions, bound: HttpListeners) -> HttpServer:
    """Serve the HTTP front on the sockets `bound` (listeners.bind_http) holds."""
    server = HttpServer(core, options, listen, bound)
    await server.start()
    return server

