"""Session store benchmark: restoring a saved session vs re-sending the conversation, in one run.

    python -m tools.bench_store [--model smollm2] [--out results/bench_store.json]

For sessions with histories of 1x, 4x and 16x (sink + window): bytes on disk, save
time, restore time, and the time to the first token of the next turn (append
--turn-tokens, then generate) after a restore vs after re-sending the whole
conversation to a fresh session, on the same engine in the same run. Targets:
restore + next turn at least 5x faster than re-prefilling a full window, and flat
in history length (16x / 1x <= 1.15). Restores are timed --repeats times (median);
each re-send once, since it costs a full prefill of the history. The store lives in
a temporary directory.
"""

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path


from kakeya_mlx import platform
from kakeya_mlx.engine import Engine, EngineConfig
from kakeya_mlx.events import TokenEvent
from kakeya_mlx.loader import load_model
from kakeya_mlx.store import SessionStore
from tools.bench_engine import filler_tokens
from tools.report import write_report

SPEEDUP_MIN = 5.0
FLAT_MAX = 1.15


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


async def first_token(engine: Engine, sid: str, tokens: list[int]) -> tuple[int, float]:
    """Append `tokens`, generate; (the first token, seconds from the append to it)."""
    t0 = time.perf_counter()
    await engine.append(sid, tokens=tokens)
    stream = engine.generate(sid, max_tokens=1)
    async for event in stream:
        if isinstance(event, TokenEvent):
            elapsed = time.perf_counter() - t0
            await stream.aclose()
            return event.token_id, elapsed
    raise RuntimeError(f"no token generated: {stream.done}")


async def main_async(args) -> dict:
    log(f"loading {args.model} ...")
    loaded = load_model(args.model, dtype=args.dtype, progress=log)
    tok = loaded.tokenizer
    config = EngineConfig(sink=args.sink, window=args.window, block=args.block, max_append_tokens=1 << 20)
    with tempfile.TemporaryDirectory() as tmp:
        store = SessionStore(Path(tmp) / "sessions", max_bytes=1 << 40)
        engine = Engine(loaded, config, store=store)
        await engine.start()
        try:
            return await measure(args, engine, loaded, tok, store)
        finally:
            await engine.stop()


