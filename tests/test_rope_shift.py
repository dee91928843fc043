"""Re-rotating cached keys after eviction is exact for every RoPE kind the cache serves.

For each test-model variant, keys are put at positions by the model's own RoPE
module; the cache evicts e of them and turns the survivors down by e. The
attention output over that cache must match the output over keys put directly at
the shifted positions ("rebuilt from scratch").
Tolerances: 1e-4 (absolute, on attention outputs of unit-scale inputs) with
float32 keys; 3e-2 when keys are stored in bfloat16.
"""

import mlx.core as mx
import pytest

from kakeya_mlx.cache import CacheShape, SinkWindowCache
from kakeya_mlx.loader import load_model
from kakeya_mlx.rope import layer_shifters
from tools.make_test_model import VARIANTS


def _attention(q, k, v):
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=q.shape[-1] ** -0.5)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("dtype,tol", [(mx.float32, 1e-4), (mx.bfloat16, 3e-2)])
def test_evicted_cache_attends_like_one_rebuilt_at_shifted_positions(make_model, variant, dtype, tol):
    loaded = load_model(make_model(variant))
    rope = loaded.model.layers[0].self_attn.rope
    spec = layer_shifters(loaded.model)[0]
    H, D = loaded.num_kv_heads, loaded.head_dim
    sink, window, block = 4, 24, 8
    n = sink + window + block  # one block past the window: exactly `block` get evicted
    mx.random.seed(7)
    raw_k = mx.random.normal((1, H, n, D))
    values = mx.random.normal((1, H, n, D)).astype(dtype)
    query = mx.random.normal((1, H, 1, D))

    cache = SinkWindowCache(CacheShape(sink, window, block), [spec])
    layer = cache.layers[0]
    layer.update_and_fetch(rope(raw_k, offset=0).astype(dtype), values)
    cache.token_ids = list(range(n))
    cache.committed = n - block
    assert cache.commit_block() == block
    kept = layer.offset
    assert kept == sink + window

    survivors = mx.concatenate([raw_k[..., :sink, :], raw_k[..., sink + block :, :]], axis=2)
    rebuilt_k = rope(survivors, offset=0).astype(dtype)
    rebuilt_v = mx.concatenate([values[..., :sink, :], values[..., sink + block :, :]], axis=2)
    q = rope(query, offset=kept).astype(dtype)

    ours = _attention(q, layer.keys[..., :kept, :], layer.values[..., :kept, :])
    reference = _attention(q, rebuilt_k, rebuilt_v)
    diff = mx.abs(ours.astype(mx.float32) - reference.astype(mx.float32)).max().item()
    assert diff < tol, f"{variant} {dtype}: attention differs by {diff}"
    # The sink never moves.
    assert mx.array_equal(layer.keys[..., :sink, :], rebuilt_k[..., :sink, :]).item()


@pytest.mark.parametrize("variant", ["llama", "llama-yarn"])
def test_bf16_keys_do_not_drift_over_many_evictions(make_model, variant):
    """A window key is re-rotated at every eviction it survives. Rounding each turn
    to bfloat16 would add up (about 10% of the key scale after 64 turns of 2); the
    cache keeps keys in float32 and rounds once when attention reads them, so after
    64 evictions the keys it serves are within one bfloat16 rounding of keys put
    directly at their final positions."""
    loaded = load_model(make_model(variant))
    rope = loaded.model.layers[0].self_attn.rope
    spec = layer_shifters(loaded.model)[0]
    H, D = loaded.num_kv_heads, loaded.head_dim
    sink, window, block, evictions = 2, 256, 2, 64
    n = sink + window + block
    mx.random.seed(3)
    raw = mx.random.normal((1, H, n, D))
    values = mx.zeros((1, H, n, D), mx.bfloat16)
    cache = SinkWindowCache(CacheShape(sink, window, block), [spec])
    layer = cache.layers[0]
    layer.update_and_fetch(rope(raw, offset=0).astype(mx.bfloat16), values)
    cache.token_ids = list(range(n))
    cache.committed = n - block
    for _ in range(evictions):  # turn the same survivors down again and again
        assert cache.commit_block() == block
        cache.token_ids += [0] * block
        layer.offset += block
        cache.committed = cache.length - block
    served, _ = layer.update_and_fetch(mx.zeros((1, H, 0, D), mx.bfloat16), values[..., :0, :])
    survivors = raw[..., sink + evictions * block :, :]
    direct = rope(survivors, offset=sink)
    got = served[..., sink : sink + direct.shape[2], :].astype(mx.float32)
    assert served.dtype == mx.bfloat16
    error = mx.abs(got - direct).max().item()
    scale = mx.abs(direct).max().item()
    # One rounding to bfloat16 (8 significant bits) is at most 2**-8 of the scale.
    assert error / scale <= 2**-8, f"drift {error / scale:.5f} of the key scale after {evictions} evictions"


def test_positions_stay_bounded_past_the_trained_range(make_model):
    """A history far longer than max_position_embeddings runs with bounded positions."""
    import asyncio

    from kakeya_mlx.engine import Engine, EngineConfig

    loaded = load_model(make_model("llama", max_position_embeddings=64))
    assert loaded.max_position_embeddings == 64

    async def run():
        engine = Engine(loaded, EngineConfig(sink=4, window=36, block=8))
        await engine.start()
        try:
            sid = await engine.create_session()
            ids = [(i * 37) % (loaded.vocab_size - 10) + 5 for i in range(300)]
            await engine.append(sid, tokens=ids)
            events = [e async for e in engine.generate(sid, max_tokens=20)]
            info = await engine.session_info(sid)
        finally:
            await engine.stop()
        return events, info

    events, info = asyncio.run(run())
    assert info["history_length"] == 320 > 4 * loaded.max_position_embeddings
    assert info["positions"]["last"] < info["positions"]["bound"] == 48 <= 64
    assert info["evicted_tokens"] == 320 - info["cache_length"]
    assert events[-1].stop_reason in ("max_tokens", "eos")
    assert any(e.__class__.__name__ == "TruncatedEvent" for e in events)
