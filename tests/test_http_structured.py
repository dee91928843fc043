"""Structured output, log probabilities and penalties on the OpenAI endpoints, through the official client.

A random tiny model served by the real daemon is the hardest client there is for a
schema: whatever it would say, the reply must parse and validate, every time, streamed
or not. Log probabilities come back in OpenAI's shapes and agree with greedy choices.
"""

import json

import jsonschema
import openai
import pytest

from test_openai_http import KEY, assert_error_envelope, raw_post, running_front

from kakeya_mlx.loader import load_model

CITY = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "population": {"type": "integer", "minimum": 0, "maximum": 10_000_000},
        "coastal": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["old", "big", "cold"]}, "maxItems": 3},
    },
    "required": ["city", "population", "coastal", "tags"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "Describe a city as JSON."}]


@pytest.fixture(scope="module")
def loaded(make_model):
    return load_model(make_model("qwen3"))


@pytest.fixture
async def front(loaded):
    async with running_front(loaded, window=200, block=8) as f:
        yield f


@pytest.fixture
async def chars_front(make_model):
    """A model whose tokens are whole ASCII characters: token texts join into the reply exactly."""
    async with running_front(load_model(make_model("qwen3", tokenizer="chars")), window=200, block=8) as f:
        yield f


def _schema_format(schema: dict = CITY) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": True}}


async def test_json_schema_replies_parse_and_validate_every_time(front):
    client = front.client()
    for seed in range(4):
        kw = dict(model=front.model, messages=ASK, max_tokens=200, temperature=1.0, seed=seed)
        reply = await client.chat.completions.create(response_format=_schema_format(), **kw)
        assert reply.choices[0].finish_reason == "stop"  # the constraint ended it, not max_tokens
        jsonschema.validate(json.loads(reply.choices[0].message.content), CITY)
        stream = await client.chat.completions.create(response_format=_schema_format(), stream=True, **kw)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text == reply.choices[0].message.content  # the same seed, streamed
        completion = await client.completions.create(
            model=front.model,
            prompt="A city as JSON:",
            max_tokens=200,
            temperature=1.0,
            seed=seed,
            extra_body={"response_format": _schema_format()},
        )
        jsonschema.validate(json.loads(completion.choices[0].text), CITY)


async def test_json_object_and_the_clients_parse_helper(front):
    client = front.client()
    for seed in range(3):
        reply = await client.chat.completions.create(
            model=front.model,
            messages=ASK,
            max_tokens=100,
            temperature=1.0,
            seed=seed,
            response_format={"type": "json_object"},
        )
        assert isinstance(json.loads(reply.choices[0].message.content), dict)
    # Greedy: sampled, this reply's length varies (some 110 to 190 tokens), and one cut at
    # max_tokens would make the helper raise LengthFinishReasonError.
    parsed = await client.chat.completions.parse(
        model=front.model, messages=ASK, max_tokens=200, temperature=0, response_format=_schema_format()
    )
    assert parsed.choices[0].message.parsed is None or isinstance(parsed.choices[0].message.parsed, dict)
    jsonschema.validate(json.loads(parsed.choices[0].message.content), CITY)


@pytest.mark.parametrize(
    "response_format, param",
    [
        (_schema_format({"type": "objekt"}), "response_format.json_schema.schema"),
        (_schema_format({"type": "string", "pattern": "(unclosed"}), "response_format.json_schema.schema"),
        (
            _schema_format({"type": "object", "properties": {"a": {"type": "string", "format": "no-such-format"}}}),
            "response_format.json_schema.schema",
        ),
        ({"type": "json_schema"}, "response_format.json_schema"),
        ({"type": "xml"}, "response_format.type"),
        ("json", "response_format"),
    ],
)
async def test_a_bad_response_format_is_a_400_naming_it_and_touches_no_session(front, response_format, param):
    client = front.client()
    await client.chat.completions.create(model=front.model, messages=ASK, max_tokens=3)
    before = [(s["session_id"], s["history_length"]) for s in front.sessions()]
    body = {"model": front.model, "messages": ASK, "max_tokens": 3, "response_format": response_format}
    status, reply = await raw_post(front, "/v1/chat/completions", json.dumps(body).encode())
    assert status == 400, reply
    assert assert_error_envelope(reply, param)["type"] == "invalid_request_error"
    assert [(s["session_id"], s["history_length"]) for s in front.sessions()] == before


async def test_greedy_logprobs_put_the_chosen_token_on_top_streamed_or_not(chars_front):
    front = chars_front
    client = front.client()
    kw = dict(model=front.model, messages=ASK, max_tokens=16, temperature=0, logprobs=True, top_logprobs=5)
    whole = await client.chat.completions.create(**kw)
    content = whole.choices[0].logprobs.content
    assert len(content) == whole.usage.completion_tokens  # no end token within 16 here
    for entry in content:
        assert len(entry.top_logprobs) == 5
        best = entry.top_logprobs[0]
        assert (entry.token, entry.bytes, entry.logprob) == (best.token, best.bytes, best.logprob)
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
        assert entry.logprob <= 0
    assert "".join(e.token for e in content) == whole.choices[0].message.content
    assert all(e.token == bytes(e.bytes).decode() for e in content)

    chunks = [c async for c in await client.chat.completions.create(stream=True, **kw)]
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]

    without_top = await client.chat.completions.create(**{**kw, "top_logprobs": 0})
    assert [e.top_logprobs for e in without_top.choices[0].logprobs.content] == [[]] * len(content)
    plain = await client.chat.completions.create(**{**kw, "logprobs": False, "top_logprobs": None})
    assert plain.choices[0].logprobs is None


async def test_completion_logprobs_in_the_legacy_shape(chars_front):
    front = chars_front
    client = front.client()
    kw = dict(model=front.model, prompt="Once upon a time", max_tokens=10, temperature=0, logprobs=3)
    whole = await client.completions.create(**kw)
    choice = whole.choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 10
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3 and max(top.values()) == logprob and top[token] == logprob
    assert "".join(lp.tokens) == choice.text
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(10)]
    streamed = [c async for c in await client.completions.create(stream=True, **kw)]
    tokens = [t for c in streamed if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    offsets = [o for c in streamed if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    assert tokens == lp.tokens and offsets == lp.text_offset


async def test_penalties_reach_the_sampler(front):
    client = front.client()
    kw = dict(model=front.model, messages=ASK, max_tokens=40, temperature=0)
    plain = await client.chat.completions.create(**kw)
    repeated = await client.chat.completions.create(frequency_penalty=-2.0, **kw)
    varied = await client.chat.completions.create(presence_penalty=2.0, **kw)
    texts = {plain.choices[0].message.content, repeated.choices[0].message.content, varied.choices[0].message.content}
    assert len(texts) == 3
    with pytest.raises(openai.BadRequestError) as bad:
        await client.chat.completions.create(frequency_penalty=2.5, **kw)
    assert bad.value.param == "frequency_penalty" and "[-2, 2]" in bad.value.message
    with pytest.raises(openai.BadRequestError) as bad:
        await client.chat.completions.create(top_logprobs=21, logprobs=True, **kw)
    assert bad.value.param == "top_logprobs"
    with pytest.raises(openai.BadRequestError) as bad:
        await client.chat.completions.create(top_logprobs=2, **kw)
    assert bad.value.param == "top_logprobs"


async def test_api_key_may_come_as_x_api_key(front):
    status, reply = await raw_post(
        front,
        "/v1/chat/completions",
        json.dumps({"messages": ASK, "max_tokens": 2}).encode(),
        headers={"Authorization": "", "x-api-key": KEY},
    )
    assert status == 200, reply
