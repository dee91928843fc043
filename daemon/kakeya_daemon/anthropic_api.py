"""The Anthropic Messages API mapped onto the engine: request checking, replies, stream events.

Pure functions and dataclasses; the HTTP front calls them. A `POST /v1/messages` body
becomes a `MessagesRequest`: chat messages in the OpenAI-like shape that
`kakeya_mlx.toolcalls.render_prompt` renders (tool_use blocks become assistant
`tool_calls`, tool_result blocks become `tool` messages), the tools, the tool choice,
and the generation parameters as wire-style generate params (the shared rules in
kakeya_protocol.params give the defaults, as for every front). Replies are built from what the decode loop
produced (text, parsed tool calls, the engine's stop reason, token counts), and
`MessageStream` turns a generation's pieces into Anthropic's exact SSE event sequence.
Errors use Anthropic's shape: {"type": "error", "error": {"type": ..., "message": ...}}.
Longer than most modules: it is a whole API's mapping (requests, replies, stream
events), kept apart from the HTTP handlers so it can be tested without a server.
"""

import json
import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from kakeya_mlx.constrain import check_json_schema
from kakeya_protocol import params as rules
from kakeya_mlx.errors import EngineError
from kakeya_mlx.toolcalls import (
    TOOL_NAME,
    Tool,
    ToolCall,
    ToolCallDelta,
    ToolCallFormat,
    ToolChoice,
    tool_choice_constraint,
)

# Engine error codes -> HTTP status and Anthropic error type.
ERROR_STATUS = {
    "invalid_argument": (400, "invalid_request_error"),
    "protocol_error": (400, "invalid_request_error"),
    "not_found": (404, "not_found_error"),
    "resource_exhausted": (429, "rate_limit_error"),
    "busy": (429, "rate_limit_error"),
    "internal": (500, "api_error"),
}
STOP_REASONS = {"eos": "end_turn", "max_tokens": "max_tokens", "stop_sequence": "stop_sequence"}
# Anthropic's range for temperature is narrower than the shared rules' [0, 2].
MAX_TEMPERATURE = 1.0
# top_p 0 keeps only the most likely token, as top_p -> 0 does; the shared rules need it > 0.
SMALLEST_TOP_P = 1e-9
# The OpenAI error types the front raises before it knows the API, in Anthropic's terms.
_FROM_OPENAI_TYPES = {
    "invalid_request_error": "invalid_request_error",
    "authentication_error": "authentication_error",
    "permission_error": "permission_error",
    "rate_limit_error": "rate_limit_error",
}


