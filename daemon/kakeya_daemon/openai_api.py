"""The OpenAI API's request bodies mapped onto the daemon's terms (replies: openai_replies.py).

Pure functions and data: no I/O, no engine. A body's generation fields are checked
with the protocol's shared rules (kakeya_protocol.params) and come out as the
wire-style params a socket `generate` would carry, so both fronts mean the same
by every value, defaults included (kakeya_protocol.params applies them).
`tools`, `tool_choice` and `response_format` are checked by the engine's own
modules (kakeya_mlx.toolcalls, kakeya_mlx.constrain), whose errors name the field.
"""

import json
import re
from dataclasses import dataclass
from typing import Any, Optional

from kakeya_mlx.constrain import spec_from_response_format
from kakeya_mlx.errors import InvalidArgumentError
from kakeya_mlx.toolcalls import Tool, ToolChoice, check_tool_choice, check_tools
from kakeya_protocol import params as rules
from kakeya_protocol.quote import quote

# Engine and protocol error codes -> HTTP status and OpenAI error type.
ERROR_STATUS = {
    "invalid_argument": (400, "invalid_request_error"),
    "protocol_error": (400, "invalid_request_error"),
    "not_found": (404, "invalid_request_error"),
    "resource_exhausted": (429, "rate_limit_error"),
    "busy": (429, "rate_limit_error"),
    "internal": (500, "server_error"),
}
_CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
# The field an engine error names: "tools[0].function.parameters: cannot be compiled: ..." names
# "tools[0].function.parameters".
_FIELD = re.compile(r"^([A-Za-z_]\w*(?:\[\d+\]|\.[A-Za-z_]\w*)*)[:=]")
_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "integer", float: "number", bool: "boolean"}


