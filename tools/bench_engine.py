"""Engine benchmark: ours vs mlx-lm on the same model, dtype, prompt and machine, in one run.

    python -m tools.bench_engine [--model smollm2] [--out results/bench_engine.json]

Prints ratios and writes JSON:
- decode tokens/s: our engine vs `mlx_lm.stream_generate` (target: ratio >= 0.95);
- per-turn cost (append 32 tokens + generate 32) at histories of 1x, 4x and 16x
  (sink + window): ours stays flat (16x / 1x <= 1.15), beside mlx-lm carrying the
  same growing history in its prompt cache;
- live KV bytes per session at each history length (flat for ours once the window is full).
Timings are medians over repeats, taken alternately so machine noise hits both sides.
"""

import argparse
import asyncio
import dataclasses
import statistics
import sys
import time

import mlx.core as mx
from mlx_lm.generate import stream_generate
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.tokenizer_utils import load as load_mlx_lm_tokenizer

from kakeya_mlx import platform
from kakeya_mlx.engine import Engine, EngineConfig
from kakeya_mlx.loader import load_model
from tools.report import write_report

TURN_APPEND = 32
TURN_GENERATE = 32


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def filler_tokens(tokenizer, n: int, salt: int) -> list[int]:
    # Each sentence is about a dozen tokens; encode only as many as needed.
    text = " ".join(f"note {salt}.{i}: the window slides and the sink stays." for i in range(n // 8 + 1))
    ids = tokenizer.encode(text, add_special_tokens=False)
    while len(ids) < n:
        ids += ids
    return ids[:n]


async def our_decode_tps(engine: Engine, prompt: list[int], n: int) -> float:
    sid = await engine.create_session()
    await engine.append(sid, tokens=prompt)
    done = [e async for e in engine.generate(sid, max_tokens=n)][-1]
    await engine.close_session(sid)
    assert done.generated_tokens == n, done
    return done.decode_tokens_per_s


def mlx_lm_decode_tps(loaded, reference_tokenizer, prompt: list[int], n: int) -> float:
    last = None
    for last in stream_generate(loaded.model, reference_tokenizer, prompt, max_tokens=n):
        pass
    return last.generation_tps


async def our_turn_costs(engine: Engine, tokenizer, histories: list[int], repeats: int) -> dict:
    sid = await engine.create_session()
    out = {}
    length = 0
    for target in histories:
        if target > length:
            await engine.append(sid, tokens=filler_tokens(tokenizer, target - length, length))
            await engine.prefill(sid)
            length = target
        times = []
        for r in range(repeats):
            t0 = time.perf_counter()
            await engine.append(sid, tokens=filler_tokens(tokenizer, TURN_APPEND, 10_000 + r))
            done = [e async for e in engine.generate(sid, max_tokens=TURN_GENERATE)][-1]
            times.append(time.perf_counter() - t0)
            assert done.generated_tokens == TURN_GENERATE
        length = (await engine.session_info(sid))["history_length"]
        out[target] = {"turn_s": statistics.median(times), "kv_bytes": engine.session_kv_bytes(sid)}
    await engine.close_session(sid)
    return out


def mlx_lm_turn_costs(loaded, tokenizer, reference_tokenizer, histories: list[int], repeats: int) -> dict:
    cache = make_prompt_cache(loaded.model)
    out = {}
    length = 0
    for target in histories:
        if target > length:
            ids = filler_tokens(tokenizer, target - length, length)
            for i in range(0, len(ids), 512):
                loaded.model(mx.array(ids[i : i + 512])[None], cache=cache)
                mx.eval([c.state for c in cache])
            length = target
        times = []
        for r in range(repeats):
            t0 = time.perf_counter()
            prompt = filler_tokens(tokenizer, TURN_APPEND, 10_000 + r)
            n = 0
            for _ in stream_generate(
                loaded.model, reference_tokenizer, prompt, max_tokens=TURN_GENERATE, prompt_cache=cache
            ):
                n += 1
            times.append(time.perf_counter() - t0)
        out[target] = {"turn_s": statistics.median(times), "kv_bytes": sum(c.nbytes for c in cache)}
    return out


async def main_async(args) -> dict:
    log(f"loading {args.model} ...")
    loaded = load_model(args.model, dtype=args.dtype, progress=log)
    # Benchmarks need fixed lengths: no early stop on EOS.
    loaded = dataclasses.replace(loaded, eos_token_ids=[])
    tok = loaded.tokenizer
    # mlx-lm runs with its own tokenizer wrapper (transformers underneath), as its users run it.
    reference_tok = load_mlx_lm_tokenizer(loaded.path)
    config = EngineConfig(sink=args.sink, window=args.window, block=args.block, max_append_tokens=1 << 20)
    engine = Engine(loaded, config)
    await engine.start()
    span = engine.shape.sink + engine.shape.window
    log(f"model {loaded.name} ({loaded.dtype}) on {platform.backend()}; sink {engine.shape.sink}, "
        f"window {engine.shape.window}, block {engine.shape.block}")

    prompt = filler_tokens(tok, args.prompt_tokens, 1)
    ours, theirs = [], []
    await our_decode_tps(engine, prompt, 8)  # warm-up both paths
    mlx_lm_decode_tps(loaded, reference_tok, prompt, 8)
    for i in range(args.repeats):
        ours.append(await our_decode_tps(engine, prompt, args.decode_tokens))
        theirs.append(mlx_lm_decode_tps(loaded, reference_tok, prompt, args.decode_tokens))
        log(f"decode run {i + 1}: ours {ours[-1]:.2f} tok/s, mlx-lm {theirs[-1]:.2f} tok/s")
    decode = {
        "ours_tokens_per_s": statistics.median(ours),
        "mlx_lm_tokens_per_s": statistics.median(theirs),
    }
    decode["ratio"] = decode["ours_tokens_per_s"] / decode["mlx_lm_tokens_per_s"]

    histories = [m * span for m in args.multiples]
    log(f"per-turn cost at histories {histories} (ours) ...")
    turn_ours = await our_turn_costs(engine, tok, histories, args.turn_repeats)
    log("per-turn cost (mlx-lm with its prompt cache) ...")
    turn_theirs = mlx_lm_turn_costs(loaded, tok, reference_tok, histories, args.turn_repeats)
    await engine.stop()

    first, last = histories[0], histories[-1]
    turns = {
        "histories": histories,
        "ours": {str(h): v for h, v in turn_ours.items()},
        "mlx_lm": {str(h): v for h, v in turn_theirs.items()},
        "ours_last_over_first": turn_ours[last]["turn_s"] / turn_ours[first]["turn_s"],
        "mlx_lm_last_over_first": turn_theirs[last]["turn_s"] / turn_theirs[first]["turn_s"],
    }
    kv_flat = len({turn_ours[h]["kv_bytes"] for h in histories}) == 1
    return {
        "model": loaded.name,
        "dtype": loaded.dtype,
        "cache": {"sink": engine.shape.sink, "window": engine.shape.window, "block": engine.shape.block},
        "decode": decode,
        "turn": turns,
        "kv_bytes_flat_once_window_full": kv_flat,
        "targets": {
            "decode_ratio_min": 0.95,
            "turn_16x_over_1x_max": 1.15,
            "decode_ratio_met": decode["ratio"] >= 0.95,
            "turn_flat_met": turns["ours_last_over_first"] <= 1.15,
        },
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="model name, path or hub id (default: the bundled smollm2)")
    p.add_argument("--dtype", default=None, help="cast float weights (default: the model's own)")
    p.add_argument("--sink", type=int, default=4)
    p.add_argument("--window", type=int, default=188, help="window tokens (default 188: sink+window = 192)")
    p.add_argument("--block", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="decode measurements per side")
    p.add_argument("--turn-repeats", type=int, default=3, help="turns timed per history length")
    p.add_argument("--multiples", type=int, nargs="+", default=[1, 4, 16], help="history lengths in units of sink+window")
    p.add_argument("--out", default="results/bench_engine.json", help="where to write the JSON results")
    args = p.parse_args(argv)
    result = asyncio.run(main_async(args))
    out = write_report(result, args.out)
    d, t = result["decode"], result["turn"]
    print(f"model: {result['model']} ({result['dtype']}, {platform.backend()})")
    print(f"decode tokens/s: ours {d['ours_tokens_per_s']:.2f} vs mlx-lm {d['mlx_lm_tokens_per_s']:.2f} "
          f"-> ratio {d['ratio']:.3f} (target >= 0.95)")
    for h in t["histories"]:
        o, m = t["ours"][str(h)], t["mlx_lm"][str(h)]
        print(f"turn at history {h:>6}: ours {o['turn_s']:.3f} s ({o['kv_bytes'] / 1e6:.2f} MB KV), "
              f"mlx-lm {m['turn_s']:.3f} s ({m['kv_bytes'] / 1e6:.2f} MB KV)")
    print(f"turn cost {t['histories'][-1]}/{t['histories'][0]}: ours {t['ours_last_over_first']:.3f} "
          f"(target <= 1.15), mlx-lm {t['mlx_lm_last_over_first']:.3f}")
    print(f"live KV bytes flat once the window is full: {result['kv_bytes_flat_once_window_full']}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
