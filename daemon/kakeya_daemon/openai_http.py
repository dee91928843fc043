"""An OpenAI-compatible HTTP front (aiohttp) over the engine's resident sessions.

Off unless asked for: the daemon serves it on loopback TCP and/or a Unix socket
when given a port or a socket path. Requests are stateless, as in the OpenAI API,
but caches are not thrown away: a request whose prompt extends the history of one
of this front's idle sessions continues that session, so only the new suffix runs
through the model and the reused part is reported as cached tokens.

Prefix matching works at two levels. Token level: a session whose whole history is
a prefix of the prompt's tokens. Text level: a session whose history came from text
(the rendered chat prompt plus the decoded reply) that is a prefix of the new
prompt's text; the new prompt then continues that exact history with only the
remaining text tokenized. The text level is what makes chat turns reuse their
cache even when re-tokenizing the model's own reply would split it differently.
"""

import asyncio
import contextlib
import errno
import hmac
import json
import logging
import math
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncContextManager, Optional, Protocol

from aiohttp import web

from kakeya_mlx.errors import EngineError, InvalidArgumentError, NotFoundError, ResourceExhaustedError
from kakeya_mlx.events import DoneEvent, TokenEvent
from kakeya_mlx.sampling import SamplingParams

from . import prometheus

log = logging.getLogger("kakeya.http")

# Engine error codes -> HTTP status and OpenAI error type.
ERROR_STATUS = {
    "invalid_argument": (400, "invalid_request_error"),
    "protocol_error": (400, "invalid_request_error"),
    "not_found": (404, "invalid_request_error"),
    "resource_exhausted": (429, "rate_limit_error"),
    "busy": (429, "rate_limit_error"),
    "internal": (500, "server_error"),
}
FINISH_REASONS = {"eos": "stop", "stop_sequence": "stop", "max_tokens": "length"}
# Per https://platform.openai.com/docs/api-reference: temperature is in [0, 2].
MAX_TEMPERATURE = 2.0


@dataclass
class HttpOptions:
    """Where the HTTP front listens and its limits. port None = no TCP; port 0 = any free port."""

    host: str = "127.0.0.1"
    port: Optional[int] = None
    unix_socket: Optional[str] = None
    api_keys: tuple[str, ...] = ()
    max_body_bytes: int = 1 << 20
    max_sessions: int = 8
    model_name: Optional[str] = None


class HttpHooks(Protocol):
    """What the daemon lends the HTTP front."""

    def generation_slot(self) -> AsyncContextManager[None]:
        """Admission for one generation; raises ResourceExhaustedError naming the limit."""

    def stats(self) -> dict:
        """The daemon's `stats` reply, for /metrics."""

    def count_rejection(self, reason: str) -> None:
        """Count a refusal under `reason` in the daemon's rejection counters."""


