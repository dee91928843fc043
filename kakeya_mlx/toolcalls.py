"""Tool calls: tools rendered through the model's chat template, and calls read back from its replies.

Longer than most modules because its four parts share one thing, the model's call
format, and must agree on it exactly: how tools reach the prompt, how past calls render
back for the next turn, what grammar forces a call, and how a call is read from a reply.

Call formats, chosen from the chat template's text (`format_for_template`):
- "hermes" (Qwen, Hermes, and the default): `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`
- "llama3_json" (Llama 3.1+): the whole reply is `{"name": ..., "parameters": {...}}`,
  optionally after `<|python_tag|>`
- "mistral": `[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]`

Templates that ignore `tools` (rendering with and without tools gives the same text)
get the tools in a system-prompt block (`fallback_tools_block`) asking for Hermes-style
calls, and past calls and results are rendered as text in that style.

Special-token markers (`[TOOL_CALLS]`, `<|python_tag|>`) may be dropped by a text
stream that skips special tokens; the parser reads Mistral and Llama calls without
them too. A call that does not parse, or names no offered tool, stays content.
"""

import hashlib
import json
import re
import secrets
import string
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from .constrain import CANONICAL_JSON, check_json_schema
from .errors import InvalidArgumentError

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
MISTRAL_MARKER = "[TOOL_CALLS]"
PYTHON_TAG = "<|python_tag|>"
TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# A forced turn may hold this many calls when parallel calls are allowed.
MAX_FORCED_CALLS = 8
_PROBE_TOOL = {
    "type": "function",
    "function": {"name": "probe_tool", "description": "probe", "parameters": {"type": "object"}},
}
_PROBE_MESSAGES = [{"role": "user", "content": "probe"}]


@dataclass(frozen=True)
class ToolCallFormat:
    """How a model writes tool calls."""

    name: str  # "hermes", "llama3_json" or "mistral"
    arguments_key: str  # the call object's key for the arguments
    call_id_length: int | None = None  # Mistral templates insist on 9-character alphanumeric ids


HERMES = ToolCallFormat("hermes", "arguments")
LLAMA3_JSON = ToolCallFormat("llama3_json", "parameters")
MISTRAL = ToolCallFormat("mistral", "arguments", call_id_length=9)


def format_for_template(chat_template: str | None) -> ToolCallFormat:
    """The call format a chat template teaches its model; Hermes when it names none."""
    text = chat_template or ""
    if MISTRAL_MARKER in text:
        return MISTRAL
    if HERMES_OPEN in text:
        return HERMES
    if PYTHON_TAG in text or ("<|start_header_id|>" in text and '"parameters"' in text):
        return LLAMA3_JSON
    return HERMES


@dataclass(frozen=True)
class Tool:
    """A function the model may call (OpenAI's `tools[i].function`)."""

    name: str
    description: str
    parameters: dict

    def to_openai(self) -> dict:
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }


@dataclass(frozen=True)
class ToolChoice:
    """ "none", "auto", "required", or "function" (then `function` names it)."""

    mode: str
    function: str | None = None


def check_tools(tools: object, where: str = "tools") -> list[Tool]:
    """OpenAI `tools` checked: shape, names (unique, [A-Za-z0-9_-]{1,64}) and compilable parameter schemas."""
    if not isinstance(tools, list):
        raise InvalidArgumentError(f"{where}: must be a list of tools")
    out: list[Tool] = []
    for i, tool in enumerate(tools):
        at = f"{where}[{i}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise InvalidArgumentError(f'{at}: must be an object with type "function"')
        function = tool.get("function")
        if not isinstance(function, dict):
            raise InvalidArgumentError(f"{at}.function: must be an object with a name")
        name = function.get("name")
        if not isinstance(name, str) or not TOOL_NAME.match(name):
            raise InvalidArgumentError(f"{at}.function.name: must be 1 to 64 letters, digits, _ or -")
        if any(t.name == name for t in out):
            raise InvalidArgumentError(f"{at}.function.name: {name!r} is offered twice")
        description = function.get("description", "")
        if not isinstance(description, str):
            raise InvalidArgumentError(f"{at}.function.description: must be a string")
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        check_json_schema(parameters, f"{at}.function.parameters")
        out.append(Tool(name, description, parameters))
    return out


