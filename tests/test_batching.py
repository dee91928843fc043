"""Batched decoding: every decoding turn goes through the model in one forward pass.

On this CPU backend a session's greedy stream must be byte-identical whether it
runs alone or batched with others of different lengths, phases (prefill, decode,
eviction) and arrival times. Histories and outputs cross the window several times.
"""

import asyncio
import dataclasses
import random

import mlx.core as mx
import pytest

from kakeya_mlx import platform
from kakeya_mlx.engine import Engine, EngineConfig
from kakeya_mlx.events import DoneEvent, TokenEvent, TruncatedEvent
from kakeya_mlx.loader import load_model
from kakeya_mlx.sampling import SamplingParams

SINK, WINDOW, BLOCK = 4, 20, 8
GENERATE = 3 * (SINK + WINDOW) + 5  # every stream crosses the window three times


@pytest.fixture(scope="module")
def loaded(make_model):
    # No EOS, so every stream runs its full length.
    return dataclasses.replace(load_model(make_model("qwen3")), eos_token_ids=[])


def _prompt(vocab: int, n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, vocab) for _ in range(n)]


def _engine(loaded, **config) -> Engine:
    return Engine(loaded, EngineConfig(sink=SINK, window=WINDOW, block=BLOCK, **config))


async def _run(engine: Engine, prompt: list[int], max_tokens: int = GENERATE, **kw) -> DoneEvent:
    sid = await engine.create_session()
    await engine.append(sid, tokens=prompt)
    events = [e async for e in engine.generate(sid, max_tokens=max_tokens, **kw)]
    assert isinstance(events[-1], DoneEvent)
    return events[-1]


def _prompts(loaded, n: int) -> list[list[int]]:
    # Lengths from a few tokens to over three windows: some sessions are still in
    # prefill while others decode, and they slide at different steps.
    lengths = [3, 77, 11, 40, 1, 100, 29, 8]
    return [_prompt(loaded.vocab_size, lengths[i % len(lengths)], seed=100 + i) for i in range(n)]


@pytest.mark.skipif(platform.backend() != "cpu", reason="batch exactness is promised on the CPU backend")
@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_batched_greedy_streams_equal_solo_streams(loaded, n):
    prompts = _prompts(loaded, n)

    async def scenario():
        solo = _engine(loaded, decode_batch_size=1)
        await solo.start()
        try:
            alone = [await _run(solo, p) for p in prompts]
        finally:
            await solo.stop()

        batched = _engine(loaded, prefill_step_tokens=BLOCK)
        await batched.start()
        try:
            started = asyncio.Event()
            tokens_seen = 0

            async def one(i: int, prompt: list[int]) -> DoneEvent:
                nonlocal tokens_seen
                # Staggered arrivals: later sessions join once earlier ones are decoding.
                while i and tokens_seen < 5 * i:
                    await asyncio.sleep(0.001)
                sid = await batched.create_session()
                await batched.append(sid, tokens=prompt)
                done = None
                async for event in batched.generate(sid, max_tokens=GENERATE):
                    if isinstance(event, TokenEvent):
                        tokens_seen += 1
                        started.set()
                    done = event
                return done

            together = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
            largest = batched.scheduler_counters()["largest_batch"]
        finally:
            await batched.stop()
        return alone, together, largest

    alone, together, largest = asyncio.run(scenario())
    assert largest == n, "the sessions were not decoded together"
    for i, (a, b) in enumerate(zip(alone, together)):
        assert a.generated_tokens == GENERATE
        assert b.token_ids == a.token_ids, f"session {i} (prompt {len(prompts[i])} tokens) changed when batched"
        assert b.text == a.text


