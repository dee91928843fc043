"""Tool calls through real chat templates: rendering, parsing, and calls forced by constrained decoding."""

import json
import random
import re

import jsonschema
import pytest
from decode_loop import constrained_decode
from tool_models import FAMILIES, make_family_model

from kakeya_mlx.constrain import Constrainer
from kakeya_mlx.errors import InvalidArgumentError
from kakeya_mlx.loader import load_model
from kakeya_mlx.toolcalls import (
    HERMES,
    LLAMA3_JSON,
    MISTRAL,
    ToolCallDelta,
    ToolCallParser,
    ToolChoice,
    check_tool_choice,
    check_tools,
    format_for_template,
    parse_reply,
    render_prompt,
    tool_choice_constraint,
    tool_support,
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two small numbers",
        "parameters": {
            "type": "object",
            "properties": {
                "a": {"type": "integer", "minimum": 0, "maximum": 99},
                "b": {"type": "integer", "minimum": 0, "maximum": 99},
            },
            "required": ["a", "b"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER, ADD]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
HISTORY = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_abc123",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_abc123", "content": "18 C, sunny"},
]


@pytest.fixture(scope="module")
def models(make_model, tmp_path_factory) -> dict:
    """The ChatML test model (a template without tools) and one model per tool-calling family."""
    base = make_model("qwen3")
    out = {"chatml": load_model(base)}
    for family in FAMILIES:
        out[family] = load_model(make_family_model(base, tmp_path_factory.mktemp("tools") / family, family))
    return out


def test_call_format_is_read_from_the_template(models):
    expected = {
        "chatml": (HERMES, False),
        "qwen2.5": (HERMES, True),
        "llama3.1": (LLAMA3_JSON, True),
        "mistral-v0.3": (MISTRAL, True),
    }
    for name, (fmt, renders) in expected.items():
        support = tool_support(models[name].tokenizer, models[name].chat_template)
        assert (support.format, support.template_renders_tools) == (fmt, renders), name
    assert format_for_template(None) == format_for_template("{{ messages }}") == HERMES


def test_tools_reach_the_prompt_through_the_template_or_the_fallback_block(models):
    tools = check_tools(TOOLS)
    seen = {}
    for name, loaded in models.items():
        support = tool_support(loaded.tokenizer, loaded.chat_template)
        prompt = render_prompt(loaded.tokenizer, support, HISTORY[:2], tools)
        plain = render_prompt(loaded.tokenizer, support, HISTORY[:2], [])
        assert '"name": "get_weather"' in prompt and '"name": "add"' in prompt and "get_weather" not in plain, name
        seen[name] = prompt
    assert "# Tools" in seen["chatml"] and "<tool_call></tool_call> tags" in seen["chatml"]
    assert seen["chatml"].startswith("<|im_start|>system\nBe brief.\n\n# Tools")  # joined to the given system prompt
    assert "<tools>" in seen["qwen2.5"] and "You are provided with function signatures" in seen["qwen2.5"]
    assert "Given the following functions" in seen["llama3.1"] and "Environment: ipython" in seen["llama3.1"]
    assert seen["mistral-v0.3"].startswith("<s>[AVAILABLE_TOOLS] [")


def test_calls_and_results_render_back_for_the_next_turn(models):
    tools = check_tools(TOOLS)
    out = {
        name: render_prompt(m.tokenizer, tool_support(m.tokenizer, m.chat_template), HISTORY, tools)
        for name, m in models.items()
    }
    hermes_call = (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'
    )
    assert (
        hermes_call in out["qwen2.5"]
        and "<|im_start|>user\n<tool_response>\n18 C, sunny\n</tool_response><|im_end|>" in out["qwen2.5"]
    )
    assert (
        hermes_call in out["chatml"]
        and "<|im_start|>user\n<tool_response>\n18 C, sunny\n</tool_response><|im_end|>" in out["chatml"]
    )
    assert '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}<|eot_id|>' in out["llama3.1"]
    assert '<|start_header_id|>ipython<|end_header_id|>\n\n"18 C, sunny"<|eot_id|>' in out["llama3.1"]
    mistral = re.search(
        r'\[TOOL_CALLS\] \[\{"name": "get_weather", "arguments": \{"city": "Paris", "unit": "celsius"\}, "id": "(\w{9})"\}\]</s>',
        out["mistral-v0.3"],
    )
    assert mistral, out["mistral-v0.3"]  # the id became the 9 characters Mistral's template insists on ...
    assert (
        f'[TOOL_RESULTS] {{"content": 18 C, sunny, "call_id": "{mistral.group(1)}"}}[/TOOL_RESULTS]'
        in out["mistral-v0.3"]
    )  # ... the same for its result


