"""The engine's session API on a real (tiny, seeded) Qwen3 model and its real tokenizer."""

import asyncio
import dataclasses
import subprocess
import sys
import textwrap

import pytest

from kakeya_mlx import platform
from kakeya_mlx.engine import Engine, EngineConfig
from kakeya_mlx.errors import BusyError, InvalidArgumentError, NotFoundError
from kakeya_mlx.events import DoneEvent, TokenEvent, TruncatedEvent
from kakeya_mlx.loader import load_model
from kakeya_mlx.sampling import SamplingParams

CONFIG = EngineConfig(sink=4, window=24, block=8, max_append_tokens=512, max_new_tokens=200)
PROMPT = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def loaded(make_model):
    return load_model(make_model("qwen3"))


@pytest.fixture
async def engine(loaded):
    engine = Engine(loaded, CONFIG)
    await engine.start()
    yield engine
    await engine.stop()


async def _events(engine, sid, **kw):
    return [e async for e in engine.generate(sid, **kw)]


async def _session_with(engine, text=PROMPT):
    sid = await engine.create_session()
    await engine.append(sid, text=text)
    return sid


def _stable(info: dict) -> dict:
    return {k: v for k, v in info.items() if k != "last_used_at"}


async def test_generate_streams_tokens_then_done_with_counts_and_timings(engine, loaded):
    sid = await _session_with(engine)
    prompt_len = (await engine.session_info(sid))["history_length"]
    events = await _events(engine, sid, max_tokens=12)
    done = events[-1]
    tokens = [e for e in events if isinstance(e, TokenEvent)]
    assert isinstance(done, DoneEvent) and all(not isinstance(e, DoneEvent) for e in events[:-1])
    assert done.stop_reason in ("max_tokens", "eos")
    assert done.generated_tokens == len(tokens) == len(done.token_ids)
    assert [t.token_id for t in tokens] == done.token_ids
    assert "".join(t.text for t in tokens) == done.text == loaded.tokenizer.decode(
        [t for t in done.token_ids if t not in engine.eos_token_ids], skip_special_tokens=True
    )
    assert done.prompt_tokens == prompt_len and done.cached_tokens == 0
    assert 0 < done.ttft_s <= done.total_s
    assert done.prefill_tokens_per_s > 0
    info = await engine.session_info(sid)
    assert info["history_length"] == prompt_len + done.generated_tokens
    assert info["pending_tokens"] == 0 and not info["generating"]

    # The next turn costs only its new tokens.
    await engine.append(sid, text=" And then?")
    again = (await _events(engine, sid, max_tokens=3))[-1]
    assert again.cached_tokens == info["history_length"]
    assert again.prompt_tokens == (await engine.session_info(sid))["history_length"] - info["history_length"] - again.generated_tokens


async def test_max_tokens_is_honoured(engine, loaded):
    eng = Engine(dataclasses.replace(loaded, eos_token_ids=[]), CONFIG)
    await eng.start()
    try:
        sid = await _session_with(eng)
        done = (await _events(eng, sid, max_tokens=7))[-1]
    finally:
        await eng.stop()
    assert done.stop_reason == "max_tokens" and done.generated_tokens == 7


async def test_stops_on_an_eos_id_from_the_model_config(loaded):
    """Make one of the tokens greedy decoding produces an EOS id: generation stops right there."""
    plain = Engine(dataclasses.replace(loaded, eos_token_ids=[]), CONFIG)
    await plain.start()
    sid = await _session_with(plain)
    free_run = (await _events(plain, sid, max_tokens=20))[-1].token_ids
    await plain.stop()
    eos = free_run[5]
    first = free_run.index(eos)
    eng = Engine(dataclasses.replace(loaded, eos_token_ids=[eos]), CONFIG)
    await eng.start()
    try:
        sid = await _session_with(eng)
        done = (await _events(eng, sid, max_tokens=20))[-1]
    finally:
        await eng.stop()
    assert done.stop_reason == "eos"
    assert done.token_ids == free_run[: first + 1]


async def test_stop_string_ends_generation_and_is_not_emitted(engine):
    sid = await _session_with(engine)
    free = (await _events(engine, sid, max_tokens=40))[-1]
    text = free.text
    assert len(text) > 12, "the test model should produce some text"
    stop = text[6:9]
    sid2 = await _session_with(engine)
    events = await _events(engine, sid2, max_tokens=40, stop=[stop, "\x01never"])
    done = events[-1]
    assert done.stop_reason == "stop_sequence"
    streamed = "".join(e.text for e in events if isinstance(e, TokenEvent))
    assert streamed == done.text == text[: text.index(stop)]


async def test_seeded_sampling_is_reproducible_and_seed_dependent(engine):
    params = dict(temperature=1.0, top_p=0.95, top_k=50, min_p=0.01, repetition_penalty=1.1)
    runs = []
    for seed in (1, 1, 2):
        sid = await _session_with(engine)
        done = (await _events(engine, sid, max_tokens=16, sampling=SamplingParams(seed=seed, **params)))[-1]
        runs.append(done.token_ids)
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


