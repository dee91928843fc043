"""Message shapes: requests (strictly validated), replies, errors and streamed events.

Longer than most modules: every method's parameters and every event's data are
checked here, in one place, so the whole wire contract reads as one set of rules.
"""

import difflib
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

from . import params as generation
from .framing import ProtocolError, msgpack_type_name
from .quote import quote

PROTOCOL_VERSION = 1
REQUEST_ID_MAX = 2**53

ERROR_CODES = ("not_found", "invalid_argument", "busy", "resource_exhausted", "protocol_error", "internal")
EVENT_NAMES = ("tokens", "truncated", "done")
STOP_REASONS = ("max_tokens", "eos", "stop_sequence", "cancelled", "error")
MESSAGE_ROLES = ("system", "user", "assistant", "tool")
TIMING_KEYS = ("ttft_s", "prefill_tokens_per_s", "decode_tokens_per_s", "total_s")


@dataclass(frozen=True)
class Request:
    """A request that passed validation. `params` holds only what the client sent: defaults are the server's."""

    id: int
    method: str
    params: dict


class RequestError(Exception):
    """A request the server answers with an error reply; `id` is None when it could not be read."""

    def __init__(self, code: str, message: str, id: Optional[int] = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.id = id


# ---- field checks: each returns None when the value is fine, else why not ----------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _integer(lo: Optional[int] = None, hi: Optional[int] = None, what: str = "") -> Callable[[Any], Optional[str]]:
    def check(value):
        if not _is_int(value):
            return f"must be an integer, got {msgpack_type_name(value)}"
        if lo is not None and value < lo:
            return f"must be >= {lo}{what}"
        if hi is not None and value > hi:
            return f"must be <= {hi}{what}"
        return None

    return check


def _string(non_empty: bool = False) -> Callable[[Any], Optional[str]]:
    def check(value):
        if not isinstance(value, str):
            return f"must be a string, got {msgpack_type_name(value)}"
        if non_empty and not value:
            return "must not be empty"
        return None

    return check


def _boolean(value) -> Optional[str]:
    return None if isinstance(value, bool) else f"must be a boolean, got {msgpack_type_name(value)}"


def _token_ids(non_empty: bool) -> Callable[[Any], Optional[str]]:
    def check(value):
        if not isinstance(value, list):
            return f"must be an array of token ids, got {msgpack_type_name(value)}"
        if non_empty and not value:
            return "must not be empty"
        for i, t in enumerate(value):
            if not _is_int(t) or t < 0:
                return f"[{i}]={quote(t)}: must be a non-negative integer token id"
        return None

    return check


def _messages(value) -> Optional[str]:
    if not isinstance(value, list):
        return f"must be an array of {{role, content}} maps, got {msgpack_type_name(value)}"
    if not value:
        return "must not be empty"
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            return f"[{i}] must be a map with role and content, got {msgpack_type_name(m)}"
        extra = [k for k in m if k not in ("role", "content")]
        if extra:
            return f"[{i}] has unknown key {quote(extra[0])}; a message has only role and content"
        if "role" not in m or "content" not in m:
            return f"[{i}] needs both role and content"
        if m["role"] not in MESSAGE_ROLES:
            return f"[{i}].role={quote(m['role'])}: must be one of {', '.join(MESSAGE_ROLES)}"
        if not isinstance(m["content"], str):
            return f"[{i}].content must be a string, got {msgpack_type_name(m['content'])}"
    return None


def _schema(value) -> Optional[str]:
    return None if isinstance(value, dict) else f"must be a map (a JSON Schema), got {msgpack_type_name(value)}"


# A generate's `constraint`: its type and the keys each type takes (key: check, required).
CONSTRAINT_KEYS: dict[str, dict[str, tuple[Callable[[Any], Optional[str]], bool]]] = {
    "json_object": {},
    "json_schema": {"schema": (_schema, True), "strict": (_boolean, False)},
    "regex": {"pattern": (_string(non_empty=True), True)},
    "grammar": {"grammar": (_string(non_empty=True), True)},
}


def _constraint(value) -> Optional[str]:
    """The shape of a constraint; whether its schema, pattern or grammar compiles is the engine's to say."""
    if not isinstance(value, dict):
        return f"must be a map with a type, got {msgpack_type_name(value)}"
    kind = value.get("type")
    if kind not in CONSTRAINT_KEYS:
        return f".type={quote(kind)}: must be one of {', '.join(CONSTRAINT_KEYS)}"
    keys = CONSTRAINT_KEYS[kind]
    for key in value:
        if key != "type" and key not in keys:
            expected = ", ".join(["type", *keys])
            return f"has unknown key {quote(key)} for type {kind} (expected: {expected})"
    for key, (check, required) in keys.items():
        if key not in value:
            if required:
                return f"a {kind} constraint needs {key!r}"
            continue
        problem = check(value[key])
        if problem:
            return f".{key}: {problem}"
    return None


def _generation(name: str) -> Callable[[Any], Optional[str]]:
    """A generate parameter, checked by the rule set every front and the engine share."""
    return lambda value: generation.problem(name, value, msgpack_type_name)


_SESSION_ID = _string(non_empty=True)
_REQUEST_ID = _integer(1, REQUEST_ID_MAX)


@dataclass(frozen=True)
class _Field:
    check: Callable[[Any], Optional[str]]
    required: bool = False


def _required(check) -> _Field:
    return _Field(check, required=True)


def _optional(check) -> _Field:
    return _Field(check)


# Each method's parameters; `_CROSS_CHECKS` adds the rules that involve several of them.
METHOD_PARAMS: dict[str, dict[str, _Field]] = {
    "hello": {"protocol": _required(_integer(1)), "client": _optional(_string())},
    "create_session": {
        "speculative": _optional(_generation("speculative")),
        "num_draft_tokens": _optional(_generation("num_draft_tokens")),
    },
    "append": {
        "session_id": _required(_SESSION_ID),
        "tokens": _optional(_token_ids(non_empty=True)),
        "text": _optional(_string(non_empty=True)),
        "messages": _optional(_messages),
        "add_generation_prompt": _optional(_boolean),
    },
    "generate": {
        "session_id": _required(_SESSION_ID),
        **{
            name: _optional(_generation(name))
            for name in ("max_tokens", *generation.SAMPLING_NAMES, "stop", "speculative", "num_draft_tokens")
        },
        "constraint": _optional(_constraint),
        "logprobs": _optional(_boolean),
        "top_logprobs": _optional(_generation("top_logprobs")),
    },
    "cancel": {"request_id": _optional(_REQUEST_ID), "session_id": _optional(_SESSION_ID)},
    "session_info": {"session_id": _required(_SESSION_ID)},
    "close_session": {"session_id": _required(_SESSION_ID)},
    "list_sessions": {},
    "tokenize": {"text": _required(_string())},
    "detokenize": {"tokens": _required(_token_ids(non_empty=False))},
    "stats": {},
    "shutdown": {},
}
METHODS = tuple(METHOD_PARAMS)


def _exactly_one(*names: str) -> Callable[[dict], Optional[str]]:
    def check(params):
        given = [n for n in names if n in params]
        if len(given) == 1:
            return None
        listed = ", ".join(names[:-1]) + " or " + names[-1]
        return f"give exactly one of {listed} (got {', '.join(given) or 'none'})"

    return check


def _generation_prompt_needs_messages(params: dict) -> Optional[str]:
    if "add_generation_prompt" in params and "messages" not in params:
        return "add_generation_prompt applies only to messages"
    return None


def _top_logprobs_need_logprobs(params: dict) -> Optional[str]:
    if params.get("top_logprobs") and params.get("logprobs") is not True:
        return "top_logprobs needs logprobs=true"
    return None


_CROSS_CHECKS: dict[str, list[Callable[[dict], Optional[str]]]] = {
    "append": [_exactly_one("tokens", "text", "messages"), _generation_prompt_needs_messages],
    "generate": [_top_logprobs_need_logprobs],
    "cancel": [_exactly_one("request_id", "session_id")],
}

_REQUEST_KEYS = ("id", "method", "params")


def parse_request(msg: dict, hello_done: bool = True) -> Request:
    """Validate a decoded request; raise RequestError naming the first problem.

    Shape problems (no usable id, no method, params not a map, unknown top-level
    keys) are protocol_error; so is any method but hello while `hello_done` is
    false, whatever its params. Anything wrong inside params, or an unknown
    method, is invalid_argument. Client values are quoted only up to a bounded
    length.
    """
    if not isinstance(msg, dict):
        raise RequestError("protocol_error", f"a request must be a map, got {msgpack_type_name(msg)}")
    if "id" not in msg:
        raise RequestError("protocol_error", "the request has no 'id'; every request needs an integer id")
    rid = msg["id"]
    problem = _REQUEST_ID(rid)
    if problem:
        raise RequestError("protocol_error", f"request id {quote(rid)}: {problem} (ids are in [1, 2**53])")
    for key in msg:
        if key not in _REQUEST_KEYS:
            raise RequestError(
                "protocol_error", f"unknown key {quote(key)} in the request; a request has id, method and params", rid
            )
    method = msg.get("method")
    if not isinstance(method, str):
        why = "is missing" if "method" not in msg else f"must be a string, got {msgpack_type_name(method)}"
        raise RequestError("protocol_error", f"the request's 'method' {why}", rid)
    if not hello_done and method != "hello":
        raise RequestError(
            "protocol_error", f"the first request on a connection must be 'hello', not {quote(method)}", rid
        )
    params = msg.get("params", {})
    if not isinstance(params, dict):
        raise RequestError(
            "protocol_error", f"{quote(method)}: 'params' must be a map, got {msgpack_type_name(params)}", rid
        )
    fields = METHOD_PARAMS.get(method)
    if fields is None:
        raise RequestError(
            "invalid_argument",
            f"unknown method {quote(method)}{_did_you_mean(method, METHODS)} (methods: {', '.join(METHODS)})",
            rid,
        )

    def invalid(message: str) -> RequestError:
        return RequestError("invalid_argument", f"{method}: {message}", rid)

    for key in params:
        if key not in fields:
            expected = ", ".join(fields) if fields else "none"
            raise invalid(f"unknown parameter {quote(key)}{_did_you_mean(key, fields)} (expected: {expected})")
    for name, field in fields.items():
        if name not in params:
            if field.required:
                raise invalid(f"missing required parameter {name!r}")
            continue
        problem = field.check(params[name])
        if problem:
            raise invalid(_name_problem(name, params[name], problem))
    for check in _CROSS_CHECKS.get(method, ()):
        problem = check(params)
        if problem:
            raise invalid(problem)
    return Request(rid, method, params)


def _name_problem(name: str, value: Any, problem: str) -> str:
    """'max_tokens=0: must be >= 1', 'tokens[3]=-1: ...', 'constraint.type=...: ...', or 'stop: ...' for a container."""
    if problem.startswith(("[", ".")):
        return name + problem
    if isinstance(value, (list, dict)):
        return f"{name}: {problem}"
    return f"{name}={quote(value)}: {problem}"


def _did_you_mean(word: str, choices) -> str:
    if len(word) > 2 * max(map(len, choices), default=0):
        return ""  # difflib's cost grows with the word: a long one is no misspelling anyway
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ---- what the server sends --------------------------------------------------------------


def make_result(id: int, result: dict) -> dict:
    return {"id": id, "result": result}


def make_error(id: Optional[int], code: str, message: str) -> dict:
    if code not in ERROR_CODES:
        raise ValueError(f"unknown error code {code!r}; codes are {', '.join(ERROR_CODES)}")
    return {"id": id, "error": {"code": code, "message": message}}


def make_event(id: int, event: str, data: dict) -> dict:
    if event not in EVENT_NAMES:
        raise ValueError(f"unknown event {event!r}; events are {', '.join(EVENT_NAMES)}")
    return {"id": id, "event": event, "data": data}


@dataclass(frozen=True)
class Reply:
    """A successful reply."""

    id: int
    result: dict


@dataclass(frozen=True)
class ErrorReply:
    """An error reply; `id` is None for an error about the connection itself."""

    id: Optional[int]
    code: str
    message: str


@dataclass(frozen=True)
class EventMessage:
    """One streamed event of a generate request."""

    id: int
    event: str
    data: dict


ServerMessage = Union[Reply, ErrorReply, EventMessage]


def _check_event_data(event: str, data: dict) -> Optional[str]:
    """Why a known event's data is malformed, or None. Extra keys are allowed (newer servers)."""
    if event == "tokens":
        if _token_ids(non_empty=False)(data.get("tokens")) or not isinstance(data.get("text"), str):
            return "a tokens event needs tokens (array of token ids) and text (str)"
        return _logprobs_problem(data)
    elif event == "truncated":
        if not (_is_int(data.get("evicted")) and _is_int(data.get("total_evicted"))):
            return "a truncated event needs integer evicted and total_evicted"
    elif event == "done":
        if not isinstance(data.get("stop_reason"), str):
            return "a done event needs a string stop_reason"
        for key in ("prompt_tokens", "generated_tokens", "cached_tokens"):
            if not _is_int(data.get(key)):
                return f"a done event needs an integer {key}"
        if not isinstance(data.get("timings"), dict):
            return "a done event needs a timings map"
        error = data.get("error")
        if error is not None and _error_problem(error):
            return f"a done event's error {_error_problem(error)}"
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, float) or _is_int(value)


