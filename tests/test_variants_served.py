"""Every test-model variant, so every RoPE kind the cache claims, is served end to end.

Each variant is loaded on this thread and served by a real daemon on a real Unix
socket; a generate runs on the engine's compute thread well past the window, and
until the window first slides its tokens are mlx-lm's own greedy tokens. (That no
array is left lazy for the compute thread by the loader is test_loader.py's check:
the engine's start-up probe runs the model on the starting thread, which would
hide it here.)
"""

import dataclasses
import logging

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step

from kakeya_client import AsyncClient
from kakeya_client.events import DoneEvent, TokensEvent, TruncatedEvent
from kakeya_daemon.server import running_daemon
from kakeya_mlx.loader import load_model
from kakeya_mlx.rope import KINDS, layer_shifters
from test_daemon import PROMPT, make_config, sock_dir  # noqa: F401  (fixture)
from tools.make_test_model import VARIANTS

SINK, WINDOW, BLOCK = 4, 24, 8  # make_config's cache
GENERATE = 4 * (SINK + WINDOW)
# The first eviction comes when the first block past sink + window completes; every
# token up to that length is chosen from logits over the whole history.
FIRST_EVICTION_AT = BLOCK * ((SINK + WINDOW) // BLOCK + 1)


def test_the_variants_cover_every_rope_kind_the_cache_claims(make_model):
    kinds = set()
    for variant in VARIANTS:
        spec = layer_shifters(load_model(make_model(variant)).model)[0]
        kinds.add(spec.kind)
        kinds.add("traditional" if spec.traditional else spec.kind)
    assert kinds == {*KINDS, "traditional"}


async def _generate(session, **params) -> list:
    async with session.generate(**params) as stream:
        return [event async for event in stream]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
async def test_variant_generates_across_the_window_through_the_daemon(make_model, sock_dir, variant):
    path = make_model(variant)
    loaded = load_model(path)
    endless = dataclasses.replace(loaded, eos_token_ids=[])  # runs to max_tokens
    async with running_daemon(make_config(path, sock_dir), loaded=endless) as daemon:
        async with AsyncClient(daemon.socket_path) as client:
            session = await client.create_session()
            await session.append(text=PROMPT)
            events = await _generate(session, max_tokens=GENERATE, temperature=0)
            info = await session.info()

    done = events[-1]
    assert isinstance(done, DoneEvent) and done.error is None, done
    assert done.stop_reason == "max_tokens" and done.generated_tokens == GENERATE
    truncations = [e for e in events if isinstance(e, TruncatedEvent)]
    assert truncations[-1].total_evicted == info["evicted_tokens"] >= 3 * (SINK + WINDOW)
    # Only now, after serving (a forward pass here would evaluate lazy arrays on
    # this thread first): until the window slides, the stream is mlx-lm's own.
    prompt_ids = loaded.tokenizer.encode(PROMPT)
    before_eviction = FIRST_EVICTION_AT + 1 - len(prompt_ids)
    reference = [int(t) for t, _ in generate_step(mx.array(prompt_ids), loaded.model, max_tokens=before_eviction)]
    tokens = [t for e in events if isinstance(e, TokensEvent) for t in e.tokens]
    assert tokens[:before_eviction] == reference


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def test_an_internal_error_is_logged_with_its_traceback(make_model, sock_dir):
    """The failure 14.1 was: a lazy RoPE frequency array made on another thread. Made
    lazy again here, the compute thread cannot evaluate it; the generate ends with an
    internal error and the log holds the exception with its traceback."""
    path = make_model("llama3")
    loaded = load_model(path)
    records = _Records()
    logger = logging.getLogger("kakeya.engine")
    logger.addHandler(records)
    try:
        async with running_daemon(make_config(path, sock_dir), loaded=loaded) as daemon:
            for layer in loaded.model.layers:  # lazy, on this thread, once the engine has started
                layer.self_attn.rope._freqs = layer.self_attn.rope._freqs * 1.0
            async with AsyncClient(daemon.socket_path) as client:
                session = await client.create_session()
                await session.append(text=PROMPT)
                done = (await _generate(session, max_tokens=4))[-1]
    finally:
        logger.removeHandler(records)
    assert done.stop_reason == "error" and done.error.code == "internal"
    errors = [r for r in records.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and session.id in errors[0].getMessage()
    exc_type, exc, tb = errors[0].exc_info
    assert exc_type is RuntimeError and "Stream" in str(exc) and tb is not None