def check_tool_choice(choice: object, tools: Sequence[Tool], where: str = "tool_choice") -> ToolChoice:
    """OpenAI `tool_choice` checked against the offered tools; None means auto with tools, none without."""
    if choice is None:
        return ToolChoice("auto" if tools else "none")
    if choice in ("none", "auto", "required"):
        if choice == "required" and not tools:
            raise InvalidArgumentError(f'{where}: "required" needs at least one tool in tools')
        return ToolChoice(choice)
    name = (
        choice.get("function", {}).get("name")
        if isinstance(choice, dict) and isinstance(choice.get("function"), dict)
        else None
    )
    if not isinstance(name, str):
        raise InvalidArgumentError(
            f'{where}: must be "none", "auto", "required" or {{"type": "function", "function": {{"name": ...}}}}'
        )
    if all(t.name != name for t in tools):
        raise InvalidArgumentError(f"{where}.function.name: {name!r} is not one of the tools offered")
    return ToolChoice("function", name)


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text of an object

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ToolCallDelta:
    """A piece of a streamed call: the first piece of call `index` has its id and name."""

    index: int
    id: str | None
    name: str | None
    arguments: str

    def to_openai(self) -> dict:
        """The item for a chat.completion.chunk's `delta.tool_calls`."""
        item: dict = {"index": self.index, "function": {"arguments": self.arguments}}
        if self.id is not None:
            item.update(id=self.id, type="function")
            item["function"]["name"] = self.name
        return item


def new_call_id(fmt: ToolCallFormat) -> str:
    if fmt.call_id_length:
        alphabet = string.ascii_letters + string.digits
        return "".join(secrets.choice(alphabet) for _ in range(fmt.call_id_length))
    return "call_" + secrets.token_hex(12)


# ---- rendering -------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolSupport:
    """What a model's template does with tools: its call format, and whether it renders `tools` at all."""

    format: ToolCallFormat
    template_renders_tools: bool


def tool_support(tokenizer, chat_template: str | None) -> ToolSupport:
    """Render a probe with and without a tool: the same text means the template ignores tools."""
    if not chat_template:
        return ToolSupport(HERMES, False)
    try:
        with_tools = _apply(tokenizer, _PROBE_MESSAGES, [_PROBE_TOOL], True)
        without = _apply(tokenizer, _PROBE_MESSAGES, None, True)
    except Exception:
        return ToolSupport(HERMES, False)
    if with_tools == without:
        return ToolSupport(HERMES, False)
    return ToolSupport(format_for_template(chat_template), True)


def render_prompt(
    tokenizer, support: ToolSupport, messages: list[dict], tools: Sequence[Tool], add_generation_prompt: bool = True
) -> str:
    """The conversation (OpenAI shape, tool calls and tool results included) as the prompt text."""
    messages = prepare_messages(messages, support.format)
    try:
        if support.template_renders_tools:
            return _apply(tokenizer, messages, [t.to_openai() for t in tools] or None, add_generation_prompt)
        messages = _calls_as_text(messages)
        if not tools:
            return _apply(tokenizer, messages, None, add_generation_prompt)
        try:
            return _apply(tokenizer, _with_system_block(messages, tools), None, add_generation_prompt)
        except Exception:  # templates without a system role: the block leads the first user message
            return _apply(tokenizer, _with_user_block(messages, tools), None, add_generation_prompt)
    except InvalidArgumentError:
        raise
    except Exception as e:
        raise InvalidArgumentError(f"messages: the chat template cannot render them: {type(e).__name__}: {e}") from None


def fallback_tools_block(tools: Sequence[Tool]) -> str:
    """The system-prompt text that offers tools to a model whose template ignores them."""
    listed = "\n".join(json.dumps(t.to_openai(), ensure_ascii=False) for t in tools)
    return (
        "# Tools\n\nYou may call one or more functions to help with the request. "
        f"The functions are described in JSON Schema within <tools></tools>:\n<tools>\n{listed}\n</tools>\n\n"
        "To call a function, reply with one JSON object per call, holding the function's name and its "
        f"arguments, within {HERMES_OPEN}{HERMES_CLOSE} tags:\n"
        f'{HERMES_OPEN}\n{{"name": <function-name>, "arguments": <arguments-json-object>}}\n{HERMES_CLOSE}'
    )