async def test_repetition_penalty_changes_greedy_choice(engine):
    outs = []
    for penalty in (1.0, 3.0):
        sid = await _session_with(engine)
        outs.append((await _events(engine, sid, max_tokens=24, sampling=SamplingParams(repetition_penalty=penalty)))[-1].token_ids)
    assert outs[0] != outs[1]
    # A strong penalty makes immediate repeats rarer.
    repeats = [sum(a == b for a, b in zip(o, o[1:])) for o in outs]
    assert repeats[1] <= repeats[0]


async def test_cancel_ends_with_cancelled_and_keeps_emitted_tokens(engine):
    sid = await _session_with(engine)
    before = (await engine.session_info(sid))["history_length"]
    seen = []
    async for event in engine.generate(sid, max_tokens=150):
        if isinstance(event, TokenEvent):
            seen.append(event.token_id)
            if len(seen) == 3:
                assert await engine.cancel(sid) is True
        if isinstance(event, DoneEvent):
            done = event
    assert done.stop_reason == "cancelled"
    assert done.token_ids == seen and 3 <= len(seen) < 150
    assert engine.session_history(sid)[before:] == seen
    assert await engine.cancel(sid) is False
    assert (await _events(engine, sid, max_tokens=2))[-1].stop_reason in ("max_tokens", "eos")


async def test_leaving_the_stream_early_frees_the_session_at_once(engine):
    sid = await _session_with(engine)
    stream = engine.generate(sid, max_tokens=150)
    async for event in stream:
        if isinstance(event, TokenEvent):
            break
    await stream.aclose()
    assert not (await engine.session_info(sid))["generating"]
    done = (await _events(engine, sid, max_tokens=2))[-1]
    assert done.stop_reason in ("max_tokens", "eos")


async def test_second_generate_and_append_while_generating_are_busy(engine):
    sid = await _session_with(engine)
    stream = engine.generate(sid, max_tokens=100)
    first = await stream.__anext__()
    with pytest.raises(BusyError):
        engine.generate(sid, max_tokens=5)
    with pytest.raises(BusyError):
        await engine.append(sid, text="more")
    await stream.aclose()
    assert first is not None


async def test_bad_input_is_rejected_and_leaves_the_session_untouched(engine, loaded):
    sid = await _session_with(engine)
    await _events(engine, sid, max_tokens=3)
    before = _stable(await engine.session_info(sid))
    history = engine.session_history(sid)
    vocab = loaded.vocab_size

    appends = [
        dict(tokens=[1, vocab]),
        dict(tokens=[-1]),
        dict(tokens=[]),
        dict(tokens=[1, "2"]),
        dict(tokens=[True]),
        dict(tokens=[1] * (CONFIG.max_append_tokens + 1)),
        dict(text=""),
        dict(),
        dict(text="a", tokens=[1]),
        dict(messages=[]),
        dict(messages=[{"role": "user"}]),
    ]
    for kwargs in appends:
        with pytest.raises(InvalidArgumentError) as info:
            await engine.append(sid, **kwargs)
        assert str(info.value)
    generates = [
        dict(max_tokens=0),
        dict(max_tokens=CONFIG.max_new_tokens + 1),
        dict(max_tokens=2.5),
        dict(sampling=SamplingParams(temperature=-1)),
        dict(sampling=SamplingParams(top_p=0)),
        dict(sampling=SamplingParams(top_k=-1)),
        dict(sampling=SamplingParams(min_p=1.5)),
        dict(sampling=SamplingParams(repetition_penalty=0)),
        dict(sampling=SamplingParams(temperature=float("nan"))),
        dict(stop=[""]),
    ]
    for kwargs in generates:
        with pytest.raises(InvalidArgumentError):
            engine.generate(sid, **kwargs)
    assert _stable(await engine.session_info(sid)) == before
    assert engine.session_history(sid) == history

    for call in (
        lambda: engine.append("nope", text="x"),
        lambda: engine.session_info("nope"),
        lambda: engine.close_session("nope"),
        lambda: engine.cancel("nope"),
    ):
        with pytest.raises(NotFoundError):
            await call()
    with pytest.raises(NotFoundError):
        engine.generate("nope")
    await engine.close_session(sid)
    with pytest.raises(NotFoundError, match=sid):
        await engine.append(sid, text="x")

    empty = await engine.create_session()
    with pytest.raises(InvalidArgumentError, match="empty history"):
        engine.generate(empty, max_tokens=5)


@pytest.mark.skipif(platform.backend() != "cpu", reason="batch exactness is promised on the CPU backend")
async def test_sessions_are_isolated_and_concurrent_streams_match_solo_runs(engine):
    prompts = ["Alpha beta gamma.", "One two three four five.", PROMPT]
    solo = []
    for p in prompts:
        sid = await _session_with(engine, p)
        solo.append((await _events(engine, sid, max_tokens=20))[-1].token_ids)

    async def run(p):
        sid = await _session_with(engine, p)
        return (await _events(engine, sid, max_tokens=20))[-1].token_ids

    together = await asyncio.gather(*(run(p) for p in prompts))
    assert together == solo


