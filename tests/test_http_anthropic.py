"""The Anthropic Messages API on the real daemon, spoken to by the official `anthropic` client.

The same core as the OpenAI endpoints: the same greedy reply for the same conversation,
the same session pool (a tool round trip reads the first turn back from the cache),
the same limits; errors come in Anthropic's own shape.
"""

import json

import aiohttp
import anthropic
import jsonschema
import pytest

from test_anthropic_api import WEATHER
from test_openai_http import KEY, running_front

from kakeya_mlx.loader import load_model

ASK = [{"role": "user", "content": "Weather in Paris?"}]
# The SDK no longer takes temperature itself; the daemon still does (its default samples).
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def loaded(make_model):
    return load_model(make_model("qwen3", max_position_embeddings=2048))


@pytest.fixture
async def front(loaded):
    async with running_front(loaded, window=1000, block=16, max_append_tokens=4096, max_new_tokens=500) as f:
        f.anthropic = anthropic.AsyncAnthropic(base_url=f.url, api_key=KEY, max_retries=0)
        try:
            yield f
        finally:
            await f.anthropic.close()


async def _events(front, body: dict) -> list[dict]:
    """The raw server-sent events of a streamed request: each event's name must match its data's type."""
    headers = {"x-api-key": KEY, "anthropic-version": "2023-06-01", "content-type": "application/json"}
    async with aiohttp.ClientSession() as http:
        async with http.post(front.url + "/v1/messages", json={**body, "stream": True}, headers=headers) as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
            text = await r.text()
    events = []
    for block in text.strip().split("\n\n"):
        name, data = block.split("\n")
        event = json.loads(data.removeprefix("data: "))
        assert name == f"event: {event['type']}"
        events.append(event)
    return events


async def test_a_reply_is_the_same_greedy_text_as_on_the_openai_endpoint(front):
    system = "Be brief."
    message = await front.anthropic.messages.create(
        model="claude-whatever", max_tokens=12, system=system, messages=ASK, extra_body=GREEDY
    )
    assert message.model == front.model and message.role == "assistant" and message.stop_reason == "max_tokens"
    (block,) = message.content
    chat = await front.client().chat.completions.create(
        model=front.model, max_tokens=12, messages=[{"role": "system", "content": system}, *ASK], temperature=0
    )
    assert block.text == chat.choices[0].message.content  # one core, one prompt and greedy stream for both APIs
    assert message.usage.output_tokens == 12
    counted = await front.anthropic.messages.count_tokens(model="x", system=system, messages=ASK)
    assert counted.input_tokens == message.usage.input_tokens + message.usage.cache_read_input_tokens
    assert chat.usage.prompt_tokens == counted.input_tokens


async def test_streaming_sends_anthropics_event_sequence(front):
    body = {"model": "m", "max_tokens": 10, "messages": ASK}
    events = await _events(front, {**body, **GREEDY})
    kinds = [e["type"] for e in events]
    assert kinds[:3] == ["message_start", "ping", "content_block_start"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(kinds[3:-3]) == {"content_block_delta"}
    start = events[0]["message"]
    assert start["content"] == [] and start["stop_reason"] is None and start["usage"]["output_tokens"] == 0
    delta = events[-2]
    assert delta["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    assert delta["usage"]["output_tokens"] == 10
    text = "".join(e["delta"]["text"] for e in events if e["type"] == "content_block_delta")

    whole = await front.anthropic.messages.create(**body, extra_body=GREEDY)
    assert whole.content[0].text == text
    async with front.anthropic.messages.stream(**body, extra_body=GREEDY) as stream:
        seen = [event.type async for event in stream]
        final = await stream.get_final_message()
    assert final.content[0].text == text and final.stop_reason == "max_tokens"
    assert seen[0] == "message_start" and seen[-1] == "message_stop"


async def test_a_tool_round_trip_reads_the_first_turn_from_the_cache(front):
    kw = dict(model="m", max_tokens=120, tools=[WEATHER])
    first = await front.anthropic.messages.create(
        messages=ASK, tool_choice={"type": "any", "disable_parallel_tool_use": True}, **kw
    )
    assert first.stop_reason == "tool_use"
    (use,) = [b for b in first.content if b.type == "tool_use"]
    assert use.name == "get_weather"
    jsonschema.validate(use.input, WEATHER["input_schema"])

    reply = [
        *ASK,
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "18 C, sunny"}]},
    ]
    second = await front.anthropic.messages.create(messages=reply, **{**kw, "max_tokens": 6})
    assert second.usage.cache_read_input_tokens == first.usage.input_tokens + first.usage.output_tokens
    assert second.usage.input_tokens > 0

    # One greedy call: sampled parallel calls may run past max_tokens, and a call cut short is content.
    named = {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True}
    events = await _events(front, {"messages": ASK, "tool_choice": named, **kw, **GREEDY})
    blocks = [e["content_block"] for e in events if e["type"] == "content_block_start"]
    assert blocks and all(b["type"] == "tool_use" and b["name"] == "get_weather" for b in blocks)
    partial = [e["delta"]["partial_json"] for e in events if e["type"] == "content_block_delta"]
    assert [json.loads(p) for p in partial] and events[-2]["delta"]["stop_reason"] == "tool_use"

    cut = await front.anthropic.messages.create(messages=ASK, tool_choice=named, **{**kw, "max_tokens": 5})
    assert cut.stop_reason == "max_tokens" and [b.type for b in cut.content] == ["text"]
    text = cut.content[0].text  # nothing lost: the unfinished call is the text
    assert text and text[:11] == "<tool_call>"[: len(text)]