def prepare_messages(messages: object, fmt: ToolCallFormat, where: str = "messages") -> list[dict]:
    """Check tool calls and tool results in `messages` and shape them for templates.

    Arguments become objects (templates apply `tojson` to them), ids fit the format
    (Mistral's 9 characters, mapped consistently), and each tool result must answer a
    call of the assistant message before it.
    """
    if not isinstance(messages, list):
        raise InvalidArgumentError(f"{where}: must be a list of messages")
    out: list[dict] = []
    open_ids: set[str] | None = None  # ids the latest assistant calls left unanswered
    for i, message in enumerate(messages):
        at = f"{where}[{i}]"
        if not isinstance(message, dict):
            raise InvalidArgumentError(f"{at}: must be an object with a role")
        message = dict(message)
        role = message.get("role")
        if role == "assistant" and message.get("tool_calls"):
            message["tool_calls"], open_ids = _prepared_calls(message["tool_calls"], fmt, f"{at}.tool_calls")
        elif role == "tool":
            call_id = message.get("tool_call_id")
            if open_ids is None:
                raise InvalidArgumentError(f"{at}: a tool message must follow an assistant message with tool_calls")
            if not isinstance(call_id, str) or _fit_id(call_id, fmt) not in open_ids:
                raise InvalidArgumentError(
                    f"{at}.tool_call_id: must be the id of a call in the assistant message before it"
                )
            message["tool_call_id"] = _fit_id(call_id, fmt)
            if not isinstance(message.get("content"), str):
                message["content"] = _text_of(message.get("content"), f"{at}.content")
        else:
            open_ids = None
        out.append(message)
    return out


def _prepared_calls(calls: object, fmt: ToolCallFormat, at: str) -> tuple[list[dict], set[str]]:
    if not isinstance(calls, list):
        raise InvalidArgumentError(f"{at}: must be a list of calls")
    out, ids = [], set()
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise InvalidArgumentError(f"{at}[{j}].function: must be an object with a name and arguments")
        arguments = function.get("arguments", "{}")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                raise InvalidArgumentError(f"{at}[{j}].function.arguments: is not valid JSON") from None
        if not isinstance(arguments, dict):
            raise InvalidArgumentError(f"{at}[{j}].function.arguments: must encode a JSON object")
        call_id = call.get("id")
        if not isinstance(call_id, str) or not call_id:
            raise InvalidArgumentError(f"{at}[{j}].id: must be a non-empty string")
        ids.add(_fit_id(call_id, fmt))
        out.append(
            {
                "id": _fit_id(call_id, fmt),
                "type": "function",
                "function": {"name": function["name"], "arguments": arguments},
            }
        )
    return out, ids


def _fit_id(call_id: str, fmt: ToolCallFormat) -> str:
    """The id as the format needs it: unchanged, or a stable alphanumeric digest of the right length."""
    if fmt.call_id_length is None or (len(call_id) == fmt.call_id_length and call_id.isalnum() and call_id.isascii()):
        return call_id
    return hashlib.sha256(call_id.encode()).hexdigest()[: fmt.call_id_length]


def _text_of(content: object, at: str) -> str:
    """Tool results given as OpenAI text parts are joined; anything else is refused."""
    if isinstance(content, list) and all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise InvalidArgumentError(f"{at}: must be a string or a list of text parts")


