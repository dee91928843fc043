"""Tool calls on /v1/chat/completions, through the official `openai` client and LangChain.

Tiny random models wearing real families' chat templates (tests/tool_models.py) are
served by the real daemon: tools reach the prompt through each template (or the
fallback block for a template that ignores them), a forced call always parses and
validates, streamed calls arrive as tool-call deltas, and the next turn, with the
call and its result rendered back, reuses the resident session.
"""

import json

import jsonschema
import openai
import pytest
from langchain_core.messages import HumanMessage, ToolMessage
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field
from tool_models import FAMILIES, make_family_model

from test_openai_http import KEY, assert_error_envelope, raw_post, running_front
from test_toolcalls import SCHEMAS, TOOLS, WEATHER

from kakeya_mlx.loader import load_model

ASK = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"}]
# Each family's template writes past calls back as the model wrote them, except Mistral's,
# which adds the call's id: there the reply is not a prefix of the next prompt.
REUSES_THE_REPLY = {"chatml": True, "qwen2.5": True, "llama3.1": True, "mistral-v0.3": False}


@pytest.fixture(scope="module")
def base(make_model):
    """A tiny model with room for a prompt that lists tools."""
    return make_model("qwen3", max_position_embeddings=2048)


@pytest.fixture(scope="module")
def models(base, tmp_path_factory) -> dict:
    out = {"chatml": load_model(base)}
    for family in FAMILIES:
        out[family] = load_model(make_family_model(base, tmp_path_factory.mktemp("http-tools") / family, family))
    return out


def _front(loaded):
    return running_front(loaded, window=1000, block=16, max_append_tokens=4096)


def _valid(call) -> dict:
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, SCHEMAS[call.function.name])
    return arguments


@pytest.mark.parametrize("family", ["chatml", *FAMILIES])
async def test_a_forced_call_round_trip_reuses_the_session(models, family):
    async with _front(models[family]) as front:
        client = front.client()
        kw = dict(model=front.model, tools=TOOLS, parallel_tool_calls=False)
        first = await client.chat.completions.create(messages=ASK, tool_choice="required", max_tokens=120, **kw)
        choice = first.choices[0]
        assert choice.finish_reason == "tool_calls" and not choice.message.content
        (call,) = choice.message.tool_calls
        assert call.type == "function" and call.id
        _valid(call)

        turn2 = ASK + [
            choice.message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": "18 C, sunny"},
        ]
        second = await client.chat.completions.create(messages=turn2, max_tokens=8, **kw)
        assert second.choices[0].finish_reason in ("length", "stop", "tool_calls")
        cached = second.usage.prompt_tokens_details.cached_tokens
        if REUSES_THE_REPLY[family]:
            # The call the model wrote is exactly what the template renders back: the whole first turn stays.
            assert cached == first.usage.prompt_tokens + first.usage.completion_tokens
        assert second.usage.prompt_tokens > cached

        named = await client.chat.completions.create(
            messages=ASK, tool_choice={"type": "function", "function": {"name": "add"}}, max_tokens=120, **kw
        )
        (call,) = named.choices[0].message.tool_calls
        assert call.function.name == "add"
        _valid(call)


async def test_streamed_calls_arrive_as_tool_call_deltas(models):
    async with _front(models["qwen2.5"]) as front:
        client = front.client()
        kw = dict(model=front.model, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=300, temperature=1.0)
        for seed in range(3):
            whole = await client.chat.completions.create(seed=seed, **kw)
            chunks = [c async for c in await client.chat.completions.create(seed=seed, stream=True, **kw)]
            calls: dict[int, dict] = {}
            for chunk in chunks:
                for delta in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
                    call = calls.setdefault(delta.index, {"id": None, "name": None, "arguments": ""})
                    if delta.id:
                        call.update(id=delta.id, name=delta.function.name)
                    call["arguments"] += delta.function.arguments or ""
            finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
            assert finishes == [whole.choices[0].finish_reason] == ["tool_calls"]
            assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
                (c.function.name, _valid(c)) for c in whole.choices[0].message.tool_calls
            ]
            assert all(c["id"] for c in calls.values())