class ApiError(Exception):
    """A request the front refuses, with its HTTP status and OpenAI error fields."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    @classmethod
    def from_engine(cls, exc: EngineError, param=None) -> "ApiError":
        status, kind = ERROR_STATUS.get(exc.code, (500, "server_error"))
        return cls(status, exc.message, kind, param, exc.code)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> web.Response:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return web.json_response(self.body(), status=self.status, headers=headers, dumps=_dumps)


def _dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _bad(param: str, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, f"{param}: {message}", param=param, code=code)


def _unsupported(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}", param=param, code="unsupported_parameter")


# ---- request validation ----------------------------------------------------


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _get(body: dict, name: str, check, what: str, default=None):
    """body[name] if present and not null, checked with `check`; else default."""
    value = body.get(name)
    if value is None:
        return default
    if not check(value):
        raise ApiError(400, f"{name}={value!r}: expected {what}", param=name, code="invalid_type")
    return value


@dataclass(frozen=True)
class GenerationParams:
    """The generation settings of one request, validated."""

    max_tokens: int
    sampling: SamplingParams
    stop: list[str]
    stream: bool
    include_usage: bool


def _generation_params(body: dict, max_new_tokens: int, chat: bool) -> GenerationParams:
    names = ("max_completion_tokens", "max_tokens") if chat else ("max_tokens",)
    max_tokens, max_param = max_new_tokens, names[-1]
    for name in reversed(names):  # max_completion_tokens wins where both are given
        value = _get(body, name, _is_int, "an integer")
        if value is not None:
            max_tokens, max_param = value, name
    if max_tokens < 1:
        raise _bad(max_param, f"{max_tokens} must be >= 1")
    if max_tokens > max_new_tokens:
        raise _bad(max_param, f"{max_tokens} exceeds this server's limit max_new_tokens={max_new_tokens}")

    temperature = _get(body, "temperature", _is_number, "a number", 1.0)
    if not 0 <= temperature <= MAX_TEMPERATURE:
        raise _bad("temperature", f"{temperature} must be in [0, {MAX_TEMPERATURE:g}] (0 = greedy)")
    top_p = _get(body, "top_p", _is_number, "a number", 1.0)
    if not 0 < top_p <= 1:
        raise _bad("top_p", f"{top_p} must be in (0, 1]")
    # Extensions that llama.cpp's and mlx-lm's servers also accept.
    top_k = _get(body, "top_k", _is_int, "an integer", 0)
    if top_k < 0:
        raise _bad("top_k", f"{top_k} must be >= 0 (0 turns it off)")
    min_p = _get(body, "min_p", _is_number, "a number", 0.0)
    if not 0 <= min_p <= 1:
        raise _bad("min_p", f"{min_p} must be in [0, 1]")
    repetition_penalty = _get(body, "repetition_penalty", _is_number, "a number", 1.0)
    if repetition_penalty <= 0:
        raise _bad("repetition_penalty", f"{repetition_penalty} must be > 0 (1 turns it off)")
    seed = _get(body, "seed", _is_int, "an integer")
    if seed is not None and not 0 <= seed < 2**63:
        raise _bad("seed", f"{seed} must be in [0, 2**63)")

    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise ApiError(400, f"stop={stop!r}: expected a string or a list of strings", param="stop", code="invalid_type")
    if any(not s for s in stop):
        raise _bad("stop", "stop strings must not be empty")

    stream = _get(body, "stream", lambda v: isinstance(v, bool), "a boolean", False)
    options = _get(body, "stream_options", lambda v: isinstance(v, dict), "an object", {})
    include_usage = _get(options, "include_usage", lambda v: isinstance(v, bool), "a boolean", False)
    if options and not stream:
        raise _bad("stream_options", "only allowed when stream is true")

    sampling = SamplingParams(
        temperature=float(temperature),
        top_p=float(top_p),
        top_k=top_k,
        min_p=float(min_p),
        repetition_penalty=float(repetition_penalty),
        seed=seed,
    )
    return GenerationParams(max_tokens, sampling, stop, stream, include_usage)


def _reject_unsupported(body: dict, chat: bool) -> None:
    """A clear 400 for every field that would change what comes back if ignored.

    Fields not named here and not used are ignored (user, metadata, store, ...).
    """
    n = _get(body, "n", _is_int, "an integer", 1)
    if n != 1:
        raise _unsupported("n", f"{n}: only n=1 is supported (one choice per request)")
    for name in ("frequency_penalty", "presence_penalty"):
        if _get(body, name, _is_number, "a number", 0) != 0:
            raise _unsupported(name, "only 0 is supported; repetition_penalty is available instead")
    if _get(body, "logit_bias", lambda v: isinstance(v, dict), "an object", {}):
        raise _unsupported("logit_bias", "not supported")
    if chat:
        if _get(body, "logprobs", lambda v: isinstance(v, bool), "a boolean", False):
            raise _unsupported("logprobs", "log probabilities are not supported")
        if body.get("top_logprobs") is not None:
            raise _unsupported("top_logprobs", "log probabilities are not supported")
        for name in ("tools", "functions"):
            if _get(body, name, lambda v: isinstance(v, list), "a list", []):
                raise _unsupported(name, "tool and function calling are not supported")
        for name in ("tool_choice", "function_call"):
            if body.get(name) not in (None, "none", "auto"):  # with no tools given, "auto" calls none
                raise _unsupported(name, "tool and function calling are not supported")
        fmt = _get(body, "response_format", lambda v: isinstance(v, dict), "an object")
        if fmt is not None and fmt.get("type") != "text":
            raise _unsupported("response_format", 'only {"type": "text"} is supported (no JSON mode)')
        modalities = body.get("modalities")
        if modalities is not None and modalities != ["text"]:
            raise _unsupported("modalities", 'only ["text"] is supported')
        for name in ("audio", "prediction", "web_search_options"):
            if body.get(name) is not None:
                raise _unsupported(name, "not supported")
    else:
        if _get(body, "logprobs", _is_int, "an integer", 0):
            raise _unsupported("logprobs", "log probabilities are not supported")
        if _get(body, "echo", lambda v: isinstance(v, bool), "a boolean", False):
            raise _unsupported("echo", "echoing the prompt is not supported")
        if _get(body, "best_of", _is_int, "an integer", 1) != 1:
            raise _unsupported("best_of", "only best_of=1 is supported")
        if _get(body, "suffix", lambda v: isinstance(v, str), "a string", ""):
            raise _unsupported("suffix", "insertion (suffix) is not supported")


_CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def _content_text(content, where: str) -> str:
    """A message's content as text: a string, or a list of text parts joined by newlines."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ApiError(
            400,
            f"{where}.content: expected a string or a list of content parts",
            param=f"{where}.content",
            code="invalid_type",
        )
    texts = []
    for j, part in enumerate(content):
        param = f"{where}.content[{j}]"
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise ApiError(
                400, f"{param}: expected a content part with a string type", param=param, code="invalid_type"
            )
        if part["type"] != "text":
            raise _unsupported(
                param, f"content parts of type {part['type']!r} are not supported; this model reads text parts only"
            )
        if not isinstance(part.get("text"), str):
            raise ApiError(400, f"{param}.text: expected a string", param=f"{param}.text", code="invalid_type")
        texts.append(part["text"])
    return "\n".join(texts)