async def test_info_reports_live_kv_bytes_flat_once_the_window_is_full(engine, loaded):
    sid = await engine.create_session()
    sizes = []
    for _ in range(12):
        await engine.append(sid, tokens=list(range(10, 20)))
        await engine.prefill(sid)
        info = await engine.session_info(sid)
        session = engine._sessions[sid]
        assert info["kv_bytes"] == sum(a.nbytes for a in session.cache.arrays()) > 0
        assert info["cache_length"] + info["evicted_tokens"] == info["history_length"]
        sizes.append(info["kv_bytes"])
    bound = CONFIG.sink + CONFIG.window + CONFIG.block
    assert sizes[-1] == bound * loaded.kv_bytes_per_token
    full = next(i for i, s in enumerate(sizes) if s == sizes[-1])
    assert all(s == sizes[-1] for s in sizes[full:]) and full < 6
    assert info["evicted_tokens"] > 0 and info["positions"]["last"] < info["positions"]["bound"]


async def test_truncated_events_report_the_window_sliding(engine):
    sid = await engine.create_session()
    await engine.append(sid, tokens=list(range(5, 45)))
    events = await _events(engine, sid, max_tokens=30)
    truncs = [e for e in events if isinstance(e, TruncatedEvent)]
    assert truncs and all(e.evicted > 0 for e in truncs)
    assert truncs[-1].total_evicted == (await engine.session_info(sid))["evicted_tokens"]


async def test_chat_messages_render_with_the_template_and_continue(engine, loaded):
    sid = await engine.create_session()
    first = [{"role": "user", "content": "Hello there"}]
    result = await engine.append(sid, messages=first)
    expected = loaded.tokenizer.apply_chat_template(first, tokenize=False, add_generation_prompt=True)
    assert engine.session_history(sid) == loaded.tokenizer.encode(expected, add_special_tokens=False)
    assert result["appended"] == result["history_length"]
    await _events(engine, sid, max_tokens=4)
    n = len(engine.session_history(sid))
    await engine.append(sid, messages=[{"role": "user", "content": "And again"}])
    added = loaded.tokenizer.decode(engine.session_history(sid)[n:])
    assert "And again" in added and added.rstrip().endswith("assistant")


def test_torch_is_never_imported(make_model):
    script = textwrap.dedent(
        f"""
        import asyncio, sys
        from kakeya_mlx.loader import load_model
        from kakeya_mlx.engine import Engine, EngineConfig

        async def main():
            engine = Engine(load_model({str(make_model("qwen3"))!r}), EngineConfig(block=8))
            await engine.start()
            sid = await engine.create_session()
            await engine.append(sid, text="hello")
            events = [e async for e in engine.generate(sid, max_tokens=3)]
            await engine.stop()
            return events[-1]

        done = asyncio.run(main())
        assert done.generated_tokens >= 1, done
        print("torch" in sys.modules)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


async def test_cancel_during_prefill_keeps_the_history_and_stays_exact(engine, loaded):
    prompt = [(i * 13) % (loaded.vocab_size - 3) + 3 for i in range(500)]
    sid = await engine.create_session()
    await engine.append(sid, tokens=prompt)
    stream = engine.generate(sid, max_tokens=5)
    assert await engine.cancel(sid) is True
    done = [e async for e in stream][-1]
    assert done.stop_reason == "cancelled" and done.generated_tokens == 0
    assert done.prompt_tokens < len(prompt)
    info = await engine.session_info(sid)
    assert info["history_length"] == len(prompt) and info["pending_tokens"] > 0
    # The partly prefilled session continues exactly like a fresh one.
    resumed = (await _events(engine, sid, max_tokens=8))[-1]
    fresh_sid = await engine.create_session()
    await engine.append(fresh_sid, tokens=prompt)
    fresh = (await _events(engine, fresh_sid, max_tokens=8))[-1]
    assert resumed.token_ids == fresh.token_ids
    assert resumed.prompt_tokens == info["pending_tokens"]


async def test_a_stream_dropped_unread_frees_its_session(engine):
    import gc

    sid = await _session_with(engine)
    prompt_len = (await engine.session_info(sid))["history_length"]
    stream = engine.generate(sid, max_tokens=150)
    del stream
    gc.collect()
    for _ in range(2000):
        if not (await engine.session_info(sid))["generating"]:
            break
        await asyncio.sleep(0.005)
    done = (await _events(engine, sid, max_tokens=2))[-1]
    assert done.stop_reason in ("max_tokens", "eos")
    # The dropped turn was cancelled, not run to its 150 tokens.
    assert (await engine.session_info(sid))["history_length"] - done.generated_tokens < prompt_len + 150