class AnthropicError(Exception):
    """A request the API refuses; `body()` is what the client receives with `status`."""

    def __init__(self, message: str, status: int = 400, error_type: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.status, self.error_type = message, status, error_type

    @classmethod
    def from_engine(cls, exc: EngineError) -> "AnthropicError":
        status, error_type = ERROR_STATUS.get(exc.code, (500, "api_error"))
        return cls(exc.message, status, error_type)

    @classmethod
    def from_openai(cls, status: int, message: str, error_type: str) -> "AnthropicError":
        """An error the HTTP front raised in OpenAI terms (auth, body, limits), in Anthropic's."""
        if status == 404:
            return cls(message, status, "not_found_error")
        if status == 413:
            return cls(message, status, "request_too_large")
        return cls(message, status, _FROM_OPENAI_TYPES.get(error_type, "api_error"))

    def body(self) -> dict:
        return {"type": "error", "error": {"type": self.error_type, "message": self.message}}


def _bad(field_name: str, why: str) -> AnthropicError:
    return AnthropicError(f"{field_name}: {why}")


@dataclass(frozen=True)
class MessagesRequest:
    """A checked Messages API request in the engine's terms."""

    model: str
    messages: list[dict]  # OpenAI-like chat messages, for kakeya_mlx.toolcalls.render_prompt
    tools: list[Tool]
    tool_choice: ToolChoice
    parallel_tool_calls: bool
    max_tokens: int | None  # None only for count_tokens
    # Wire-style generate params: max_tokens, temperature, top_p, top_k, stop (those given); the
    # daemon core fills the rest with the defaults in force, as for every front.
    params: dict
    stop_sequences: list[str]
    stream: bool
    prefill: str | None = None  # a final assistant message: the reply continues this text

    def constraint(self, fmt: ToolCallFormat, vocab: Mapping[str, int] | None = None) -> dict | None:
        """The constraint spec forcing a call for tool_choice "any" or "tool"; None otherwise."""
        return tool_choice_constraint(fmt, self.tools, self.tool_choice, parallel=self.parallel_tool_calls, vocab=vocab)


def parse_messages_request(body: object) -> MessagesRequest:
    """Check a `POST /v1/messages` body; raises AnthropicError naming the first bad field."""
    return _parse(body, count_only=False)


def parse_count_tokens_request(body: object) -> MessagesRequest:
    """Check a `POST /v1/messages/count_tokens` body (as messages, without max_tokens or sampling)."""
    return _parse(body, count_only=True)


def count_tokens_response(input_tokens: int) -> dict:
    return {"input_tokens": input_tokens}


def _parse(body: object, count_only: bool) -> MessagesRequest:
    if not isinstance(body, dict):
        raise AnthropicError("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model", "is required (a model name)")
    max_tokens = None
    if not count_only:
        max_tokens = body.get("max_tokens")
        if not _is_int(max_tokens) or max_tokens < 1:
            raise _bad("max_tokens", "is required: an integer >= 1")
    tools = _tools(body.get("tools", []))
    tool_choice, parallel = _tool_choice(body.get("tool_choice"), tools)
    messages = _system(body.get("system")) + _messages(body.get("messages"))
    prefill = None
    if messages[-1]["role"] == "assistant":
        if messages[-1].get("tool_calls"):
            raise _bad(
                f"messages[{len(body['messages']) - 1}]", "a final assistant message cannot hold tool_use blocks"
            )
        prefill = messages.pop()["content"]
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("stream", "must be true or false")
    stop_sequences = [] if count_only else _stop_sequences(body.get("stop_sequences"))
    params = {} if count_only else _params(body, max_tokens, stop_sequences)
    return MessagesRequest(
        model=model,
        messages=messages,
        tools=tools,
        tool_choice=tool_choice,
        parallel_tool_calls=parallel,
        max_tokens=max_tokens,
        params=params,
        stop_sequences=stop_sequences,
        stream=stream,
        prefill=prefill,
    )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(body: dict, name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not low <= value <= high
    ):
        raise _bad(name, f"must be a number in [{low:g}, {high:g}]")
    return float(value)


def _params(body: dict, max_tokens: int, stop_sequences: list[str]) -> dict:
    """The generation fields given, as wire-style generate params; those left out take the defaults in force."""
    params: dict = {"max_tokens": max_tokens}
    temperature = _number(body, "temperature", 0.0, MAX_TEMPERATURE)
    if temperature is not None:
        params["temperature"] = temperature
    top_p = _number(body, "top_p", 0.0, 1.0)
    if top_p is not None:
        params["top_p"] = max(top_p, SMALLEST_TOP_P)
    top_k = body.get("top_k")
    if top_k is not None:
        if not _is_int(top_k) or not 0 <= top_k <= rules.MAX_TOP_K:
            raise _bad("top_k", f"must be an integer in [0, {rules.MAX_TOP_K}]")
        params["top_k"] = top_k
    if stop_sequences:
        params["stop"] = stop_sequences
    return params


def _stop_sequences(value: object) -> list[str]:
    if value is None:
        return []
    problem = rules.stop_problem(value)
    if problem is not None:
        raise _bad("stop_sequences", problem)
    return list(value)


def _system(value: object) -> list[dict]:
    if value is None:
        return []
    if isinstance(value, str):
        return [{"role": "system", "content": value}] if value else []
    if isinstance(value, list):
        return [{"role": "system", "content": _texts(value, "system")}]
    raise _bad("system", "must be a string or a list of text blocks")


def _texts(blocks: list, where: str) -> str:
    parts = []
    for i, block in enumerate(blocks):
        if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
            raise _bad(f"{where}[{i}]", 'must be a text block ({"type": "text", "text": ...})')
        parts.append(block["text"])
    return "\n\n".join(parts)


def _messages(value: object) -> list[dict]:
    """Anthropic messages as OpenAI-like chat messages, checking tool_use / tool_result pairing."""
    if not isinstance(value, list) or not value:
        raise _bad("messages", "must be a non-empty list of messages")
    out: list[dict] = []
    open_ids: set[str] = set()  # tool_use ids of the last assistant message
    for i, message in enumerate(value):
        at = f"messages[{i}]"
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            raise _bad(f"{at}.role", 'must be "user" or "assistant"')
        content = message.get("content")
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if not isinstance(content, list):
            raise _bad(f"{at}.content", "must be a string or a list of content blocks")
        if message["role"] == "assistant":
            out.append(_assistant(content, at))
            open_ids = {c["id"] for c in out[-1].get("tool_calls", [])}
        else:
            out.extend(_user(content, at, open_ids))
            open_ids = set()
    return out


def _assistant(blocks: list, at: str) -> dict:
    text, calls = [], []
    for j, block in enumerate(blocks):
        where = f"{at}.content[{j}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and isinstance(block.get("text"), str):
            text.append(block["text"])
        elif kind == "tool_use":
            if not isinstance(block.get("id"), str) or not block["id"]:
                raise _bad(f"{where}.id", "must be a non-empty string")
            if not isinstance(block.get("name"), str) or not block["name"]:
                raise _bad(f"{where}.name", "must be a non-empty string")
            if not isinstance(block.get("input"), dict):
                raise _bad(f"{where}.input", "must be an object")
            arguments = json.dumps(block["input"], ensure_ascii=False)
            calls.append(
                {"id": block["id"], "type": "function", "function": {"name": block["name"], "arguments": arguments}}
            )
        elif kind in ("thinking", "redacted_thinking"):
            continue  # reasoning from another model; this one does not read it back
        else:
            raise _bad(where, f"unsupported block type {kind!r} in an assistant message (text and tool_use are)")
    message: dict = {"role": "assistant", "content": "".join(text) if text or not calls else None}
    if calls:
        message["tool_calls"] = calls
    return message


def _user(blocks: list, at: str, open_ids: set[str]) -> list[dict]:
    results, text = [], []
    for j, block in enumerate(blocks):
        where = f"{at}.content[{j}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and isinstance(block.get("text"), str):
            text.append(block["text"])
        elif kind == "tool_result":
            if text:
                raise _bad(where, "tool_result blocks must come before any text in a user message")
            use_id = block.get("tool_use_id")
            if use_id not in open_ids:
                raise _bad(
                    f"{where}.tool_use_id", "must be the id of a tool_use block in the assistant message just before"
                )
            content = block.get("content", "")
            if isinstance(content, list):
                content = _texts(content, f"{where}.content")
            elif not isinstance(content, str):
                raise _bad(f"{where}.content", "must be a string or a list of text blocks")
            if block.get("is_error") is True:
                content = f"Error: {content}"
            results.append({"role": "tool", "tool_call_id": use_id, "content": content})
        else:
            raise _bad(where, f"unsupported block type {kind!r} in a user message (text and tool_result are)")
    return results + ([{"role": "user", "content": "".join(text)}] if text or not results else [])


def _tools(value: object) -> list[Tool]:
    if not isinstance(value, list):
        raise _bad("tools", "must be a list of tools")
    tools: list[Tool] = []
    for i, tool in enumerate(value):
        at = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type", "custom") != "custom":
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise _bad(at, f"only client tools (with an input_schema) are supported, not {kind!r}")
        name = tool.get("name")
        if not isinstance(name, str) or not TOOL_NAME.match(name):
            raise _bad(f"{at}.name", "must be 1 to 64 letters, digits, _ or -")
        if any(t.name == name for t in tools):
            raise _bad(f"{at}.name", f"{name!r} is given twice")
        description = tool.get("description", "")
        if not isinstance(description, str):
            raise _bad(f"{at}.description", "must be a string")
        schema = tool.get("input_schema")
        try:
            check_json_schema(schema, f"{at}.input_schema")
        except EngineError as e:
            raise AnthropicError(e.message) from None
        tools.append(Tool(name, description, schema))
    return tools


def _tool_choice(value: object, tools: Sequence[Tool]) -> tuple[ToolChoice, bool]:
    """(the choice, whether several calls may come in one reply)."""
    if value is None:
        return ToolChoice("auto" if tools else "none"), True
    kind = value.get("type") if isinstance(value, dict) else None
    if kind not in ("auto", "any", "tool", "none"):
        raise _bad("tool_choice.type", "must be one of auto, any, tool, none")
    parallel = value.get("disable_parallel_tool_use", False)
    if not isinstance(parallel, bool):
        raise _bad("tool_choice.disable_parallel_tool_use", "must be true or false")
    if kind in ("any", "tool") and not tools:
        raise _bad("tool_choice.type", f"{kind!r} needs at least one tool in tools")
    if kind == "tool":
        name = value.get("name")
        if all(t.name != name for t in tools):
            raise _bad("tool_choice.name", f"{name!r} is not one of the tools given")
        return ToolChoice("function", name), not parallel
    return ToolChoice({"any": "required"}.get(kind, kind)), not parallel


# ---- replies -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Usage:
    """Token counts: `input_tokens` ran through the model now; `cache_read_input_tokens` were resident already;
    `evicted_tokens` (ours) are tokens of the conversation the model no longer sees (the window slid past them)."""

    input_tokens: int
    output_tokens: int = 0
    cache_read_input_tokens: int = 0
    evicted_tokens: int = 0

    def to_json(self) -> dict:
        return {
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": self.cache_read_input_tokens,
            "evicted_tokens": self.evicted_tokens,
        }


def new_message_id() -> str:
    return "msg_" + secrets.token_hex(12)


def stop_reason(engine_reason: str, tool_calls: bool) -> str:
    """Anthropic's stop_reason for the engine's ("eos", "max_tokens", "stop_sequence")."""
    if tool_calls and engine_reason == "eos":
        return "tool_use"
    return STOP_REASONS[engine_reason]


def message_response(
    message_id: str,
    model: str,
    text: str | None,
    tool_calls: Sequence[ToolCall],
    reason: str,
    stop_sequence: str | None,
    usage: Usage,
) -> dict:
    """The non-streamed reply: text and tool_use content blocks, stop reason and usage."""
    content: list[dict] = [{"type": "text", "text": text}] if text else []
    content += [{"type": "tool_use", "id": c.id, "name": c.name, "input": json.loads(c.arguments)} for c in tool_calls]
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": reason,
        "stop_sequence": stop_sequence if reason == "stop_sequence" else None,
        "usage": usage.to_json(),
    }


