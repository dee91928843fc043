"""Structured output and log probabilities through the engine's decode loop.

A random tiny model is the hardest client there is for a grammar: whatever it
would say, the constraint must make the output parse and validate, with plain,
batched and speculative decoding alike. Log probabilities must equal a
reference computed from the same logits.
"""

import asyncio
import dataclasses
import json
import random

import jsonschema
import mlx.core as mx
import pytest

from kakeya_mlx.batch import forward_one
from kakeya_mlx.cache import CacheShape, SinkWindowCache
from kakeya_mlx.errors import InvalidArgumentError
from kakeya_mlx.events import DoneEvent, TokenEvent
from kakeya_mlx.loader import load_model
from kakeya_mlx.rope import layer_shifters
from kakeya_mlx.sampling import SamplingParams

from engine_run import run_engine

SINK, WINDOW, BLOCK = 4, 40, 8

SCHEMAS = [
    {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 12},
            "population": {"type": "integer", "minimum": 0},
            "coastal": {"type": "boolean"},
        },
        "required": ["city", "population", "coastal"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3}},
        "required": ["tags"],
        "additionalProperties": False,
    },
]


@pytest.fixture(scope="module")
def loaded(make_model):
    return load_model(make_model("qwen3"))


@pytest.fixture(scope="module")
def draft(make_model):
    return load_model(make_model("qwen3", seed=1))


def _run(loaded, fn, draft=None, **config):
    return run_engine(loaded, fn, draft, **{"sink": SINK, "window": WINDOW, "block": BLOCK, **config})


async def _turn(engine, prompt_text, **kw) -> tuple[list, str]:
    sid = await engine.create_session()
    await engine.append(sid, text=prompt_text)
    events = [e async for e in engine.generate(sid, **kw)]
    assert isinstance(events[-1], DoneEvent)
    return events, sid


@pytest.mark.parametrize("speculative", ["off", "prompt_lookup", "draft"])
def test_json_schema_output_always_validates(loaded, draft, speculative):
    async def scenario(engine):
        outputs = []
        for schema in SCHEMAS:
            constraint = await engine.compile_constraint({"type": "json_schema", "schema": schema}, "response_format")
            runs = [SamplingParams()] + [SamplingParams(temperature=1.0, seed=s) for s in range(4)]
            # Several sessions at once, so constrained turns also share batched steps.
            results = await asyncio.gather(
                *(
                    _turn(engine, "Answer in JSON.", max_tokens=120, sampling=p, constraint=constraint, speculative=speculative)
                    for p in runs
                )
            )
            for events, sid in results:
                outputs.append((schema, events[-1], engine.session_history(sid)))
        return outputs

    for schema, done, history in _run(loaded, scenario, draft=draft):
        assert done.stop_reason == "eos", done
        jsonschema.validate(json.loads(done.text), schema)
        assert history[-1] in loaded.eos_token_ids  # the reply is closed like any other


def test_an_invalid_constraint_names_its_field(loaded):
    async def scenario(engine):
        with pytest.raises(InvalidArgumentError, match="response_format.json_schema"):
            await engine.compile_constraint(
                {"type": "json_schema", "schema": {"type": "object", "properties": 3}}, "response_format.json_schema"
            )
        with pytest.raises(InvalidArgumentError, match="constraint"):
            await engine.compile_constraint({"type": "regex", "pattern": "(unclosed"}, "constraint")
        with pytest.raises(InvalidArgumentError, match="constraint"):
            await engine.compile_constraint({"type": "nonsense"}, "constraint")
        return True

    assert _run(loaded, scenario)


def _reference_logprobs(loaded, history: list[int], generated: list[int]) -> list:
    """log-softmax of the logits before each generated token, from one plain forward pass."""
    model = loaded.model
    cache = SinkWindowCache(CacheShape(SINK, 4096, BLOCK), layer_shifters(model))
    prompt = history[: len(history) - len(generated)]
    logits = forward_one(model, cache.layers, prompt + generated[:-1])[len(prompt) - 1 :].astype(mx.float32)
    return (logits - mx.logsumexp(logits, axis=-1, keepdims=True)).tolist()


@pytest.mark.parametrize("speculative", ["off", "prompt_lookup"])
def test_logprobs_match_the_models_own_distribution(loaded, speculative):
    async def scenario(engine):
        events, sid = await _turn(
            engine, "The quick brown fox", max_tokens=24, logprobs=True, top_logprobs=5, speculative=speculative
        )
        return events, engine.session_history(sid)

    eos_free = dataclasses.replace(loaded, eos_token_ids=[])
    events, history = _run(eos_free, scenario, window=200)  # no eviction: the reference is one plain pass
    tokens = [e for e in events if isinstance(e, TokenEvent)]
    reference = _reference_logprobs(loaded, history, [t.token_id for t in tokens])
    for token, expected in zip(tokens, reference):
        assert token.logprob == pytest.approx(expected[token.token_id], abs=1e-4)
        assert len(token.top_logprobs) == 5
        ids = [i for i, _ in token.top_logprobs]
        values = [v for _, v in token.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert ids[0] == max(range(len(expected)), key=expected.__getitem__)
        for i, v in token.top_logprobs:
            assert v == pytest.approx(expected[i], abs=1e-4)
        # Greedy: the chosen token is the likeliest one.
        assert token.token_id == ids[0]


def test_bad_logprob_requests_are_refused(loaded):
    async def scenario(engine):
        sid = await engine.create_session()
        await engine.append(sid, text="hello")
        for kw, field in [
            ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
            ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
            ({"logprobs": "yes"}, "logprobs"),
            ({"top_logprobs": 3}, "top_logprobs"),
        ]:
            with pytest.raises(InvalidArgumentError, match=field):
                engine.generate(sid, max_tokens=3, **kw)
        return (await engine.session_info(sid))["generating"]

    assert _run(loaded, scenario) is False


def test_sampled_constrained_output_is_reproducible_per_seed(loaded):
    async def scenario(engine):
        constraint = await engine.compile_constraint({"type": "regex", "pattern": "[a-z]{3,8}( [a-z]{2,6}){2}"})
        texts = []
        for _ in range(2):
            events, _ = await _turn(
                engine, "Say three words.", max_tokens=40, sampling=SamplingParams(temperature=1.2, seed=7), constraint=constraint
            )
            texts.append(events[-1].text)
        return texts

    first, second = _run(loaded, scenario)
    assert first == second
    assert len(first.split(" ")) == 3 and all(w.isalpha() and w.islower() for w in first.split(" "))


def test_constraint_accepts_random_prompts(loaded):
    rng = random.Random(3)
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 8}, "n": {"type": "integer"}},
        "required": ["name", "n"],
        "additionalProperties": False,
    }

    async def scenario(engine):
        constraint = await engine.compile_constraint({"type": "json_schema", "schema": schema})
        out = []
        for i in range(4):
            prompt = "".join(rng.choice("abc xyz{}\n") for _ in range(30))
            events, _ = await _turn(engine, prompt, max_tokens=160, constraint=constraint)
            out.append(events[-1])
        return out

    for done in _run(loaded, scenario):
        assert done.stop_reason == "eos"
        jsonschema.validate(json.loads(done.text), schema)
