"""Stop strings: the history keeps exactly the text that was streamed.

The tokens that overlap a stop string leave the history and the cache; the text
before the stop inside the first such token is re-tokenized into the history.
The session then continues exactly like a fresh session given the same history,
also when the stop string straddled a block boundary that the window slid across.
"""

import dataclasses
import random

import pytest

from kakeya_mlx.events import DoneEvent, TokenEvent
from kakeya_mlx.loader import load_model
from kakeya_mlx.textstream import TextStream

from engine_run import run_engine

SINK, WINDOW, BLOCK = 4, 20, 8


@pytest.fixture(scope="module")
def loaded(make_model):
    return dataclasses.replace(load_model(make_model("qwen3")), eos_token_ids=[])


def _prompt(vocab: int, n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, vocab) for _ in range(n)]


def _run(loaded, fn, **config):
    return run_engine(loaded, fn, sink=SINK, window=WINDOW, block=BLOCK, **config)


async def _generate(engine, sid, **kw):
    events = [e async for e in engine.generate(sid, **kw)]
    assert isinstance(events[-1], DoneEvent)
    return events


async def _session(engine, tokens):
    sid = await engine.create_session()
    await engine.append(sid, tokens=tokens)
    return sid


def _token_texts(tokenizer, ids):
    """Each token's text as a generate stream releases it."""
    stream = TextStream(tokenizer)
    for token_id in ids:
        stream.add(token_id)
    stream.flush()
    return [text for _, text in stream.take()]


async def _check_stop(engine, loaded, prompt, stop, free_text):
    sid = await _session(engine, prompt)
    events = await _generate(engine, sid, max_tokens=len(free_text) + 10, stop=[stop])
    done = events[-1]
    tokens = [e for e in events if isinstance(e, TokenEvent)]
    expected = free_text[: free_text.index(stop)]
    assert done.stop_reason == "stop_sequence"
    assert "".join(t.text for t in tokens) == done.text == expected
    history = engine.session_history(sid)
    kept = history[len(prompt) :]
    # The history's new part is exactly the released tokens, and it reads as the streamed text.
    assert kept == [t.token_id for t in tokens] == done.token_ids
    assert loaded.tokenizer.decode(kept, skip_special_tokens=True) == expected
    # The cache was cut back, not thrown away: at most this turn's own tokens run again.
    info = await engine.session_info(sid)
    assert info["pending_tokens"] <= done.generated_tokens + 1, info
    # ... and continues exactly like a fresh session given the same history.
    after = (await _generate(engine, sid, max_tokens=30))[-1]
    fresh = (await _generate(engine, await _session(engine, history), max_tokens=30))[-1]
    assert after.token_ids == fresh.token_ids
    engine._sessions[sid].cache.check_invariants()
    return info


def test_stop_strings_at_many_places_keep_only_the_streamed_text(loaded):
    prompt = _prompt(loaded.vocab_size, 50, seed=3)

    async def scenario(engine):
        free = (await _generate(engine, await _session(engine, prompt), max_tokens=70))[-1]
        text = free.text
        checked = 0
        # Stop strings starting at token starts and inside tokens, short and long.
        for start in range(3, min(len(text) - 6, 120), 7):
            for length in (1, 2, 5):
                stop = text[start : start + length]
                if not stop.strip() or text.index(stop) != start:
                    continue
                await _check_stop(engine, loaded, prompt, stop, text)
                checked += 1
        return checked

    assert _run(loaded, scenario) >= 10


def test_a_stop_string_across_a_slid_block_boundary_is_cut_back_exactly(loaded):
    """The stop begins in the last token of a full block and ends after the commit that slid the window."""
    prompt = _prompt(loaded.vocab_size, 2 * (SINK + WINDOW) + 3, seed=5)

    async def scenario(engine):
        free = (await _generate(engine, await _session(engine, prompt), max_tokens=90))[-1]
        ids, text = free.token_ids, free.text
        texts = _token_texts(loaded.tokenizer, ids)
        found = 0
        for i in range(1, len(ids) - 1):
            if (len(prompt) + i) % BLOCK or not texts[i - 1] or not texts[i].strip():
                continue  # token i must open a new block
            stop = texts[i - 1][-1] + texts[i]
            start = len("".join(texts[: i - 1])) + len(texts[i - 1]) - 1
            if text.find(stop) != start:
                continue
            info = await _check_stop(engine, loaded, prompt, stop, text)
            assert info["evicted_tokens"] > 0
            found += 1
        return found

    assert _run(loaded, scenario) >= 2, "no block-straddling stop string in the free run"


def test_stop_string_with_recompute_forced_on(loaded):
    prompt = _prompt(loaded.vocab_size, 33, seed=9)

    async def scenario(engine):
        free = (await _generate(engine, await _session(engine, prompt), max_tokens=60))[-1]
        text = free.text
        stops = [text[s : s + 3] for s in (5, 17, 29) if text[s : s + 3].strip()]
        for stop in stops:
            if text.index(stop) < len(text) - 3:
                await _check_stop(engine, loaded, prompt, stop, text)
        return len(stops)

    assert _run(loaded, scenario, recompute_blocks=True) >= 2
