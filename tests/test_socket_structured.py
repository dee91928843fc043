"""Structured output and log probabilities on the socket: generate's constraint, logprobs and top_logprobs.

A real daemon on a real Unix socket, spoken to by the Python client and raw frames;
a random tiny model, so only the constraint can make the output parse.
"""

import json
import re

import jsonschema
import pytest

from test_daemon import RawClient, make_config, new_session, sock_dir  # noqa: F401

from kakeya_client import AsyncClient
from kakeya_client.errors import InvalidArgument
from kakeya_client.events import DoneEvent, TokensEvent
from kakeya_daemon.server import running_daemon
from kakeya_mlx.loader import load_model

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "colour": {"enum": ["red", "green", "blue"]},
    },
    "required": ["name", "age", "colour"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def loaded(qwen3_dir):
    return load_model(qwen3_dir)


async def _turn(session, **params) -> tuple[str, list[TokensEvent], DoneEvent]:
    async with session.generate(**params) as stream:
        events = [event async for event in stream]
    tokens = [e for e in events if isinstance(e, TokensEvent)]
    return "".join(e.text for e in tokens), tokens, events[-1]


async def test_constraints_make_a_random_model_write_what_they_allow(qwen3_dir, sock_dir, loaded):
    constraints = [
        (
            {"type": "json_schema", "schema": PERSON, "strict": True},
            lambda t: jsonschema.validate(json.loads(t), PERSON),
        ),
        ({"type": "json_object"}, lambda t: isinstance(json.loads(t), dict) or pytest.fail(t)),
        (
            {"type": "regex", "pattern": "[0-9]{3}-[a-z]{2,4}"},
            lambda t: re.fullmatch("[0-9]{3}-[a-z]{2,4}", t) or pytest.fail(t),
        ),
        (
            {"type": "grammar", "grammar": 'start: "yes" | "no" | "maybe"'},
            lambda t: t in ("yes", "no", "maybe") or pytest.fail(t),
        ),
        (
            {"type": "grammar", "grammar": 'root ::= "(" [a-c]+ ")"'},
            lambda t: re.fullmatch(r"\([a-c]+\)", t) or pytest.fail(t),
        ),
    ]
    async with running_daemon(make_config(qwen3_dir, sock_dir, window=200), loaded=loaded) as daemon:
        async with AsyncClient(daemon.socket_path) as client:
            for constraint, check in constraints:
                for seed in range(3):
                    session = await client.create_session()
                    await session.append(messages=[{"role": "user", "content": "Answer."}])
                    text, _, done = await _turn(
                        session, constraint=constraint, max_tokens=200, temperature=1.0, seed=seed
                    )
                    assert done.stop_reason == "eos", (constraint, text)  # the constraint finished it
                    check(text)


async def test_tokens_events_carry_log_probabilities_when_asked(qwen3_dir, sock_dir, loaded):
    async with running_daemon(make_config(qwen3_dir, sock_dir, window=200), loaded=loaded) as daemon:
        async with AsyncClient(daemon.socket_path) as client:
            session = await client.create_session()
            await session.append(text="Once upon a time")
            _, events, done = await _turn(session, max_tokens=12, logprobs=True, top_logprobs=4, temperature=0)
            assert sum(len(e.tokens) for e in events) == done.generated_tokens == 12
            for event in events:
                assert len(event.logprobs) == len(event.top_logprobs) == len(event.tokens)
                for token, logprob, top in zip(event.tokens, event.logprobs, event.top_logprobs):
                    # Greedy: the chosen token is the likeliest, and the alternatives come most likely first.
                    assert len(top) == 4 and top[0] == (token, logprob) and logprob <= 0
                    assert [lp for _, lp in top] == sorted((lp for _, lp in top), reverse=True)
            _, events, _ = await _turn(session, max_tokens=3, logprobs=True)
            assert all(len(e.logprobs) == len(e.tokens) and e.top_logprobs is None for e in events)
            _, events, _ = await _turn(session, max_tokens=3)
            assert all(e.logprobs is None and e.top_logprobs is None for e in events)

        raw = await RawClient.connect(daemon.socket_path)
        sid = await new_session(raw, "Hello")
        frames = await raw.generate(session_id=sid, max_tokens=2, logprobs=True, top_logprobs=1)
        data = [f["data"] for f in frames if f.get("event") == "tokens"]
        assert all(set(d) == {"tokens", "text", "logprobs", "top_logprobs"} for d in data)
        assert all(isinstance(pair, list) and len(pair) == 2 for d in data for top in d["top_logprobs"] for pair in top)
        await raw.close()


@pytest.mark.parametrize(
    "constraint, mentions",
    [
        ({"type": "json_schema", "schema": {"type": "objekt"}}, "constraint.schema: cannot be compiled"),
        ({"type": "regex", "pattern": "(unclosed"}, "constraint.pattern: cannot be compiled"),
        ({"type": "grammar", "grammar": "start: undefined_rule"}, "constraint.grammar"),
        ({"type": "json_schema", "schema": {"type": "string", "format": "nope"}, "strict": True}, "constraint.schema"),
        ({"type": "yaml"}, "constraint.type"),
        ({"type": "regex"}, "'pattern'"),
    ],
)
async def test_a_bad_constraint_is_invalid_argument_and_leaves_the_session_alone(
    qwen3_dir, sock_dir, loaded, constraint, mentions
):
    async with running_daemon(make_config(qwen3_dir, sock_dir), loaded=loaded) as daemon:
        async with AsyncClient(daemon.socket_path) as client:
            session = await client.create_session()
            await session.append(text="Hello there")
            before = await session.info()
            with pytest.raises(InvalidArgument) as bad:
                await _turn(session, constraint=constraint, max_tokens=5)
            assert mentions in bad.value.message
            after = await session.info()
            assert (after["history_length"], after["cache_length"], after["generating"]) == (
                before["history_length"],
                before["cache_length"],
                False,
            )
            # And it still generates (greedy: sampled, an end token could come first).
            _, _, done = await _turn(session, max_tokens=2, temperature=0)
            assert done.stop_reason == "max_tokens"
