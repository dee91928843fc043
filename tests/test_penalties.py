"""frequency_penalty and presence_penalty, with OpenAI's meaning, in the engine's sampler.

Each token's logit loses frequency_penalty for every time this turn has generated
it, and presence_penalty once if it has: checked against the model's own logits
from one forward pass over the turn, for plain and speculative decoding alike.
"""

import asyncio
import dataclasses

import mlx.core as mx
import pytest

from kakeya_mlx.batch import forward_one
from kakeya_mlx.cache import CacheShape, SinkWindowCache
from kakeya_mlx.engine import Engine, EngineConfig
from kakeya_mlx.errors import InvalidArgumentError
from kakeya_mlx.events import DoneEvent
from kakeya_mlx.loader import load_model
from kakeya_mlx.rope import layer_shifters
from kakeya_mlx.sampling import SamplingParams

SINK, WINDOW, BLOCK = 4, 200, 8
PROMPT = "the cat sat on the mat and the cat sat on the mat and the cat"
TOKENS = 40
# The forward pass over the whole turn and the decode loop's steps round differently in the last bits.
ROUNDING = 1e-4


@pytest.fixture(scope="module")
def endless(make_model):
    return dataclasses.replace(load_model(make_model("qwen3")), eos_token_ids=[])


def _generate(loaded, sampling: SamplingParams, speculative: str = "off", draft=None) -> tuple[list[int], DoneEvent]:
    """(prompt ids, the done event) of one greedy turn."""

    async def main():
        engine = Engine(loaded, EngineConfig(sink=SINK, window=WINDOW, block=BLOCK), draft=draft)
        await engine.start()
        try:
            sid = await engine.create_session()
            prompt = (await engine.append(sid, text=PROMPT))["tokens"]
            events = [
                e async for e in engine.generate(sid, max_tokens=TOKENS, sampling=sampling, speculative=speculative)
            ]
            assert isinstance(events[-1], DoneEvent) and events[-1].stop_reason == "max_tokens"
            return prompt, events[-1]
        finally:
            await engine.stop()

    return asyncio.run(main())


def _logits_before_each(loaded, prompt: list[int], generated: list[int]) -> mx.array:
    cache = SinkWindowCache(CacheShape(SINK, 4096, BLOCK), layer_shifters(loaded.model))
    logits = forward_one(loaded.model, cache.layers, prompt + generated[:-1])
    return logits[len(prompt) - 1 :].astype(mx.float32)


@pytest.mark.parametrize("frequency, presence", [(1.5, 0.0), (0.0, 2.0), (0.7, 0.7), (-1.0, 0.0)])
def test_each_token_is_the_top_of_the_penalised_logits(endless, frequency, presence):
    plain_prompt, plain = _generate(endless, SamplingParams())
    prompt, done = _generate(endless, SamplingParams(frequency_penalty=frequency, presence_penalty=presence))
    plain, generated = plain.token_ids, done.token_ids
    assert prompt == plain_prompt
    assert generated != plain  # the penalties changed what came out
    logits = _logits_before_each(endless, prompt, generated).tolist()
    counts: dict[int, int] = {}
    for i, token in enumerate(generated):
        penalised = [
            x - counts.get(t, 0) * frequency - (presence if t in counts else 0.0) for t, x in enumerate(logits[i])
        ]
        assert penalised[token] >= max(penalised) - ROUNDING, f"token {i}"
        counts[token] = counts.get(token, 0) + 1
    if frequency < 0:  # a negative penalty favours repeating what was said
        assert len(set(generated)) < len(set(plain))


@pytest.mark.parametrize(
    "mode, frequency, presence",
    [("prompt_lookup", -0.8, 0.0), ("draft", 0.4, 0.3)],  # prompt lookup needs repeats to draft from
)
def test_speculative_decoding_applies_the_same_penalties(endless, make_model, mode, frequency, presence):
    sampling = SamplingParams(frequency_penalty=frequency, presence_penalty=presence)
    _, plain = _generate(endless, sampling)
    draft = load_model(make_model("qwen3")) if mode == "draft" else None  # the same weights: it drafts what is taken
    _, drafted = _generate(endless, sampling, speculative=mode, draft=draft)
    assert drafted.draft_tokens > 0 and drafted.accepted_tokens > 0
    assert drafted.token_ids == plain.token_ids


@pytest.mark.parametrize("name", ["frequency_penalty", "presence_penalty"])
def test_values_outside_openais_range_are_refused(name):
    with pytest.raises(InvalidArgumentError, match=rf"{name}=2.5: must be in \[-2, 2\]"):
        SamplingParams(**{name: 2.5}).validate()
