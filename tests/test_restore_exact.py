"""A session saved to the store and restored continues byte-identically.

Histories cross the window several times before the save, and the continuation
crosses it again. The reference is the same session never having left memory;
restores happen into the same engine (as a fork) and into a fresh Engine on a
freshly loaded model (as after a restart), under the session's own id. Saved
states cover: after a generate (tail mid-block), after a stop string cut a turn
back, with appended tokens not yet processed, exactly at a block boundary (a
whole tail not yet committed), and mid-block after a prefill.
"""

import dataclasses
import random

import mlx.core as mx
import pytest

from kakeya_mlx.engine import Engine, EngineConfig
from kakeya_mlx.errors import BusyError, InvalidArgumentError, NotFoundError, StoreError
from kakeya_mlx.loader import load_model
from kakeya_mlx.store import SessionStore

SINK, WINDOW, BLOCK = 4, 20, 8
SPAN = SINK + WINDOW
CONFIG = dict(sink=SINK, window=WINDOW, block=BLOCK)
# Each continuation turn appends then generates past a whole window.
CONTINUATION = [(7, 20), (3, 13)]


def _ids(vocab: int, n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, vocab) for _ in range(n)]


async def _build(engine: Engine, kind: str) -> str:
    """A session in the state `kind` names, its history past 4 x (sink + window)."""
    vocab = engine.loaded.vocab_size
    sid = await engine.create_session()
    if kind == "after-generate":
        await engine.append(sid, tokens=_ids(vocab, 4 * SPAN + 3, 1))
        [e async for e in engine.generate(sid, max_tokens=2 * SPAN + 2)]
    elif kind == "pending":
        await engine.append(sid, tokens=_ids(vocab, 4 * SPAN + 1, 2))
        [e async for e in engine.generate(sid, max_tokens=9)]
        await engine.append(sid, tokens=_ids(vocab, BLOCK + 3, 3))  # not yet run through the model
    elif kind == "block-boundary":
        await engine.append(sid, tokens=_ids(vocab, 5 * SPAN, 4))
        await engine.prefill(sid)
    elif kind == "after-stop":
        # A stop string cuts the generated tokens back, leaving no logits or a block's boundary logits.
        prompt = _ids(vocab, 4 * SPAN + 3, 6)
        probe = await engine.create_session()
        await engine.append(probe, tokens=prompt)
        text = [e async for e in engine.generate(probe, max_tokens=30)][-1].text
        await engine.close_session(probe)
        await engine.append(sid, tokens=prompt)
        done = [e async for e in engine.generate(sid, max_tokens=30, stop=[text[20:23]])][-1]
        assert done.stop_reason == "stop_sequence"
    elif kind == "mid-block":
        await engine.append(sid, tokens=_ids(vocab, 5 * SPAN + BLOCK // 2 + 1, 5))
        await engine.prefill(sid)
    session = engine._sessions[sid]
    assert session.cache.evicted >= 3 * SPAN
    if kind != "after-stop":  # a cut may leave the last kept token to run again
        assert (session.pending > 0) == (kind == "pending")
    if kind in ("mid-block", "after-generate"):
        assert session.cache.tail > 0, "the state must be saved mid-block"
    if kind == "block-boundary":
        assert session.cache.tail == BLOCK  # a whole tail, committed when the next token goes in
    return sid


async def _continue(engine: Engine, sid: str) -> list[list[int]]:
    vocab = engine.loaded.vocab_size
    evicted_before = engine._sessions[sid].cache.evicted
    streams = []
    for i, (appended, generated) in enumerate(CONTINUATION):
        await engine.append(sid, tokens=_ids(vocab, appended, 100 + i))
        done = [e async for e in engine.generate(sid, max_tokens=generated)][-1]
        assert done.stop_reason == "max_tokens", done
        streams.append(done.token_ids)
    assert engine._sessions[sid].cache.evicted - evicted_before >= SPAN, "the continuation must cross the window"
    return streams


def _load_without_eos(path):
    # Continuations must run their full length to cross the window again.
    return dataclasses.replace(load_model(path), eos_token_ids=[])


def _stable(info: dict) -> dict:
    # Buffers are allocated afresh on restore, so kv_bytes may start smaller; last use changes.
    return {k: v for k, v in info.items() if k not in ("kv_bytes", "last_used_at")}


def _snapshot(engine: Engine, sid: str) -> tuple[dict, dict]:
    meta, arrays = engine._sessions[sid].state()
    meta = {k: v for k, v in meta.items() if k in ("groups",)}
    return meta, arrays


def _assert_same_state(a: tuple[dict, dict], b: tuple[dict, dict]) -> None:
    assert a[0] == b[0]
    assert sorted(a[1]) == sorted(b[1])
    for name in a[1]:
        assert a[1][name].dtype == b[1][name].dtype, name
        assert mx.array_equal(a[1][name], b[1][name]).item(), f"{name} differs"


@pytest.fixture(scope="module", params=[("qwen3", "float32"), ("llama-traditional", "bfloat16")], ids=lambda p: "-".join(p))
def model_dir(request, make_model):
    variant, dtype = request.param
    return make_model(variant, dtype=dtype)


@pytest.mark.parametrize("recompute", [False, True], ids=["promote-tail", "recompute-blocks"])
@pytest.mark.parametrize("kind", ["after-generate", "after-stop", "pending", "block-boundary", "mid-block"])
async def test_restored_session_continues_byte_identically(model_dir, tmp_path, kind, recompute):
    config = EngineConfig(**CONFIG, recompute_blocks=recompute, max_new_tokens=512)
    engine = Engine(_load_without_eos(model_dir), config, store=SessionStore(tmp_path / "store"))
    await engine.start()
    try:
        sid = await _build(engine, kind)
        saved_history = engine.session_history(sid)
        saved_info = _stable(await engine.session_info(sid))
        await engine.save_session(sid, extra={"kind": kind})
        await engine.save_session(sid, name="named-copy")

        reference = await _continue(engine, sid)
        reference_state = _snapshot(engine, sid)

        fork = await engine.restore_session("named-copy", fork=True)
        assert fork.session_id != sid and engine.session_history(fork.session_id) == saved_history
        assert await _continue(engine, fork.session_id) == reference
        _assert_same_state(_snapshot(engine, fork.session_id), reference_state)
    finally:
        await engine.stop()

    # As after a restart: a fresh engine on a freshly loaded model, the session under its own id.
    fresh = Engine(_load_without_eos(model_dir), config, store=SessionStore(tmp_path / "store"))
    await fresh.start()
    try:
        restored = await fresh.restore_session(sid)
        assert restored.session_id == sid and restored.extra == {"kind": kind}
        assert _stable(await fresh.session_info(sid)) == saved_info
        assert fresh.session_history(sid) == saved_history
        assert await _continue(fresh, sid) == reference
        _assert_same_state(_snapshot(fresh, sid), reference_state)
    finally:
        await fresh.stop()


@pytest.fixture
async def engine(loaded_qwen3, tmp_path):
    engine = Engine(loaded_qwen3, EngineConfig(**CONFIG), store=SessionStore(tmp_path / "store"))
    await engine.start()
    yield engine
    await engine.stop()


async def test_an_empty_session_round_trips(engine):
    sid = await engine.create_session()
    await engine.save_session(sid, name="empty")
    fork = (await engine.restore_session("empty", fork=True)).session_id
    assert engine.session_history(fork) == []
    await engine.append(fork, text="Hello")
    await engine.append(sid, text="Hello")
    a = [e async for e in engine.generate(sid, max_tokens=5)][-1].token_ids
    b = [e async for e in engine.generate(fork, max_tokens=5)][-1].token_ids
    assert a == b


async def test_a_running_turn_refuses_save(engine):
    sid = await engine.create_session()
    await engine.append(sid, tokens=_ids(engine.loaded.vocab_size, 30, 9))
    stream = engine.generate(sid, max_tokens=50)
    with pytest.raises(BusyError, match=sid):
        await engine.save_session(sid)
    await stream.aclose()
    assert sid not in engine.store
    await engine.save_session(sid)  # once the turn has ended
    assert not (await engine.session_info(sid))["generating"]
    assert [s.name for s in engine.store.sessions()] == [sid]


async def test_restore_refuses_an_id_in_memory_and_unknown_names(engine):
    sid = await engine.create_session()
    await engine.append(sid, text="The weather today")
    await engine.save_session(sid)
    with pytest.raises(InvalidArgumentError, match="in memory already"):
        await engine.restore_session(sid)
    await engine.close_session(sid)
    assert (await engine.restore_session(sid)).session_id == sid
    with pytest.raises(NotFoundError, match="no-such"):
        await engine.restore_session("no-such")


async def test_bad_names_and_extra_are_refused_before_anything_is_written(engine):
    sid = await engine.create_session()
    for name in ("../escape", ".hidden", "", "a/b", "x" * 129):
        with pytest.raises(InvalidArgumentError, match="not valid"):
            await engine.save_session(sid, name=name)
    with pytest.raises(InvalidArgumentError, match="extra"):
        await engine.save_session(sid, extra={"not json": object()})
    with pytest.raises(NotFoundError):
        await engine.save_session("nope")
    assert engine.store.sessions() == []


async def test_an_engine_without_a_store_says_so(loaded_qwen3):
    engine = Engine(loaded_qwen3, EngineConfig(**CONFIG))
    await engine.start()
    try:
        sid = await engine.create_session()
        with pytest.raises(StoreError, match="no session store"):
            await engine.save_session(sid)
    finally:
        await engine.stop()


async def test_a_chat_and_its_session_settings_continue_after_a_restart(model_dir, tmp_path):
    """Chat state (where the open assistant turn began) and per-session decoding choices are saved too."""
    first = [{"role": "user", "content": "What is the capital of France?"}]
    then = [{"role": "user", "content": "And how many days are in a week?"}]
    config = EngineConfig(**CONFIG)
    store_dir = tmp_path / "store"
    engine = Engine(_load_without_eos(model_dir), config, store=SessionStore(store_dir))
    await engine.start()
    try:
        sid = await engine.create_session(speculative="prompt_lookup", num_draft_tokens=3)
        await engine.append(sid, messages=first)
        [e async for e in engine.generate(sid, max_tokens=2 * SPAN)]
        await engine.save_session(sid)
        await engine.append(sid, messages=then)
        reference = [e async for e in engine.generate(sid, max_tokens=SPAN)][-1].token_ids
        reference_history = engine.session_history(sid)
    finally:
        await engine.stop()

    fresh = Engine(_load_without_eos(model_dir), config, store=SessionStore(store_dir))
    await fresh.start()
    try:
        await fresh.restore_session(sid)
        session = fresh._sessions[sid]
        assert (session.speculative, session.num_draft_tokens) == ("prompt_lookup", 3)
        await fresh.append(sid, messages=then)
        assert [e async for e in fresh.generate(sid, max_tokens=SPAN)][-1].token_ids == reference
        assert fresh.session_history(sid) == reference_history
    finally:
        await fresh.stop()