def _chat_messages(value) -> list[dict]:
    """The request's messages as [{role, content: str}], in the roles chat templates know."""
    if not isinstance(value, list) or not value:
        raise ApiError(400, "messages: expected a non-empty list of messages", param="messages", code="invalid_type")
    out = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ApiError(400, f"{where}: expected an object with role and content", param=where, code="invalid_type")
        role = message.get("role")
        if role in ("tool", "function"):
            raise _unsupported(f"{where}.role", f"{role!r} messages are not supported (no tool calling)")
        if role not in _CHAT_ROLES:
            raise _bad(f"{where}.role", f"{role!r} is not one of {', '.join(_CHAT_ROLES)}")
        for key in ("tool_calls", "function_call", "tool_call_id", "audio"):
            if message.get(key) is not None:
                raise _unsupported(f"{where}.{key}", "tool calls and audio are not supported")
        if message.get("name") is not None and not isinstance(message["name"], str):
            raise ApiError(400, f"{where}.name: expected a string", param=f"{where}.name", code="invalid_type")
        content = message.get("content")
        if content is None and role == "assistant":
            content = ""
        out.append({"role": _CHAT_ROLES[role], "content": _content_text(content, where)})
    return out


def _completion_prompt(value) -> tuple[Optional[str], Optional[list[int]]]:
    """(text, None) or (None, token ids) for a completions prompt."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]  # a batch of one
    if isinstance(value, str):
        if not value:
            raise _bad("prompt", "must not be empty")
        return value, None
    if isinstance(value, list) and value and all(_is_int(t) for t in value):
        if any(t < 0 for t in value):
            raise _bad("prompt", "token ids must be >= 0")
        return None, list(value)
    if isinstance(value, list) and len(value) > 1 and all(isinstance(p, (str, list)) for p in value):
        raise _unsupported("prompt", "batched prompts are not supported; send one prompt per request")
    raise ApiError(
        400, "prompt: expected a non-empty string or a non-empty list of token ids", param="prompt", code="invalid_type"
    )


# ---- sessions --------------------------------------------------------------


@dataclass
class HttpSession:
    """One engine session this front created, and what its history came from."""

    id: str
    # Text whose tokenization, piece by piece, is the session's history; None when unknown.
    text: Optional[str]
    # Whether that text was tokenized with the tokenizer's special tokens (completions) or not (chat).
    add_special: bool
    # The history length `text` describes: a session appended to by anyone else no longer matches by text.
    length: int = 0
    last_used: float = field(default_factory=time.monotonic)


@dataclass
class Turn:
    """A session checked out for one request, its history already extended to the prompt."""

    session: HttpSession
    prompt_tokens: int
    text: Optional[str]


class SessionPool:
    """The HTTP front's sessions: longest-prefix reuse, at most max_sessions, LRU eviction."""

    def __init__(self, engine, max_sessions: int, on_reject):
        self.engine = engine
        self.max_sessions = max_sessions
        self.evicted = 0
        self._on_reject = on_reject
        self._sessions: dict[str, HttpSession] = {}
        self._busy: set[str] = set()

    def __len__(self) -> int:
        return len(self._sessions)

    def _prune(self) -> None:
        """Forget sessions the daemon closed (idle timeout, memory governor)."""
        for sid in [s for s in self._sessions if not self.engine.has_session(s)]:
            del self._sessions[sid]

    def _idle_ids(self) -> list[str]:
        return [s for s in self._sessions if s not in self._busy]

    def _text_match(self, text: str, add_special: bool) -> Optional[HttpSession]:
        best = None
        for sid in self._idle_ids():
            s = self._sessions[sid]
            if s.text is None or s.add_special != add_special or not text.startswith(s.text):
                continue
            if best is None or len(s.text) > len(best.text):
                best = s
        return best

    async def checkout(self, text: Optional[str], tokens: Optional[list[int]], add_special: bool) -> Turn:
        """Find or make a session whose history is the prompt (append the missing suffix)."""
        engine = self.engine
        if tokens is None:
            tokens = await engine.tokenize(text, add_special_tokens=add_special)
            if not tokens:
                raise _bad("prompt", "the prompt tokenizes to nothing")
        self._prune()
        sid, reused = engine.longest_prefix_session(tokens, among=self._idle_ids())
        if text is not None:
            match = self._text_match(text, add_special)
            if match is not None:
                history = engine.session_history(match.id)
                if len(history) == match.length > reused:
                    rest = text[len(match.text) :]
                    extra = await engine.tokenize(rest, add_special_tokens=False) if rest else []
                    still = match.id in self._sessions and match.id not in self._busy and engine.has_session(match.id)
                    if still and len(engine.session_history(match.id)) == len(history):
                        sid, reused, tokens = match.id, len(history), history + extra
                    else:
                        # Taken while the rest was tokenized: redo the token-level match.
                        sid, reused = engine.longest_prefix_session(tokens, among=self._idle_ids())

        created = sid is None
        if created:
            await self._make_room()
            sid = await engine.create_session()
            self._sessions[sid] = HttpSession(sid, None, add_special)
        session = self._sessions[sid]
        self._busy.add(sid)
        try:
            if len(tokens) > reused:
                await engine.append(sid, tokens=tokens[reused:])
        except BaseException:
            self._busy.discard(sid)
            if created:
                await self._drop(sid)
            raise
        session.text, session.add_special, session.length = text, add_special, len(tokens)
        session.last_used = time.monotonic()
        return Turn(session, len(tokens), text)

    def release(self, turn: Turn, text: Optional[str], length: int) -> None:
        """Give the session back; `text` is the text of its first `length` history tokens (None if unknown)."""
        turn.session.text, turn.session.length = text, length
        turn.session.last_used = time.monotonic()
        self._busy.discard(turn.session.id)

    async def _make_room(self) -> None:
        while len(self._sessions) >= self.max_sessions:
            idle = [self._sessions[s] for s in self._idle_ids()]
            if not idle:
                self._on_reject("http_max_sessions")
                raise ResourceExhaustedError(
                    f"all {self.max_sessions} sessions of the HTTP front are generating "
                    f"(http max_sessions={self.max_sessions}); try again shortly"
                )
            victim = min(idle, key=lambda s: s.last_used)
            await self._drop(victim.id)
            self.evicted += 1

    async def _drop(self, sid: str) -> None:
        self._sessions.pop(sid, None)
        with contextlib.suppress(NotFoundError):
            await self.engine.close_session(sid)

    async def close_all(self) -> None:
        for sid in list(self._sessions):
            await self._drop(sid)