def sse(event: dict) -> bytes:
    """One server-sent event, named by its type as Anthropic's stream does."""
    return f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n".encode()


@dataclass
class MessageStream:
    """Anthropic's stream events for one reply: feed text pieces and tool-call deltas in order.

    message_start and a ping open it; each text run and each tool call is a content
    block (start, deltas, stop); message_delta (stop reason, output tokens) and
    message_stop close it. Every method returns the events' SSE bytes to send.
    """

    message_id: str
    model: str
    usage: Usage  # input side known at the start
    _index: int = -1
    _open: str | None = None  # "text" or "tool_use"
    _calls: dict[int, int] = field(default_factory=dict)  # tool-call index -> content block index

    def start(self) -> list[bytes]:
        message = message_response(self.message_id, self.model, None, [], "end_turn", None, self.usage)
        message["stop_reason"] = None
        return [sse({"type": "message_start", "message": message}), sse({"type": "ping"})]

    def text(self, piece: str) -> list[bytes]:
        if not piece:
            return []
        out = [] if self._open == "text" else self._begin({"type": "text", "text": ""}, "text")
        return out + [
            sse({"type": "content_block_delta", "index": self._index, "delta": {"type": "text_delta", "text": piece}})
        ]

    def tool_call(self, delta: ToolCallDelta) -> list[bytes]:
        out = []
        if delta.id is not None:
            out = self._begin({"type": "tool_use", "id": delta.id, "name": delta.name, "input": {}}, "tool_use")
            self._calls[delta.index] = self._index
        if delta.arguments:
            index = self._calls[delta.index]
            out.append(
                sse(
                    {
                        "type": "content_block_delta",
                        "index": index,
                        "delta": {"type": "input_json_delta", "partial_json": delta.arguments},
                    }
                )
            )
        return out

    def finish(self, reason: str, stop_sequence: str | None, usage: Usage) -> list[bytes]:
        """Close the message; `usage` is the final count (message_start could only estimate the input side)."""
        out = self._close()
        delta = {"stop_reason": reason, "stop_sequence": stop_sequence if reason == "stop_sequence" else None}
        return out + [
            sse({"type": "message_delta", "delta": delta, "usage": usage.to_json()}),
            sse({"type": "message_stop"}),
        ]

    def error(self, exc: AnthropicError) -> list[bytes]:
        """An error after the stream began: Anthropic sends it as an `error` event."""
        return [sse(exc.body())]

    def _begin(self, block: dict, kind: str) -> list[bytes]:
        out = self._close()
        self._index += 1
        self._open = kind
        return out + [sse({"type": "content_block_start", "index": self._index, "content_block": block})]

    def _close(self) -> list[bytes]:
        if self._open is None:
            return []
        self._open = None
        return [sse({"type": "content_block_stop", "index": self._index})]