@pytest.mark.parametrize(
    ("messages", "field"),
    [
        (
            [{"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "x", "content": "r"}],
            "messages[1]: a tool message must follow",
        ),
        (HISTORY[:3] + [{"role": "tool", "tool_call_id": "call_other", "content": "r"}], "messages[3].tool_call_id"),
        (
            HISTORY[:2]
            + [
                {"role": "assistant", "tool_calls": [{"id": "c1", "function": {"name": "f", "arguments": "{not json"}}]}
            ],
            "messages[2].tool_calls[0].function.arguments",
        ),
        (
            HISTORY[:2]
            + [{"role": "assistant", "tool_calls": [{"id": "c1", "function": {"name": "f", "arguments": "[1]"}}]}],
            "messages[2].tool_calls[0].function.arguments",
        ),
        (
            HISTORY[:2] + [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]}],
            "messages[2].tool_calls[0].id",
        ),
        (HISTORY[:3] + [{"role": "tool", "tool_call_id": "call_abc123", "content": 5}], "messages[3].content"),
    ],
)
def test_malformed_tool_history_is_refused_naming_the_field(models, messages, field):
    loaded = models["qwen2.5"]
    with pytest.raises(InvalidArgumentError, match=re.escape(field)):
        render_prompt(
            loaded.tokenizer, tool_support(loaded.tokenizer, loaded.chat_template), messages, check_tools(TOOLS)
        )


@pytest.mark.parametrize(
    ("tools", "field"),
    [
        ({"type": "function"}, "tools: must be a list"),
        ([{"type": "retrieval"}], "tools[0]: must be an object"),
        ([{"type": "function", "function": {"name": "has space"}}], "tools[0].function.name"),
        ([WEATHER, WEATHER], "tools[1].function.name: 'get_weather' is offered twice"),
        (
            [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}],
            "tools[0].function.parameters: cannot be compiled",
        ),
        (
            [{"type": "function", "function": {"name": "f", "parameters": {"$ref": "#/$defs/nowhere"}}}],
            "tools[0].function.parameters: cannot be compiled",
        ),
        (
            [{"type": "function", "function": {"name": "f", "parameters": "object"}}],
            "tools[0].function.parameters: must be a JSON Schema object",
        ),
    ],
)
def test_malformed_tools_are_refused_naming_the_field(tools, field):
    with pytest.raises(InvalidArgumentError, match=re.escape(field)):
        check_tools(tools)


def test_tool_choice_is_checked_against_the_tools():
    tools = check_tools(TOOLS)
    assert check_tool_choice(None, tools) == ToolChoice("auto") and check_tool_choice(None, []) == ToolChoice("none")
    assert check_tool_choice({"type": "function", "function": {"name": "add"}}, tools) == ToolChoice("function", "add")
    for bad, field in [
        (
            {"type": "function", "function": {"name": "nope"}},
            "tool_choice.function.name: 'nope' is not one of the tools",
        ),
        ("sometimes", "tool_choice: must be"),
        ("required", 'tool_choice: "required" needs at least one tool'),
    ]:
        with pytest.raises(InvalidArgumentError, match=re.escape(field)):
            check_tool_choice(bad, tools if bad != "required" else [])


REPLIES = [
    # (format, reply, expected content, expected calls)
    (
        HERMES,
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>',
        "Let me check.",
        [("get_weather", {"city": "Oslo", "unit": "celsius"}), ("add", {"a": 1, "b": 2})],
    ),
    (
        HERMES,
        'Hmm <tool_call>{"name": "add", "arguments": {"a": 1,</tool_call> done',
        'Hmm <tool_call>{"name": "add", "arguments": {"a": 1,</tool_call> done',
        [],
    ),
    (
        HERMES,
        '<tool_call>{"name": "launch_rockets", "arguments": {}}</tool_call>',
        '<tool_call>{"name": "launch_rockets", "arguments": {}}</tool_call>',
        [],
    ),
    (HERMES, "Use a < b when comparing <tool", "Use a < b when comparing <tool", []),
    (
        HERMES,
        '<tool_call>\n{"name": "add", "arguments": "{\\"a\\": 4, \\"b\\": 5}"}',
        None,
        [("add", {"a": 4, "b": 5})],
    ),
    (LLAMA3_JSON, '<|python_tag|>{"name": "add", "parameters": {"a": 2, "b": 3}}', None, [("add", {"a": 2, "b": 3})]),
    (
        LLAMA3_JSON,
        '{"name": "add", "parameters": {"a": 2, "b": 3}}; {"name": "get_weather", "parameters": {"city": "Rome", "unit": "celsius"}}',
        None,
        [("add", {"a": 2, "b": 3}), ("get_weather", {"city": "Rome", "unit": "celsius"})],
    ),
    (LLAMA3_JSON, '{"answer": 42} is the JSON you asked for.', '{"answer": 42} is the JSON you asked for.', []),
    (LLAMA3_JSON, '{"name": "add", "parameters": {"a": tru', '{"name": "add", "parameters": {"a": tru', []),
    (LLAMA3_JSON, "Paris is the capital of France.", "Paris is the capital of France.", []),
    (MISTRAL, '[TOOL_CALLS] [{"name": "add", "arguments": {"a": 7, "b": 8}}]', None, [("add", {"a": 7, "b": 8})]),
    (
        MISTRAL,
        ' [{"name": "add", "arguments": {"a": 7, "b": 8}}, {"name": "add", "arguments": {"a": 1, "b": 1}}]',
        None,
        [("add", {"a": 7, "b": 8}), ("add", {"a": 1, "b": 1})],
    ),
    (MISTRAL, "[1, 2] are the first numbers.", "[1, 2] are the first numbers.", []),
    (MISTRAL, '[TOOL_CALLS] [{"name": "add", "argu', '[TOOL_CALLS] [{"name": "add", "argu', []),
]