class ApiError(Exception):
    """A request the front refuses, with its HTTP status and the OpenAI error fields."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    @classmethod
    def from_code(cls, code: str, message: str, param=None) -> "ApiError":
        status, kind = ERROR_STATUS.get(code, (500, "server_error"))
        return cls(status, message, kind, param, code)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(exc: InvalidArgumentError, param: Optional[str] = None) -> ApiError:
    """A 400 for an engine error about the request, its param the field the message names (else `param`)."""
    named = _FIELD.match(exc.message)
    return ApiError(400, exc.message, param=named.group(1) if named else param, code="invalid_value")


def json_type_name(value: Any) -> str:
    return "null" if value is None else _JSON_TYPES.get(type(value), type(value).__name__)


def dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def parse_body(raw: bytes) -> dict:
    """The JSON object of a request body; ApiError 400 for anything else, however it is broken."""
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
        # A lone surrogate ("\ud800") parses into a str that is not text: refuse it here, not deep in the tokenizer.
        dumps(body).encode("utf-8")
    except RecursionError:
        raise ApiError(400, "request body is nested too deeply", code="invalid_json") from None
    except UnicodeEncodeError:
        raise ApiError(
            400, "request body holds a lone UTF-16 surrogate (e.g. \\ud800), which is not text", code="invalid_json"
        ) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"request body is not valid JSON: {str(exc)[:200]}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object", code="invalid_json")
    return body


def _bad(param: str, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, f"{param}: {message}", param=param, code=code)


def _unsupported(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}", param=param, code="unsupported_parameter")


def get(body: dict, name: str, check, what: str, default=None):
    """body[name] if present and not null, checked with `check`; else default."""
    value = body.get(name)
    if value is None:
        return default
    if not check(value):
        raise ApiError(400, f"{name}={quote(value)}: expected {what}", param=name, code="invalid_type")
    return value


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _checked(param: str, rule: str, value) -> Any:
    problem = rules.problem(rule, value, json_type_name)
    if problem is not None:
        code = "invalid_type" if problem.startswith("must be a") and "got" in problem else "invalid_value"
        raise ApiError(400, f"{param}={quote(value)}: {problem}", param=param, code=code)
    return value


def generation_params(body: dict, chat: bool, max_new_tokens: int) -> dict:
    """The body's generation fields as wire-style generate params (absent fields left out: defaults apply).

    Log probabilities: chat's `logprobs` (bool) and `top_logprobs`; completions' `logprobs`
    (how many alternatives, 0 for the chosen token's alone).
    """
    params: dict = {}
    names = ("max_completion_tokens", "max_tokens") if chat else ("max_tokens",)
    for name in reversed(names):  # max_completion_tokens wins where both are given
        if body.get(name) is not None:
            params["max_tokens"] = _checked(name, "max_tokens", body[name])
            if params["max_tokens"] > max_new_tokens:
                raise _bad(name, f"{params['max_tokens']} exceeds this server's limit max_new_tokens={max_new_tokens}")
    for name in rules.SAMPLING_NAMES:
        if body.get(name) is not None:
            params[name] = _checked(name, name, body[name])
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None:
        params["stop"] = _checked("stop", "stop", stop)
    if chat:
        if get(body, "logprobs", lambda v: isinstance(v, bool), "a boolean", False):
            params["logprobs"] = True
        if body.get("top_logprobs") is not None:
            params["top_logprobs"] = _checked("top_logprobs", "top_logprobs", body["top_logprobs"])
            if params["top_logprobs"] and not params.get("logprobs"):
                raise _bad("top_logprobs", "needs logprobs: true")
    elif body.get("logprobs") is not None:
        params["logprobs"] = True
        params["top_logprobs"] = _checked("logprobs", "top_logprobs", body["logprobs"])
    return params


@dataclass(frozen=True)
class ChatExtras:
    """What a chat body asks beyond plain text: tools, the tool choice, a response format."""

    tools: list[Tool]
    tool_choice: ToolChoice
    parallel_tool_calls: bool
    response_format: Optional[dict]  # a constraint spec (kakeya_mlx.constrain), None for plain text
    response_format_field: str = "response_format"


def response_format(body: dict) -> tuple[Optional[dict], str]:
    """(constraint spec or None for plain text, the field errors name) for `response_format`."""
    if body.get("response_format") is None:
        return None, "response_format"
    try:
        return spec_from_response_format(body["response_format"])
    except InvalidArgumentError as exc:
        raise invalid(exc) from None


def chat_extras(body: dict) -> ChatExtras:
    """Check `tools`, `tool_choice`, `parallel_tool_calls` and `response_format`; ApiError 400 naming the field."""
    try:
        tools = check_tools(body["tools"]) if body.get("tools") is not None else []
        choice = check_tool_choice(body.get("tool_choice"), tools)
    except InvalidArgumentError as exc:
        raise invalid(exc) from None
    spec, field = response_format(body)
    parallel = get(body, "parallel_tool_calls", lambda v: isinstance(v, bool), "a boolean", True)
    if spec is not None and choice.mode in ("required", "function"):
        raise _bad("response_format", "cannot be combined with a tool_choice that forces a call")
    return ChatExtras(tools, choice, parallel, spec, field)


def stream_options(body: dict) -> tuple[bool, bool]:
    """(stream, include_usage)."""
    stream = get(body, "stream", lambda v: isinstance(v, bool), "a boolean", False)
    options = get(body, "stream_options", lambda v: isinstance(v, dict), "an object", {})
    include_usage = get(options, "include_usage", lambda v: isinstance(v, bool), "a boolean", False)
    if options and not stream:
        raise _bad("stream_options", "only allowed when stream is true")
    return stream, include_usage


def reject_unsupported(body: dict, chat: bool) -> None:
    """A clear 400 for every field that would change what comes back if ignored.

    Fields not named here and not used are ignored (user, metadata, store, ...).
    """
    n = get(body, "n", _is_int, "an integer", 1)
    if n != 1:
        raise _unsupported("n", f"{n}: only n=1 is supported (one choice per request)")
    if get(body, "logit_bias", lambda v: isinstance(v, dict), "an object", {}):
        raise _unsupported("logit_bias", "not supported")
    if not chat:
        if get(body, "echo", lambda v: isinstance(v, bool), "a boolean", False):
            raise _unsupported("echo", "echoing the prompt is not supported")
        if get(body, "best_of", _is_int, "an integer", 1) != 1:
            raise _unsupported("best_of", "only best_of=1 is supported")
        if get(body, "suffix", lambda v: isinstance(v, str), "a string", ""):
            raise _unsupported("suffix", "insertion (suffix) is not supported")
        return
    for name in ("functions", "function_call"):
        if body.get(name) is not None:
            raise _unsupported(name, "the legacy function-calling fields are not supported; use tools and tool_choice")
    modalities = body.get("modalities")
    if modalities is not None and modalities != ["text"]:
        raise _unsupported("modalities", 'only ["text"] is supported')
    for name in ("audio", "prediction", "web_search_options"):
        if body.get(name) is not None:
            raise _unsupported(name, "not supported")


def _content_text(content, where: str) -> str:
    """A message's content as text: a string, or a list of text parts joined by newlines."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad(f"{where}.content", "expected a string or a list of content parts", "invalid_type")
    texts = []
    for j, part in enumerate(content):
        param = f"{where}.content[{j}]"
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise _bad(param, "expected a content part with a string type", "invalid_type")
        if part["type"] != "text":
            raise _unsupported(
                param, f"content parts of type {quote(part['type'])} are not supported; this model reads text parts only"
            )
        if not isinstance(part.get("text"), str):
            raise _bad(f"{param}.text", "expected a string", "invalid_type")
        texts.append(part["text"])
    return "\n".join(texts)


def chat_messages(value) -> list[dict]:
    """The request's messages in the roles chat templates know, content as text.

    An assistant message keeps its `tool_calls` and a tool message its `tool_call_id`;
    kakeya_mlx.toolcalls checks them (ids, order) when it renders the prompt.
    """
    if not isinstance(value, list) or not value:
        raise _bad("messages", "expected a non-empty list of messages", "invalid_type")
    out = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _bad(where, "expected an object with role and content", "invalid_type")
        role = message.get("role")
        if role == "function":
            raise _unsupported(f"{where}.role", "'function' messages are the legacy form; use tool messages")
        if not isinstance(role, str) or role not in _CHAT_ROLES:
            raise _bad(f"{where}.role", f"{quote(role)} is not one of {', '.join(_CHAT_ROLES)}")
        for key in ("function_call", "audio"):
            if message.get(key) is not None:
                raise _unsupported(f"{where}.{key}", "the legacy function_call and audio are not supported")
        if message.get("name") is not None and not isinstance(message["name"], str):
            raise _bad(f"{where}.name", "expected a string", "invalid_type")
        content = message.get("content")
        if content is None and role == "assistant":
            content = ""
        shaped = {"role": _CHAT_ROLES[role], "content": _content_text(content, where)}
        if role == "assistant" and message.get("tool_calls"):
            shaped["tool_calls"] = message["tool_calls"]
        if role == "tool":
            shaped["tool_call_id"] = message.get("tool_call_id")
        out.append(shaped)
    return out


def completion_prompt(value) -> tuple[Optional[str], Optional[list[int]]]:
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
    raise _bad("prompt", "expected a non-empty string or a non-empty list of token ids", "invalid_type")