def _apply(tokenizer, messages: list[dict], tools: list[dict] | None, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _calls_as_text(messages: list[dict]) -> list[dict]:
    """Past calls as Hermes-style text in the reply, and tool results as one user message per run."""
    out: list[dict] = []
    for message in messages:
        if message.get("role") == "assistant" and message.get("tool_calls"):
            calls = [
                f"{HERMES_OPEN}\n{json.dumps(_call_object(c['function']), ensure_ascii=False)}\n{HERMES_CLOSE}"
                for c in message["tool_calls"]
            ]
            text = "\n".join(([message["content"]] if message.get("content") else []) + calls)
            out.append({"role": "assistant", "content": text})
        elif message.get("role") == "tool":
            piece = f"<tool_response>\n{message['content']}\n</tool_response>"
            if out and out[-1].get("tool_results"):
                out[-1] = {**out[-1], "content": out[-1]["content"] + "\n" + piece}
            else:
                out.append({"role": "user", "content": piece, "tool_results": True})
        else:
            out.append(message)
    return [{k: v for k, v in m.items() if k != "tool_results"} for m in out]


def _call_object(function: dict) -> dict:
    return {"name": function["name"], "arguments": function["arguments"]}


def _with_system_block(messages: list[dict], tools: Sequence[Tool]) -> list[dict]:
    block = fallback_tools_block(tools)
    if messages and messages[0].get("role") == "system" and isinstance(messages[0].get("content"), str):
        return [{**messages[0], "content": messages[0]["content"] + "\n\n" + block}, *messages[1:]]
    return [{"role": "system", "content": block}, *messages]


def _with_user_block(messages: list[dict], tools: Sequence[Tool]) -> list[dict]:
    first = next((i for i, m in enumerate(messages) if m.get("role") == "user"), None)
    if first is None:
        raise InvalidArgumentError("messages: tools need a user message to travel in (the template has no system role)")
    out = list(messages)
    out[first] = {**out[first], "content": fallback_tools_block(tools) + "\n\n" + str(out[first].get("content", ""))}
    return out


class ModelTools:
    """One model's tool calling: its call format, prompts with tools, forced calls and a reply parser."""

    def __init__(self, tokenizer, chat_template: str | None):
        self.tokenizer = tokenizer
        self.support = tool_support(tokenizer, chat_template)
        vocab = tokenizer.get_vocab()
        # Only the markers matter to tool_choice_constraint; the whole vocabulary is large.
        self._markers = {m: vocab[m] for m in (HERMES_OPEN, HERMES_CLOSE, MISTRAL_MARKER, PYTHON_TAG) if m in vocab}

    @property
    def format(self) -> ToolCallFormat:
        return self.support.format

    def render(self, messages: list[dict], tools: Sequence[Tool], add_generation_prompt: bool = True) -> str:
        """The conversation as the prompt text; see render_prompt."""
        return render_prompt(self.tokenizer, self.support, messages, tools, add_generation_prompt)

    def constraint(self, tools: Sequence[Tool], choice: ToolChoice, parallel: bool) -> dict | None:
        """The constraint spec forcing a call for "required" or a named function; None otherwise."""
        return tool_choice_constraint(self.format, tools, choice, parallel=parallel, vocab=self._markers)

    def parser(self, tools: Sequence[Tool]) -> "ToolCallParser":
        """A streaming parser for a reply that may call `tools`."""
        return ToolCallParser(self.format, [t.name for t in tools])


# ---- forcing a call --------------------------------------------------------------------


def tool_choice_constraint(
    fmt: ToolCallFormat,
    tools: Sequence[Tool],
    choice: ToolChoice,
    *,
    parallel: bool = False,
    vocab: Mapping[str, int] | None = None,
) -> dict | None:
    """A constraint spec (kakeya_mlx.constrain) forcing a valid call for "required" or a named function.

    The reply must be the format's wrapper around a call of an allowed function whose
    arguments follow its parameters schema; with `parallel`, up to MAX_FORCED_CALLS calls
    (Llama 3 templates take one). `vocab` (token text to id, the tokenizer's get_vocab())
    lets markers that are single tokens in the model's vocabulary be forced as those
    tokens, as the model was trained to write them. The call's JSON is written the way
    templates render calls back (constrain.CANONICAL_JSON), so the next turn's prompt
    extends the reply exactly.
    """
    if choice.mode in ("none", "auto"):
        return None
    allowed = [t for t in tools if choice.mode == "required" or t.name == choice.function]
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": t.name}, fmt.arguments_key: t.parameters},
            "required": ["name", fmt.arguments_key],
            "additionalProperties": False,
        }
        for t in allowed
    ]
    body = {"x-guidance": CANONICAL_JSON, **({"anyOf": calls} if len(calls) > 1 else calls[0])}
    more = f"{{0,{MAX_FORCED_CALLS - 1}}}"

    def marker(text: str) -> str:
        token = (vocab or {}).get(text)
        return f"<[{token}]>" if token is not None else json.dumps(text)

    if fmt.name == "mistral":
        lark = f'start: {marker(MISTRAL_MARKER)} " [" call' + (f' (", " call){more}' if parallel else "") + ' "]"'
    elif fmt.name == "llama3_json":
        lark = "start: call"
    else:
        lark = "start: wrapped" + (f' ("\\n" wrapped){more}' if parallel else "")
        lark += f'\nwrapped: {marker(HERMES_OPEN)} "\\n" call "\\n" {marker(HERMES_CLOSE)}'
    return {"type": "grammar", "grammar": f"{lark}\ncall: %json {json.dumps(body)}"}