def _is_alternatives(value: Any) -> bool:
    """[[token id, logprob], ...]"""
    return isinstance(value, list) and all(
        isinstance(pair, list) and len(pair) == 2 and _is_int(pair[0]) and pair[0] >= 0 and _is_number(pair[1])
        for pair in value
    )


def _logprobs_problem(data: dict) -> Optional[str]:
    """A tokens event's optional log probabilities: one entry (or nil) per token."""
    n = len(data["tokens"])
    logprobs, top = data.get("logprobs"), data.get("top_logprobs")
    if logprobs is not None and not (
        isinstance(logprobs, list) and len(logprobs) == n and all(v is None or _is_number(v) for v in logprobs)
    ):
        return "a tokens event's logprobs must be an array of numbers (or nil), one per token"
    if top is not None and not (
        isinstance(top, list) and len(top) == n and all(v is None or _is_alternatives(v) for v in top)
    ):
        return "a tokens event's top_logprobs must be an array, one per token, of [token id, logprob] pairs (or nil)"
    return None


def _error_problem(error: Any) -> Optional[str]:
    if not (isinstance(error, dict) and isinstance(error.get("code"), str) and isinstance(error.get("message"), str)):
        return "must be a map with string code and message"
    return None


def parse_server_message(msg: dict) -> ServerMessage:
    """Classify a decoded server message; ProtocolError if it has none of the known shapes.

    Unknown error codes, unknown event names and extra keys pass through, so a
    client keeps working against a newer server.
    """
    if not isinstance(msg, dict):
        raise ProtocolError(f"a server message must be a map, got {msgpack_type_name(msg)}")
    kinds = [k for k in ("result", "error", "event") if k in msg]
    if len(kinds) != 1:
        raise ProtocolError(f"a server message needs exactly one of result, error or event (got {kinds or 'none'})")
    if "id" not in msg:
        raise ProtocolError("the server message has no 'id'")
    rid = msg["id"]
    kind = kinds[0]
    if kind == "error":
        if rid is not None and _REQUEST_ID(rid):
            raise ProtocolError(f"error reply id {quote(rid)} is neither a request id nor nil")
        problem = _error_problem(msg["error"])
        if problem:
            raise ProtocolError(f"error {problem}")
        return ErrorReply(rid, msg["error"]["code"], msg["error"]["message"])
    if _REQUEST_ID(rid):
        raise ProtocolError(f"{kind} id {quote(rid)} is not a request id")
    if kind == "result":
        if not isinstance(msg["result"], dict):
            raise ProtocolError(f"result must be a map, got {msgpack_type_name(msg['result'])}")
        return Reply(rid, msg["result"])
    event, data = msg["event"], msg.get("data")
    if not isinstance(event, str):
        raise ProtocolError(f"event must be a string, got {msgpack_type_name(event)}")
    if not isinstance(data, dict):
        raise ProtocolError(f"{event} event data must be a map, got {msgpack_type_name(data)}")
    problem = _check_event_data(event, data)
    if problem:
        raise ProtocolError(problem)
    return EventMessage(rid, event, data)
