"""INV-3: the greedy stream after a history depends only on that history.

Histories run to over 4 x (sink + window) so the window slides many times; they
are fed in one shot, one token at a time, in 7s, in block-straddling sizes, and
as generate-then-append mixes. Streams and the cache's committed keys and values
must be byte-identical. INV-1 and INV-2 are checked by the engine after every turn
(`SinkWindowCache.check_invariants`) and again here.
"""

import random

import mlx.core as mx
import pytest

from kakeya_mlx.engine import Engine
from kakeya_mlx.loader import load_model

from engine_run import run_engine

SINK, WINDOW, BLOCK = 4, 20, 8
HISTORY = 4 * (SINK + WINDOW) + 13  # 109 tokens: not a multiple of the block
GENERATE = 24


def _prompt(vocab: int, n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, vocab) for _ in range(n)]


def _chunks(ids: list[int], sizes) -> list[list[int]]:
    out, i, k = [], 0, 0
    while i < len(ids):
        size = sizes[k % len(sizes)]
        out.append(ids[i : i + size])
        i += size
        k += 1
    return out


async def _greedy_after(engine: Engine, pieces: list[list[int]], max_tokens: int = GENERATE):
    sid = await engine.create_session()
    for piece in pieces:
        await engine.append(sid, tokens=piece)
    events = [e async for e in engine.generate(sid, max_tokens=max_tokens)]
    done = events[-1]
    return sid, done.token_ids, done


@pytest.fixture(scope="module")
def loaded(make_model):
    return load_model(make_model("qwen3"))


def _run(loaded, coro_fn, **config):
    return run_engine(loaded, coro_fn, sink=SINK, window=WINDOW, block=BLOCK, **config)


@pytest.mark.parametrize("recompute", [False, True], ids=["promote-tail", "recompute-blocks"])
def test_chunkings_give_identical_greedy_streams_and_caches(loaded, recompute):
    ids = _prompt(loaded.vocab_size, HISTORY, seed=11)
    chunkings = {
        "one-shot": [HISTORY],
        "ones": [1],
        "sevens": [7],
        "straddling": [BLOCK - 3, BLOCK + 5, 2 * BLOCK + 1],
        "odd-mix": [13, 1, 29, 2],
    }

    async def scenario(engine):
        results = {}
        for name, sizes in chunkings.items():
            sid, tokens, done = await _greedy_after(engine, _chunks(ids, sizes))
            session = engine._sessions[sid]
            session.cache.check_invariants()
            results[name] = (tokens, session.cache, done)
        return results

    results = _run(loaded, scenario, recompute_blocks=recompute)
    ref_tokens, ref_cache, ref_done = results["one-shot"]
    assert len(ref_tokens) == GENERATE or ref_done.stop_reason == "eos"
    assert ref_cache.evicted >= 3 * (SINK + WINDOW)
    for name, (tokens, cache, done) in results.items():
        assert tokens == ref_tokens, f"{name}: greedy stream differs"
        assert done.text == ref_done.text
        assert cache.token_ids == ref_cache.token_ids
        for a, b in zip(cache.arrays(), ref_cache.arrays()):
            n = ref_cache.committed
            assert mx.array_equal(a[..., :n, :], b[..., :n, :]).item(), f"{name}: committed K/V differ"


@pytest.mark.parametrize("recompute", [False, True], ids=["promote-tail", "recompute-blocks"])
def test_generate_then_append_equals_appending_the_same_tokens(loaded, recompute):
    """Tokens the model generated earlier count exactly like the same tokens appended."""
    turns = [_prompt(loaded.vocab_size, n, seed=20 + n) for n in (17, 5, 30, 9, 41)]

    async def scenario(engine):
        # Session A: a conversation of append + generate turns.
        sid = await engine.create_session()
        history: list[int] = []
        for turn in turns:
            await engine.append(sid, tokens=turn)
            history += turn
            events = [e async for e in engine.generate(sid, max_tokens=11)]
            history += events[-1].token_ids
        assert engine.session_history(sid) == history
        final_a = [e async for e in engine.generate(sid, max_tokens=GENERATE)][-1].token_ids
        # Session B: the same history appended in odd pieces, never generated.
        _, final_b, _ = await _greedy_after(engine, _chunks(history, [3, 10]))
        # Session C: the whole history at once.
        _, final_c, _ = await _greedy_after(engine, [history])
        return len(history), final_a, final_b, final_c

    n, a, b, c = _run(loaded, scenario, recompute_blocks=recompute)
    assert n >= 4 * (SINK + WINDOW)
    assert a == b == c