# ---- reading calls from replies ----------------------------------------------------------


class ToolCallParser:
    """Feed reply text as it is generated; get back content text and tool-call deltas.

    A call is released whole once it is complete and valid, as two deltas (id and name,
    then the arguments), so a malformed call can still fall back to content; content is
    held back only while it might be the start of a call.
    """

    def __init__(self, fmt: ToolCallFormat, tool_names: Collection[str] | None = None):
        self.format = fmt
        self.calls: list[ToolCall] = []
        self._names = None if tool_names is None else set(tool_names)
        self._marker = {"hermes": HERMES_OPEN, "mistral": MISTRAL_MARKER, "llama3_json": PYTHON_TAG}[fmt.name]
        # Llama and Mistral calls fill the whole reply and may come without their marker.
        self._opener = {"llama3_json": "{", "mistral": "["}.get(fmt.name)
        self._pending = ""  # text not yet released
        self._opened = ""  # the marker text that opened the call being read
        self._held_space = ""  # whitespace held until it is clear it is content
        self._mode = "start"  # start | text | tagged (inside <tool_call>) | json (a Llama / Mistral body)
        self._decoder = json.JSONDecoder()

    def feed(self, text: str) -> list[str | ToolCallDelta]:
        self._pending += text
        out: list[str | ToolCallDelta] = []
        while self._step(out, final=False):
            pass
        return _merged(out)

    def finish(self) -> list[str | ToolCallDelta]:
        """At the end of the reply: release what is held (an unfinished call becomes content)."""
        out: list[str | ToolCallDelta] = []
        while self._step(out, final=True):
            pass
        if self._mode == "tagged":  # no closing tag: a complete call still counts
            call = self._call_of(self._pending.strip())
            if call:
                self._emit(out, [call])
            else:
                self._content(out, self._opened + self._pending)
        else:
            self._content(out, self._opened + self._pending)
        self._pending = self._opened = ""
        if self._held_space and not self.calls:
            out.append(self._held_space)
        self._held_space = ""
        return _merged(out)

    def _step(self, out: list, final: bool) -> bool:
        """Advance once; True if the pending text may hold more to do."""
        if self._mode == "start":
            return self._scan_start(final)
        if self._mode == "text":
            return self._scan_text(out, final)
        if self._mode == "tagged":
            end = self._pending.find(HERMES_CLOSE)
            if end < 0:
                return False
            body, self._pending = self._pending[:end], self._pending[end + len(HERMES_CLOSE) :]
            call = self._call_of(body)
            if call:
                self._emit(out, [call])
            else:
                self._content(out, self._opened + body + HERMES_CLOSE)
            self._opened, self._mode = "", "text"
            return True
        return self._scan_json(out, final)

    def _scan_start(self, final: bool) -> bool:
        body = self._pending.lstrip(" \t\r\n;" if self.calls else None)
        if self._opener is None:
            self._mode = "text"
            return True
        if not final and self._marker.startswith(body):
            return False  # too little yet to tell
        opened = ""
        if body.startswith(self._marker):
            opened, body = self._marker, body[len(self._marker) :].lstrip()
        if body.startswith(self._opener):  # what came before the body is kept, for content if no call follows
            self._mode, self._opened = "json", self._pending[: len(self._pending) - len(body)]
            self._pending = body
            return True
        if opened and not body and not final:
            return False
        self._mode = "text"
        return True

    def _scan_text(self, out: list, final: bool) -> bool:
        at = self._pending.find(self._marker)
        if at >= 0:
            self._content(out, self._pending[:at])
            self._opened, self._pending = self._marker, self._pending[at + len(self._marker) :]
            self._mode = "tagged" if self.format.name == "hermes" else "json"
            return True
        keep = 0 if final else _partial_suffix(self._pending, self._marker)
        self._content(out, self._pending[: len(self._pending) - keep])
        self._pending = self._pending[len(self._pending) - keep :]
        return False

    def _scan_json(self, out: list, final: bool) -> bool:
        body = self._pending.lstrip()
        if not body:
            return False
        try:
            value, end = self._decoder.raw_decode(body)
        except ValueError:
            if final or not _may_become_json(body):
                self._content(out, self._opened + self._pending)
                self._pending = self._opened = ""
                self._mode = "text"
            return False
        calls = self._calls_of(value)
        if calls:
            self._emit(out, calls)
        else:
            self._content(out, self._opened + self._pending[: len(self._pending) - len(body) + end])
        self._pending, self._opened = body[end:], ""
        # Llama models may write several calls, one after another.
        self._mode = "start" if calls and self.format.name == "llama3_json" else "text"
        return True

    def _calls_of(self, value: object) -> list[ToolCall] | None:
        items = value if self.format.name == "mistral" else [value]
        if not isinstance(items, list) or not items:
            return None
        calls = [self._call_of(item) for item in items]
        return None if any(c is None for c in calls) else calls

    def _call_of(self, body: object) -> ToolCall | None:
        if isinstance(body, str):
            try:
                body = json.loads(body)
            except ValueError:
                return None
        if not isinstance(body, dict) or not isinstance(body.get("name"), str):
            return None
        arguments = body.get(self.format.arguments_key, body.get("arguments", body.get("parameters")))
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                return None
        if not isinstance(arguments, dict) or (self._names is not None and body["name"] not in self._names):
            return None
        return ToolCall(new_call_id(self.format), body["name"], json.dumps(arguments, ensure_ascii=False))

    def _emit(self, out: list, calls: list[ToolCall]) -> None:
        self._held_space = ""  # whitespace around calls is layout, not content
        for call in calls:
            index = len(self.calls)
            self.calls.append(call)
            out.append(ToolCallDelta(index, call.id, call.name, ""))
            out.append(ToolCallDelta(index, None, None, call.arguments))

    def _content(self, out: list, text: str) -> None:
        if not text:
            return
        if not text.strip():
            self._held_space += text
            return
        out.append(self._held_space + text)
        self._held_space = ""