# ---- the application -------------------------------------------------------


class _Metrics:
    def __init__(self):
        self.requests = prometheus.Counter()
        self.tokens = prometheus.Counter()
        self.latency = prometheus.Histogram()
        self.ttft = prometheus.Histogram()
        self.rejections = prometheus.Counter()


class OpenAIFront:
    """The request handlers, the session pool and the metrics of one HTTP front."""

    def __init__(self, engine, options: HttpOptions, hooks: Optional[HttpHooks]):
        self.engine = engine
        self.options = options
        self.hooks = hooks
        self.model_name = options.model_name or engine.model_info()["name"]
        self.started_at = time.time()
        self.meters = _Metrics()
        self.pool = SessionPool(engine, options.max_sessions, self._count_rejection)

    def _count_rejection(self, reason: str) -> None:
        if self.hooks is not None:
            self.hooks.count_rejection(reason)
        else:
            self.meters.rejections.inc({"reason": reason})

    def _slot(self) -> AsyncContextManager[None]:
        return self.hooks.generation_slot() if self.hooks is not None else contextlib.nullcontext()

    # -- middleware: auth, error envelope, request metrics

    @web.middleware
    async def middleware(self, request: web.Request, handler):
        started = time.perf_counter()
        resource = request.match_info.route.resource
        endpoint = resource.canonical if resource is not None else "unmatched"
        status = 500
        try:
            if self.options.api_keys and endpoint != "/healthz":
                self._authorize(request)
            response = await handler(request)
            status = response.status
            return response
        except ApiError as exc:
            status = exc.status
            return exc.response()
        except EngineError as exc:
            error = ApiError.from_engine(exc)
            status = error.status
            return error.response()
        except web.HTTPException as exc:
            error = _http_error(exc, request.method, self.options.max_body_bytes)
            status = error.status
            return error.response()
        except asyncio.CancelledError:
            status = 499  # the client went away (nginx's code for it)
            raise
        except Exception:
            log.exception("unhandled error in %s %s", request.method, request.path)
            status = 500
            return ApiError(500, "internal error; see the daemon log", "server_error", code="internal").response()
        finally:
            self.meters.requests.inc({"endpoint": endpoint, "code": str(status)})
            self.meters.latency.observe(time.perf_counter() - started, {"endpoint": endpoint})

    def _authorize(self, request: web.Request) -> None:
        header = request.headers.get("Authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise ApiError(
                401,
                "missing API key: send the header 'Authorization: Bearer <key>'",
                "authentication_error",
                code="invalid_api_key",
            )
        key = key.strip().encode()
        if not any(hmac.compare_digest(key, k.encode()) for k in self.options.api_keys):
            raise ApiError(401, "incorrect API key", "authentication_error", code="invalid_api_key")

    async def _json_body(self, request: web.Request) -> dict:
        limit = self.options.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise _too_large(request.content_length, limit)
        raw = await request.read()
        try:
            body = json.loads(raw, parse_constant=_reject_constant)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object", code="invalid_json")
        return body

    def _check_model(self, body: dict) -> None:
        model = _get(body, "model", lambda v: isinstance(v, str), "a string")
        if model is not None and model != self.model_name:
            raise ApiError(
                404,
                f"model {model!r} is not served here; this server serves {self.model_name!r}",
                param="model",
                code="model_not_found",
            )

    # -- endpoints

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "model": self.model_name})

    def _model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": int(self.started_at), "owned_by": "kakeya-mlx"}

    async def list_models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [self._model_card()]})

    async def get_model(self, request: web.Request) -> web.Response:
        if request.match_info["model"] != self.model_name:
            raise ApiError(
                404,
                f"model {request.match_info['model']!r} is not served here; this server serves {self.model_name!r}",
                param="model",
                code="model_not_found",
            )
        return web.json_response(self._model_card())

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.render_metrics().encode(), headers={"Content-Type": prometheus.CONTENT_TYPE})

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._json_body(request)
        self._check_model(body)
        _reject_unsupported(body, chat=True)
        params = _generation_params(body, self.engine.config.max_new_tokens, chat=True)
        messages = _chat_messages(body.get("messages"))
        try:
            text = self.engine.render_messages(messages, continuation=False, add_generation_prompt=True)
        except InvalidArgumentError as exc:
            raise ApiError.from_engine(exc, param="messages") from None
        return await self._complete(request, "/v1/chat/completions", params, text, None, add_special=False)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._json_body(request)
        self._check_model(body)
        _reject_unsupported(body, chat=False)
        params = _generation_params(body, self.engine.config.max_new_tokens, chat=False)
        if "prompt" not in body:
            raise ApiError(400, "prompt: required", param="prompt", code="missing_required_parameter")
        text, tokens = _completion_prompt(body["prompt"])
        return await self._complete(request, "/v1/completions", params, text, tokens, add_special=True)

    # -- generation

    async def _complete(
        self, request, endpoint, params: GenerationParams, text, tokens, add_special
    ) -> web.StreamResponse:
        chat = endpoint == "/v1/chat/completions"
        started = time.perf_counter()
        async with self._slot():
            turn = await self.pool.checkout(text, tokens, add_special)
            text_after, length_after = None, 0
            try:
                events = self.engine.generate(
                    turn.session.id, max_tokens=params.max_tokens, sampling=params.sampling, stop=params.stop
                )
                reply = _Reply(chat, self.model_name)
                if params.stream:
                    response = await self._stream(request, events, reply, params, turn, endpoint, started)
                else:
                    response = await self._collect(events, reply, turn, endpoint, started)
                if reply.done is not None and reply.done.stop_reason in FINISH_REASONS and turn.text is not None:
                    text_after = turn.text + await self.engine.detokenize(reply.done.token_ids)
                    length_after = turn.prompt_tokens + reply.done.generated_tokens
                return response
            finally:
                self.pool.release(turn, text_after, length_after)

    def _first_token(self, endpoint, started, reply) -> None:
        if reply.first_token_at is None:
            reply.first_token_at = time.perf_counter()
            self.meters.ttft.observe(reply.first_token_at - started, {"endpoint": endpoint})

    def _account(self, endpoint: str, turn: Turn, done: DoneEvent) -> dict:
        usage = _usage(turn, done)
        tokens = self.meters.tokens
        tokens.inc({"endpoint": endpoint, "kind": "prompt"}, usage["prompt_tokens"])
        tokens.inc({"endpoint": endpoint, "kind": "cached"}, usage["prompt_tokens_details"]["cached_tokens"])
        tokens.inc({"endpoint": endpoint, "kind": "completion"}, usage["completion_tokens"])
        return usage

    async def _collect(self, events, reply: "_Reply", turn: Turn, endpoint, started) -> web.Response:
        pieces = []
        async with contextlib.aclosing(events):
            async for event in events:
                if isinstance(event, TokenEvent):
                    self._first_token(endpoint, started, reply)
                    pieces.append(event.text)
                elif isinstance(event, DoneEvent):
                    reply.done = event
        done = reply.done
        if done.stop_reason not in FINISH_REASONS:
            raise _generation_error(done)
        usage = self._account(endpoint, turn, done)
        return web.json_response(reply.whole("".join(pieces), FINISH_REASONS[done.stop_reason], usage), dumps=_dumps)

    async def _stream(
        self, request, events, reply: "_Reply", params, turn: Turn, endpoint, started
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        async with contextlib.aclosing(events):
            await response.prepare(request)

            async def send(obj) -> None:
                await response.write(b"data: " + _dumps(obj).encode() + b"\n\n")

            try:
                if reply.chat:
                    await send(reply.chunk({"role": "assistant", "content": ""}))
                async for event in events:
                    if isinstance(event, TokenEvent):
                        self._first_token(endpoint, started, reply)
                        if event.text:
                            await send(reply.chunk(event.text))
                    elif isinstance(event, DoneEvent):
                        reply.done = event
                done = reply.done
                if done.stop_reason not in FINISH_REASONS:
                    await send(_generation_error(done).body())
                    return response
                usage = self._account(endpoint, turn, done)
                await send(reply.chunk(None, FINISH_REASONS[done.stop_reason]))
                if params.include_usage:
                    await send(reply.usage_chunk(usage))
                await response.write(b"data: [DONE]\n\n")
                await response.write_eof()
            except ConnectionError:
                pass  # the client left; closing `events` cancels the generation
        return response

    # -- metrics

    def _stats(self) -> dict:
        if self.hooks is not None:
            return self.hooks.stats()
        engine, counters = self.engine, self.engine.counters
        return {
            "uptime_s": time.time() - self.started_at,
            "sessions": {"active": len(engine.list_sessions())},
            "generations": {
                "active": sum(1 for s in engine.list_sessions() if s["generating"]),
                "total": counters["generations"],
            },
            "tokens": {"in": counters["tokens_in"], "out": counters["tokens_out"]},
            "memory": dict(engine.memory()),
            "rejections": {dict(labels)["reason"]: n for labels, n in self.meters.rejections.items()},
        }

    def render_metrics(self) -> str:
        """The Prometheus text for /metrics: the daemon's stats and this front's own counters."""
        stats = self._stats()
        out = prometheus.Exposition()
        out.add_value("kakeya_uptime_seconds", "gauge", "Seconds since the daemon started.", stats.get("uptime_s", 0.0))
        sessions = stats.get("sessions", {})
        out.add_value(
            "kakeya_sessions_active", "gauge", "Sessions held by the engine (all fronts).", sessions.get("active", 0)
        )
        if "max" in sessions:
            out.add_value("kakeya_sessions_max", "gauge", "Session limit of the daemon.", sessions["max"])
        if "evicted_idle" in sessions:
            out.add(
                "kakeya_sessions_evicted_total",
                "counter",
                "Sessions closed by the daemon, by reason.",
                [({"reason": "idle"}, sessions["evicted_idle"]), ({"reason": "lru"}, sessions.get("evicted_lru", 0))],
            )
        out.add_value("kakeya_http_sessions", "gauge", "Sessions held by the HTTP front.", len(self.pool))
        out.add_value("kakeya_http_sessions_max", "gauge", "Session limit of the HTTP front.", self.pool.max_sessions)
        out.add_value(
            "kakeya_http_sessions_evicted_total",
            "counter",
            "HTTP-front sessions closed to make room (LRU).",
            self.pool.evicted,
        )
        generations = stats.get("generations", {})
        out.add_value("kakeya_generations_active", "gauge", "Generations running now.", generations.get("active", 0))
        if "queued" in generations:
            out.add_value(
                "kakeya_generations_queued", "gauge", "Generations waiting for a slot.", generations["queued"]
            )
        out.add_value("kakeya_generations_total", "counter", "Generations finished.", generations.get("total", 0))
        tokens = stats.get("tokens", {})
        out.add(
            "kakeya_tokens_total",
            "counter",
            "Tokens run through the model (in: prompt, out: generated).",
            [({"direction": "in"}, tokens.get("in", 0)), ({"direction": "out"}, tokens.get("out", 0))],
        )
        rates = stats.get("tokens_per_s")
        if rates:
            out.add(
                "kakeya_tokens_per_second",
                "gauge",
                "Average throughput since start.",
                [({"phase": "prefill"}, rates.get("prefill", 0.0)), ({"phase": "decode"}, rates.get("decode", 0.0))],
            )
        memory = stats.get("memory", {})
        out.add(
            "kakeya_memory_bytes",
            "gauge",
            "MLX memory (active, peak, cache), session KV bytes (kv) and the budget.",
            [({"kind": k.removesuffix("_bytes")}, v) for k, v in sorted(memory.items())],
        )
        out.add(
            "kakeya_rejections_total",
            "counter",
            "Requests refused by admission, by the limit that refused them.",
            [({"reason": r}, n) for r, n in sorted(stats.get("rejections", {}).items())],
        )
        if "connections" in stats:
            out.add_value("kakeya_connections", "gauge", "Open Unix-socket protocol connections.", stats["connections"])
            out.add_value(
                "kakeya_protocol_requests_total",
                "counter",
                "Unix-socket protocol requests handled.",
                stats.get("requests", 0),
            )
        out.add_counter(
            "kakeya_http_requests_total", "HTTP requests by endpoint and status code.", self.meters.requests
        )
        out.add_counter(
            "kakeya_http_tokens_total", "HTTP prompt, cached (reused) and completion tokens.", self.meters.tokens
        )
        out.add_histogram(
            "kakeya_http_request_duration_seconds", "HTTP request latency (to the last byte).", self.meters.latency
        )
        out.add_histogram(
            "kakeya_http_time_to_first_token_seconds",
            "From request arrival to the first generated token.",
            self.meters.ttft,
        )
        return out.render()


class _Reply:
    """Builds the OpenAI response objects of one request."""

    def __init__(self, chat: bool, model: str):
        self.chat = chat
        self.model = model
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.done: Optional[DoneEvent] = None
        self.first_token_at: Optional[float] = None

    def _envelope(self, object_name: str, choices: list) -> dict:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model, "choices": choices}

    def whole(self, text: str, finish_reason: str, usage: dict) -> dict:
        if self.chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
            body = self._envelope("chat.completion", [choice])
        else:
            body = self._envelope(
                "text_completion", [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]
            )
        body["usage"] = usage
        return body

    def chunk(self, delta, finish_reason: Optional[str] = None) -> dict:
        """A streamed piece: delta is text, a chat delta map, or None for the closing chunk."""
        if self.chat:
            if delta is None:
                delta = {}
            elif isinstance(delta, str):
                delta = {"content": delta}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return self._envelope("chat.completion.chunk", [choice])
        return self._envelope(
            "text_completion", [{"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish_reason}]
        )

    def usage_chunk(self, usage: dict) -> dict:
        body = self._envelope("chat.completion.chunk" if self.chat else "text_completion", [])
        body["usage"] = usage
        return body


def _usage(turn: Turn, done: DoneEvent) -> dict:
    return {
        "prompt_tokens": turn.prompt_tokens,
        "completion_tokens": done.generated_tokens,
        "total_tokens": turn.prompt_tokens + done.generated_tokens,
        "prompt_tokens_details": {"cached_tokens": min(done.cached_tokens, turn.prompt_tokens)},
    }


def _generation_error(done: DoneEvent) -> ApiError:
    if done.stop_reason == "cancelled":
        return ApiError(
            500,
            "the generation was cancelled before it finished (the daemon may be stopping)",
            "server_error",
            code="cancelled",
        )
    status, kind = ERROR_STATUS.get(done.error_code or "internal", (500, "server_error"))
    return ApiError(status, done.error_message or "the generation failed", kind, code=done.error_code or "internal")


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _too_large(size: Optional[int], limit: int) -> ApiError:
    what = f"request body of {size} bytes" if size is not None else "request body"
    return ApiError(413, f"{what} exceeds max_body_bytes={limit}", code="request_too_large")


def _http_error(exc: web.HTTPException, method: str, max_body_bytes: int) -> ApiError:
    if exc.status == 413:
        return _too_large(None, max_body_bytes)
    if exc.status == 404:
        return ApiError(
            404,
            "no such endpoint; see GET /v1/models, POST /v1/chat/completions, POST /v1/completions",
            code="not_found",
        )
    if exc.status == 405:
        allowed = ", ".join(sorted(getattr(exc, "allowed_methods", ()))) or "another method"
        return ApiError(405, f"{method} is not allowed on this path; use {allowed}", code="method_not_allowed")
    kind = "server_error" if exc.status >= 500 else "invalid_request_error"
    return ApiError(exc.status, exc.reason, kind)


FRONT_KEY = web.AppKey("front", OpenAIFront)


def build_app(engine, options: HttpOptions, hooks: Optional[HttpHooks] = None) -> web.Application:
    """The aiohttp application of the HTTP front. hooks None: no admission, stats from the engine."""
    front = OpenAIFront(engine, options, hooks)
    app = web.Application(middlewares=[front.middleware], client_max_size=options.max_body_bytes)
    app[FRONT_KEY] = front
    app.router.add_get("/healthz", front.healthz)
    app.router.add_get("/metrics", front.metrics)
    app.router.add_get("/v1/models", front.list_models)
    app.router.add_get("/v1/models/{model}", front.get_model)
    app.router.add_post("/v1/chat/completions", front.chat_completions)
    app.router.add_post("/v1/completions", front.completions)
    return app


class HttpServer:
    """A running HTTP front; `urls` lists where it listens."""

    def __init__(self, runner: web.AppRunner, front: OpenAIFront, unix_socket: Optional[Path]):
        self.runner = runner
        self.front = front
        self.unix_socket = unix_socket
        self.urls: list[str] = []
        for address in runner.addresses:
            if isinstance(address, tuple):
                host = address[0]
                self.urls.append(f"http://{'[' + host + ']' if ':' in host else host}:{address[1]}")
            else:
                self.urls.append(f"unix:{address}")

    async def stop(self) -> None:
        """Stop listening, let in-flight requests end, and close this front's sessions."""
        await self.runner.cleanup()
        await self.front.pool.close_all()
        if self.unix_socket is not None:
            with contextlib.suppress(FileNotFoundError):
                self.unix_socket.unlink()


def _claim_unix_socket(path: Path) -> None:
    """Remove a stale socket file at `path`; refuse if something listens there or it is not a socket."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not os.path.lexists(path):
        return
    if not path.is_socket():
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink()
        return
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, f"another server is listening on {path}")


async def start_http(engine, options: HttpOptions, hooks: Optional[HttpHooks] = None) -> HttpServer:
    """Serve the HTTP front on TCP (options.port) and/or a Unix socket (options.unix_socket)."""
    if options.port is None and not options.unix_socket:
        raise ValueError("the HTTP front needs a TCP port or a Unix socket path")
    app = build_app(engine, options, hooks)
    # handler_cancellation: a client that disconnects cancels its handler, which
    # leaves the engine's event stream and so cancels the generation.
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    unix_path = None
    try:
        if options.port is not None:
            await web.TCPSite(runner, options.host, options.port).start()
        if options.unix_socket:
            unix_path = Path(options.unix_socket).expanduser()
            _claim_unix_socket(unix_path)
            await web.UnixSite(runner, str(unix_path)).start()
            unix_path.chmod(0o600)
    except BaseException:
        await runner.cleanup()
        raise
    server = HttpServer(runner, app[FRONT_KEY], unix_path)
    log.info("HTTP front listening on %s", ", ".join(server.urls))
    return server