async def test_tool_choice_none_and_auto(models):
    async with _front(models["chatml"]) as front:
        client = front.client()
        kw = dict(model=front.model, messages=ASK, tools=TOOLS, max_tokens=12, temperature=0)
        none = await client.chat.completions.create(tool_choice="none", **kw)
        plain = await client.chat.completions.create(model=front.model, messages=ASK, max_tokens=12, temperature=0)
        # "none": the model is not told of the tools, so it answers as without them.
        assert none.choices[0].message.content == plain.choices[0].message.content
        assert none.usage.prompt_tokens == plain.usage.prompt_tokens
        auto = await client.chat.completions.create(**kw)
        assert auto.usage.prompt_tokens > plain.usage.prompt_tokens  # the tools are in the prompt
        assert auto.choices[0].finish_reason in ("length", "stop", "tool_calls")


class Weather(BaseModel):
    """Current weather for a city."""

    city: str = Field(max_length=12)
    unit: str = Field(pattern="^(celsius|fahrenheit)$")


class Verdict(BaseModel):
    city: str = Field(max_length=12)
    sunny: bool


async def test_langchain_bind_tools_and_structured_output(models):
    async with _front(models["qwen2.5"]) as front:
        llm = ChatOpenAI(base_url=front.url + "/v1", api_key=KEY, model="any-name", max_tokens=150, max_retries=0)
        # strict: the parameters admit no other keys, as OpenAI's strict mode asks.
        with_tools = llm.bind_tools([Weather], tool_choice="required", strict=True, parallel_tool_calls=False)
        message = await with_tools.ainvoke([HumanMessage("Weather in Paris?")])
        (call,) = message.tool_calls
        assert call["name"] == "Weather"
        Weather.model_validate(call["args"])

        # A full round trip: the call, its result, and the model's next message.
        answer = await llm.bind_tools([Weather], strict=True).ainvoke(
            [HumanMessage("Weather in Paris?"), message, ToolMessage("18 C", tool_call_id=call["id"])]
        )
        assert answer.response_metadata["finish_reason"] in ("length", "stop", "tool_calls")
        assert answer.usage_metadata["input_token_details"]["cache_read"] > 0

        structured = llm.with_structured_output(Verdict)
        for _ in range(2):
            verdict = await structured.ainvoke("Is it sunny in Paris?")
            assert isinstance(verdict, Verdict)


@pytest.mark.parametrize(
    "change, param",
    [
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]},
            "tools[0].function.parameters",
        ),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name"),
        ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name"),
        ({"tools": "get_weather"}, "tools"),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice.function.name",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
        (
            {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
            "response_format",
        ),
        ({"messages": ASK + [{"role": "tool", "tool_call_id": "call_1", "content": "18 C"}]}, "messages[2]"),
        (
            {
                "messages": ASK
                + [
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{"}}
                        ],
                    }
                ]
            },
            "messages[2].tool_calls[0].function.arguments",
        ),
        (
            {
                "messages": ASK
                + [
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": "{}"}}
                        ],
                    },
                    {"role": "tool", "tool_call_id": "call_2", "content": "3"},
                ]
            },
            "messages[3].tool_call_id",
        ),
        ({"parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ],
)
async def test_bad_tool_requests_are_a_400_naming_the_field_and_touch_no_session(models, change, param):
    async with _front(models["chatml"]) as front:
        await front.client().chat.completions.create(model=front.model, messages=ASK, max_tokens=2)
        before = [(s["session_id"], s["history_length"]) for s in front.sessions()]
        body = {"model": front.model, "messages": ASK, "max_tokens": 4, **change}
        status, reply = await raw_post(front, "/v1/chat/completions", json.dumps(body).encode())
        assert status == 400, reply
        assert assert_error_envelope(reply, param)["type"] == "invalid_request_error"
        assert [(s["session_id"], s["history_length"]) for s in front.sessions()] == before
        with pytest.raises(openai.BadRequestError):  # the client reads it as the typed error
            await front.client().chat.completions.create(**body)