def parse_reply(
    text: str, fmt: ToolCallFormat, tool_names: Collection[str] | None = None
) -> tuple[str | None, list[ToolCall]]:
    """A whole reply as (content or None, tool calls), as the streaming parser reads it."""
    parser = ToolCallParser(fmt, tool_names)
    pieces = parser.feed(text) + parser.finish()
    content = "".join(p for p in pieces if isinstance(p, str))
    return (content.strip() or None) if parser.calls else (content or None), parser.calls


def _merged(pieces: list) -> list:
    """Adjacent content pieces joined into one."""
    out: list = []
    for piece in pieces:
        if isinstance(piece, str) and out and isinstance(out[-1], str):
            out[-1] += piece
        else:
            out.append(piece)
    return out


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that begins `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


_PARTIAL_TAIL = re.compile(r"(t(r(ue?)?)?|f(a(l(se?)?)?)?|n(u(ll?)?)?|-?[0-9]*\.?[0-9]*([eE][-+]?[0-9]*)?)$")


def _may_become_json(body: str) -> bool:
    """Whether more text could still complete `body` into a JSON value."""
    try:
        json.loads(body)
    except json.JSONDecodeError as e:
        if e.msg.startswith("Unterminated string") or e.pos >= len(body.rstrip()):
            return True
        return bool(_PARTIAL_TAIL.fullmatch(body[e.pos :].rstrip()))
    return True