@pytest.mark.skipif(platform.backend() != "cpu", reason="batch exactness is promised on the CPU backend")
def test_batched_sessions_leave_the_same_caches_and_flat_memory(loaded):
    prompts = _prompts(loaded, 4)

    async def scenario():
        results = {}
        for size in (1, 16):
            engine = _engine(loaded, decode_batch_size=size)
            await engine.start()
            try:
                sids = await _sessions(engine, prompts)
                streams = [engine.generate(sid, max_tokens=GENERATE) for sid in sids]
                await asyncio.gather(*(_drain(s) for s in streams))
                results[size] = [
                    (engine.session_history(sid), await engine.session_info(sid), engine._sessions[sid].cache)
                    for sid in sids
                ]
            finally:
                await engine.stop()
        return results

    results = asyncio.run(scenario())
    for (h1, info1, c1), (h16, info16, c16) in zip(results[1], results[16]):
        assert h1 == h16
        assert info1["kv_bytes"] == info16["kv_bytes"]
        assert info16["kv_bytes"] <= loaded.kv_bytes_per_token * (SINK + WINDOW + BLOCK)
        assert c1.token_ids == c16.token_ids
        for a, b in zip(c1.arrays(), c16.arrays()):
            assert mx.array_equal(a[..., : c1.length, :], b[..., : c1.length, :]).item()


async def _drain(stream) -> list:
    return [e async for e in stream]


async def _sessions(engine: Engine, prompts: list[list[int]]) -> list[str]:
    sids = []
    for prompt in prompts:
        sid = await engine.create_session()
        await engine.append(sid, tokens=prompt)
        sids.append(sid)
    return sids


def test_a_long_prompt_delays_other_streams_by_at_most_one_piece(loaded):
    """While one session prefills a long prompt, another keeps getting a token per step."""
    long_prompt = _prompt(loaded.vocab_size, 12 * BLOCK, seed=7)

    async def scenario():
        engine = _engine(loaded, prefill_step_tokens=BLOCK)
        await engine.start()
        try:
            order: list[str] = []
            sid_b = await engine.create_session()
            await engine.append(sid_b, tokens=_prompt(loaded.vocab_size, 5, seed=8))
            stream_b = engine.generate(sid_b, max_tokens=400)
            first_b = await stream_b.__anext__()  # B is decoding before A arrives
            assert isinstance(first_b, TokenEvent)

            async def watch_b():
                async for event in stream_b:
                    if isinstance(event, TokenEvent):
                        order.append("b")

            watcher = asyncio.create_task(watch_b())
            sid_a = await engine.create_session()
            await engine.append(sid_a, tokens=long_prompt)
            async for event in engine.generate(sid_a, max_tokens=1):
                if isinstance(event, TokenEvent):
                    order.append("a")
            await stream_b.aclose()
            await watcher
            return order
        finally:
            await engine.stop()

    order = asyncio.run(scenario())
    # A's prompt takes 12 pieces; B decodes one token in each of those steps.
    assert order.index("a") >= 10, order[:20]


def test_cancel_and_close_mid_batch_leave_the_others_exact(loaded):
    prompts = _prompts(loaded, 4)

    async def scenario():
        solo = _engine(loaded)
        await solo.start()
        try:
            alone = [await _run(solo, p) for p in prompts]
        finally:
            await solo.stop()
        engine = _engine(loaded)
        await engine.start()
        try:
            sids = await _sessions(engine, prompts)
            streams = [engine.generate(sid, max_tokens=GENERATE) for sid in sids]

            async def cut(i: int, after: int, how: str):
                n = 0
                events = []
                async for event in streams[i]:
                    events.append(event)
                    if isinstance(event, TokenEvent):
                        n += 1
                        if n == after:
                            if how == "cancel":
                                await engine.cancel(sids[i])
                            elif how == "close":
                                asyncio.ensure_future(engine.close_session(sids[i]))
                            else:  # the stream's reader goes away
                                await streams[i].aclose()
                                return events
                return events

            results = await asyncio.gather(
                _drain(streams[0]), cut(1, 7, "cancel"), cut(2, 13, "close"), cut(3, 3, "drop")
            )
            return alone, results
        finally:
            await engine.stop()

    alone, results = asyncio.run(scenario())
    assert results[0][-1].token_ids == alone[0].token_ids
    for i in (1, 2, 3):
        tokens = [e.token_id for e in results[i] if isinstance(e, TokenEvent)]
        assert tokens == alone[i].token_ids[: len(tokens)]
        assert len(tokens) < GENERATE
    assert results[1][-1].stop_reason == results[2][-1].stop_reason == "cancelled"