@pytest.mark.parametrize(("fmt", "reply", "content", "calls"), REPLIES)
def test_replies_parse_the_same_whole_and_streamed_in_any_pieces(fmt, reply, content, calls):
    names = [t["function"]["name"] for t in TOOLS]
    whole_content, whole_calls = parse_reply(reply, fmt, names)
    assert whole_content == content
    assert [(c.name, json.loads(c.arguments)) for c in whole_calls] == calls
    rng = random.Random(reply)
    for _ in range(25):
        parser, pieces, i = ToolCallParser(fmt, names), [], 0
        while i < len(reply):
            n = rng.randint(1, 6)
            pieces += parser.feed(reply[i : i + n])
            i += n
        pieces += parser.finish()
        streamed = "".join(p for p in pieces if isinstance(p, str))
        assert (streamed.strip() or None if calls else streamed or None) == content  # malformed calls stay content
        deltas = [p for p in pieces if isinstance(p, ToolCallDelta)]
        rebuilt: dict[int, dict] = {}
        for d in deltas:  # as a client accumulates OpenAI's streamed tool_calls
            item = d.to_openai()
            entry = rebuilt.setdefault(item["index"], {"id": None, "name": None, "arguments": ""})
            entry["id"] = item.get("id", entry["id"])
            entry["name"] = item["function"].get("name", entry["name"])
            entry["arguments"] += item["function"]["arguments"]
        assert [(e["name"], json.loads(e["arguments"])) for e in rebuilt.values()] == calls
        for e, call in zip(rebuilt.values(), parser.calls):
            assert e["id"] == call.id
            assert re.fullmatch(r"[A-Za-z0-9]{9}", call.id) if fmt == MISTRAL else call.id.startswith("call_")


@pytest.mark.parametrize("family", ["chatml", *FAMILIES])
@pytest.mark.parametrize("choice", [ToolChoice("required"), ToolChoice("function", "add")], ids=["required", "named"])
def test_forced_calls_from_a_random_model_are_always_valid(models, family, choice):
    loaded = models[family]
    tools = check_tools(TOOLS)
    support = tool_support(loaded.tokenizer, loaded.chat_template)
    spec = tool_choice_constraint(support.format, tools, choice, vocab=loaded.tokenizer.get_vocab())
    constrainer = Constrainer.for_model(loaded)
    constraint = constrainer.compile(spec)
    prompt = loaded.tokenizer.encode(
        render_prompt(loaded.tokenizer, support, HISTORY[:2], tools), add_special_tokens=False
    )
    for seed in range(4):
        out = constrained_decode(loaded, constrainer.matcher(constraint), prompt, 300, temperature=1.0, seed=seed)
        assert out.finished, out.text
        content, calls = parse_reply(out.text, support.format, [t.name for t in tools])
        assert content is None and len(calls) == 1, out.text
        assert calls[0].name in ({"add"} if choice.mode == "function" else set(SCHEMAS))
        jsonschema.validate(json.loads(calls[0].arguments), SCHEMAS[calls[0].name])


def test_parallel_forced_calls_stay_within_the_bound(models):
    loaded = models["qwen2.5"]
    tools = check_tools(TOOLS)
    support = tool_support(loaded.tokenizer, loaded.chat_template)
    constrainer = Constrainer.for_model(loaded)
    constraint = constrainer.compile(
        tool_choice_constraint(
            support.format, tools, ToolChoice("required"), parallel=True, vocab=loaded.tokenizer.get_vocab()
        )
    )
    prompt = loaded.tokenizer.encode(
        render_prompt(loaded.tokenizer, support, HISTORY[:2], tools), add_special_tokens=False
    )
    for seed in range(3):
        out = constrained_decode(loaded, constrainer.matcher(constraint), prompt, 1500, temperature=1.0, seed=seed)
        content, calls = parse_reply(out.text, support.format)
        assert out.finished and content is None and 1 <= len(calls) <= 8, out.text
        for call in calls:
            jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
    assert tool_choice_constraint(support.format, tools, ToolChoice("auto")) is None