async def measure(args, engine: Engine, loaded, tok, store: SessionStore) -> dict:
    span = engine.shape.sink + engine.shape.window
    log(f"model {loaded.name} ({loaded.dtype}) on {platform.backend()}; sink {engine.shape.sink}, "
        f"window {engine.shape.window}, block {engine.shape.block}")
    t0 = time.perf_counter()
    await engine.fingerprint()
    fingerprint_s = time.perf_counter() - t0

    warm = await engine.create_session()  # first-call costs stay out of the timings
    await first_token(engine, warm, filler_tokens(tok, 2 * engine.shape.block, 99))
    await engine.save_session(warm, name="warm-up")
    await engine.close_session(warm)
    await engine.close_session((await engine.restore_session("warm-up")).session_id)

    turn = filler_tokens(tok, args.turn_tokens, 77_777)
    histories = [m * span for m in args.multiples]
    sid = await engine.create_session()
    saved = {}
    for h in histories:
        log(f"building a session of {h} tokens ...")
        await engine.append(sid, tokens=filler_tokens(tok, h - len(engine.session_history(sid)), h))
        await engine.prefill(sid)
        t0 = time.perf_counter()
        result = await engine.save_session(sid, name=f"history-{h}")
        saved[h] = {"save_s": time.perf_counter() - t0, "file_bytes": result.nbytes,
                    "kv_bytes": engine.session_kv_bytes(sid), "history": engine.session_history(sid)}
    await engine.close_session(sid)

    rows = {}
    for h in histories:
        restore_s, restored_turn_s, tokens = [], [], set()
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fork = (await engine.restore_session(f"history-{h}", fork=True)).session_id
            restore_s.append(time.perf_counter() - t0)
            token, elapsed = await first_token(engine, fork, turn)
            restored_turn_s.append(restore_s[-1] + elapsed)
            tokens.add(token)
            await engine.close_session(fork)
        log(f"history {h}: restore {statistics.median(restore_s):.3f} s, "
            f"restore + first token {statistics.median(restored_turn_s):.3f} s; re-sending ...")
        fresh = await engine.create_session()
        resent_token, resend_s = await first_token(engine, fresh, saved[h]["history"] + turn)
        await engine.close_session(fresh)
        log(f"history {h}: re-send + first token {resend_s:.3f} s")
        rows[h] = {
            "history_tokens": h,
            "file_bytes": saved[h]["file_bytes"],
            "kv_bytes_in_memory": saved[h]["kv_bytes"],
            "save_s": saved[h]["save_s"],
            "restore_s": statistics.median(restore_s),
            "restore_and_first_token_s": statistics.median(restored_turn_s),
            "resend_and_first_token_s": resend_s,
            "speedup_vs_resend": resend_s / statistics.median(restored_turn_s),
            "same_first_token": tokens == {resent_token},
        }

    first, last = histories[0], histories[-1]
    full_window = rows[first]["resend_and_first_token_s"]  # history of exactly sink + window
    speedups = {str(h): full_window / rows[h]["restore_and_first_token_s"] for h in histories}
    flat = rows[last]["restore_and_first_token_s"] / rows[first]["restore_and_first_token_s"]
    return {
        "model": loaded.name,
        "dtype": loaded.dtype,
        "note": "one run on a shared 2-core machine; other work ran at the same time",
        "cache": {"sink": engine.shape.sink, "window": engine.shape.window, "block": engine.shape.block},
        "turn_tokens": args.turn_tokens,
        "restore_repeats": args.repeats,
        "fingerprint_s": fingerprint_s,
        "histories": {str(h): rows[h] for h in histories},
        "full_window_reprefill_and_first_token_s": full_window,
        "speedup_vs_full_window_reprefill": speedups,
        "restore_and_first_token_16x_over_1x": flat,
        "targets": {
            "speedup_min": SPEEDUP_MIN,
            "flat_max": FLAT_MAX,
            "speedup_met": min(speedups.values()) >= SPEEDUP_MIN,
            "flat_met": flat <= FLAT_MAX,
            "same_first_token": all(r["same_first_token"] for r in rows.values()),
        },
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="model name, path or hub id (default: the bundled smollm2)")
    p.add_argument("--dtype", default=None, help="cast float weights (default: the model's own)")
    p.add_argument("--sink", type=int, default=4)
    p.add_argument("--window", type=int, default=188, help="window tokens (default 188: sink+window = 192)")
    p.add_argument("--block", type=int, default=32)
    p.add_argument("--turn-tokens", type=int, default=32, help="tokens the next turn appends")
    p.add_argument("--repeats", type=int, default=3, help="restores timed per history length")
    p.add_argument("--multiples", type=int, nargs="+", default=[1, 4, 16], help="history lengths in units of sink+window")
    p.add_argument("--out", default="results/bench_store.json", help="where to write the JSON results")
    args = p.parse_args(argv)
    result = asyncio.run(main_async(args))
    out = write_report(result, args.out)
    print(f"model: {result['model']} ({result['dtype']}, {platform.backend()}); cache {result['cache']}")
    print(f"fingerprint of the model files: {result['fingerprint_s'] * 1e3:.1f} ms")
    for h, r in result["histories"].items():
        print(f"history {h:>6}: {r['file_bytes'] / 1e6:.2f} MB on disk, save {r['save_s']:.3f} s, "
              f"restore {r['restore_s']:.3f} s; first token of the next turn: after restore "
              f"{r['restore_and_first_token_s']:.2f} s, after re-sending {r['resend_and_first_token_s']:.2f} s "
              f"({r['speedup_vs_resend']:.1f}x)")
    t = result["targets"]
    print(f"vs re-prefilling a full window ({result['full_window_reprefill_and_first_token_s']:.2f} s): "
          + ", ".join(f"{h}: {s:.1f}x" for h, s in result["speedup_vs_full_window_reprefill"].items())
          + f" (target >= {t['speedup_min']})")
    print(f"restore + next turn 16x / 1x: {result['restore_and_first_token_16x_over_1x']:.3f} (target <= {t['flat_max']})")
    print(f"same first token after restore as after re-sending: {t['same_first_token']}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