async def test_stop_sequences_and_a_continued_reply(front):
    greedy = {"model": "m", "max_tokens": 30, "extra_body": GREEDY}
    full = (await front.anthropic.messages.create(messages=ASK, **greedy)).content[0].text
    stop = next(
        full[i : i + 2] for i in range(3, len(full) - 2) if full[i : i + 2].strip() and full[i : i + 2] not in full[:i]
    )
    cut = await front.anthropic.messages.create(messages=ASK, stop_sequences=[stop, "zzzz"], **greedy)
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop
    assert cut.content[0].text == full[: full.index(stop)]
    # A final assistant message is the reply's start: the model continues it.
    prefilled = await front.anthropic.messages.create(
        model="m", max_tokens=10, messages=[*ASK, {"role": "assistant", "content": full[:5]}]
    )
    assert prefilled.usage.cache_read_input_tokens > 0  # the first request's prompt was still resident


@pytest.mark.parametrize(
    "change, mentions",
    [
        ({"tools": [{**WEATHER, "input_schema": {"type": "objekt"}}]}, "tools[0].input_schema"),
        ({"tools": [WEATHER], "tool_choice": {"type": "tool", "name": "nope"}}, "tool_choice.name"),
        (
            {
                "messages": [
                    *ASK,
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "x"}]},
                ]
            },
            "messages[1].content[0].tool_use_id",
        ),
        ({"max_tokens": 501}, "max_new_tokens=500"),
        ({"extra_body": {"temperature": 1.5}}, "temperature"),  # this client release has no temperature argument
    ],
)
async def test_bad_requests_get_anthropics_error_shape_and_touch_no_session(front, change, mentions):
    await front.anthropic.messages.create(model="m", max_tokens=2, messages=ASK)
    before = [(s["session_id"], s["history_length"]) for s in front.sessions()]
    body = {"model": "m", "max_tokens": 8, "messages": ASK, **change}
    with pytest.raises(anthropic.BadRequestError) as bad:
        await front.anthropic.messages.create(**body)
    error = bad.value.body
    assert bad.value.status_code == 400 and set(error) == {"type", "error"} and error["type"] == "error"
    assert error["error"]["type"] == "invalid_request_error" and mentions in error["error"]["message"]
    assert [(s["session_id"], s["history_length"]) for s in front.sessions()] == before


async def test_auth_and_unknown_paths_answer_in_anthropics_shape(front):
    unauthorized = anthropic.AsyncAnthropic(base_url=front.url, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as denied:
        await unauthorized.messages.create(model="m", max_tokens=2, messages=ASK)
    assert denied.value.body["error"]["type"] == "authentication_error"
    await unauthorized.close()
    async with aiohttp.ClientSession() as http:
        async with http.post(front.url + "/v1/messages/nope", json={}, headers={"x-api-key": KEY}) as r:
            body = await r.json()
    assert r.status == 404 and body["type"] == "error" and body["error"]["type"] == "not_found_error"