def test_a_failing_sampler_ends_only_its_own_turn(loaded, monkeypatch):
    from kakeya_mlx import decode

    prompts = _prompts(loaded, 3)
    real_pick = decode.Generation._pick

    def pick(self, logits):
        if self.session.id == doomed[0] and len(self.generated) == 9:
            raise RuntimeError("sampler broke")
        return real_pick(self, logits)

    doomed: list[str] = []

    async def scenario():
        solo = _engine(loaded)
        await solo.start()
        try:
            alone = [await _run(solo, p) for p in prompts]
        finally:
            await solo.stop()
        monkeypatch.setattr(decode.Generation, "_pick", pick)
        engine = _engine(loaded)
        await engine.start()
        try:
            sids = await _sessions(engine, prompts)
            doomed.append(sids[1])
            dones = await asyncio.gather(*(_drain(engine.generate(s, max_tokens=GENERATE)) for s in sids))
            # The failed session keeps its history and generates again, exactly.
            monkeypatch.setattr(decode.Generation, "_pick", real_pick)
            history = engine.session_history(sids[1])
            again = (await _drain(engine.generate(sids[1], max_tokens=5)))[-1]
            fresh = await _run(engine, history, max_tokens=5)
            return alone, [d[-1] for d in dones], again, fresh
        finally:
            await engine.stop()

    alone, dones, again, fresh = asyncio.run(scenario())
    assert dones[1].stop_reason == "error" and "sampler broke" in dones[1].error_message
    assert dones[0].token_ids == alone[0].token_ids
    assert dones[2].token_ids == alone[2].token_ids
    assert again.token_ids == fresh.token_ids


def test_seeded_sampling_is_the_same_batched_or_alone(loaded):
    prompts = _prompts(loaded, 3)
    sampling = SamplingParams(temperature=0.9, top_p=0.95, seed=1234)

    async def scenario():
        out = {}
        for size in (1, 8):
            engine = _engine(loaded, decode_batch_size=size)
            await engine.start()
            try:
                sids = await _sessions(engine, prompts)
                dones = await asyncio.gather(
                    *(_drain(engine.generate(s, max_tokens=40, sampling=sampling)) for s in sids)
                )
                out[size] = [d[-1].token_ids for d in dones]
            finally:
                await engine.stop()
        return out

    out = asyncio.run(scenario())
    assert out[1] == out[8]


def test_truncated_events_follow_each_sessions_own_window(loaded):
    async def scenario():
        engine = _engine(loaded)
        await engine.start()
        try:
            sids = await _sessions(engine, _prompts(loaded, 3))
            runs = await asyncio.gather(*(_drain(engine.generate(s, max_tokens=GENERATE)) for s in sids))
            infos = [await engine.session_info(s) for s in sids]
            return runs, infos
        finally:
            await engine.stop()

    runs, infos = asyncio.run(scenario())
    for events, info in zip(runs, infos):
        truncated = [e for e in events if isinstance(e, TruncatedEvent)]
        assert sum(e.evicted for e in truncated) == info["evicted_tokens"]
        assert truncated and truncated[-1].total_evicted == info["evicted_tokens"]


def _variants():
    from tools.make_test_model import VARIANTS

    return sorted(VARIANTS)


@pytest.mark.parametrize("variant", _variants())
def test_every_model_variant_batches_exactly(make_model, variant):
    """Each RoPE kind takes one offset per row: two sessions of different lengths, batched and alone."""
    loaded = dataclasses.replace(load_model(make_model(variant)), eos_token_ids=[])
    prompts = [_prompt(loaded.vocab_size, 13, seed=71), _prompt(loaded.vocab_size, 58, seed=72)]

    async def scenario():
        engine = _engine(loaded)
        await engine.start()
        try:
            alone = [await _run(engine, p, max_tokens=40) for p in prompts]
            sids = await _sessions(engine, prompts)
            together = await asyncio.gather(*(_drain(engine.generate(s, max_tokens=40)) for s in sids))
            return alone, [t[-1] for t in together], engine.scheduler_counters()["largest_batch"]
        finally:
            await engine.stop()

    alone, together, largest = asyncio.run(scenario())
    assert largest == 2
    for a, b in zip(alone, together):
        assert b.token_ids == a.token_ids
