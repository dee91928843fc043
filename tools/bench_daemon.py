"""Daemon benchmark: the socket path vs the in-process engine, on the same model, in one run.

    python -m tools.bench_daemon [--model smollm2] [--out results/bench_daemon.json]

Prints and writes JSON:
- streamed decode tokens/s through the Unix socket (a real `python -m kakeya_daemon`
  process, read by the asyncio client) vs the in-process engine, both timed at the
  consumer from first to last token, taken alternately (target: ratio >= 0.97);
- round-trip latency of a small request (`session_info`), p50 and p99;
- total generated tokens/s with 1, 4 and 16 concurrent clients, each on its own
  connection and session.
"""

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


from kakeya_client import AsyncClient, TokensEvent
from kakeya_mlx import platform
from kakeya_mlx.engine import Engine, EngineConfig
from kakeya_mlx.events import TokenEvent
from kakeya_mlx.loader import load_model
from tools.report import write_report

PROMPT = "Once upon a time, there was a little"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def rate(stamps: list[float]) -> float:
    """Tokens per second between the first and the last token seen."""
    if len(stamps) < 2 or stamps[-1] == stamps[0]:
        return 0.0
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def engine_decode_tps(engine: Engine, prompt: list[int], n: int) -> float:
    sid = await engine.create_session()
    await engine.append(sid, tokens=prompt)
    stamps = [time.perf_counter() async for e in engine.generate(sid, max_tokens=n) if isinstance(e, TokenEvent)]
    await engine.close_session(sid)
    return rate(stamps)


async def socket_decode_tps(client: AsyncClient, prompt: list[int], n: int) -> float:
    session = await client.create_session()
    await session.append(tokens=prompt)
    stamps = []
    async for event in session.generate(max_tokens=n, temperature=0):  # greedy, as the engine side
        if isinstance(event, TokensEvent):
            stamps += [time.perf_counter()] * len(event.tokens)
    await session.close()
    return rate(stamps)


async def one_client(socket: str, prompt: list[int], n: int) -> int:
    async with await AsyncClient.connect(socket, timeout=600) as client:
        session = await client.create_session()
        await session.append(tokens=prompt)
        _, done = await session.complete(max_tokens=n, temperature=0)
        await session.close()
        return done.generated_tokens


async def wait_for_daemon(socket: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the daemon exited with {proc.returncode} before it was ready")
        if os.path.exists(socket):
            try:
                async with await AsyncClient.connect(socket, timeout=5):
                    return
            except Exception:
                pass
        await asyncio.sleep(0.5)
    raise SystemExit("the daemon did not come up in time")


async def main_async(args, socket: str) -> dict:
    log(f"loading {args.model} in-process ...")
    loaded = load_model(args.model, progress=log)
    cache = dict(sink=args.sink, window=args.window, block=args.block)
    engine = Engine(loaded, EngineConfig(**cache))
    await engine.start()
    prompt = await engine.tokenize(PROMPT)

    cmd = [sys.executable, "-m", "kakeya_daemon", "--model", str(loaded.path), "--socket", socket,
           "--sink", str(args.sink), "--window", str(args.window), "--block", str(args.block),
           "--max-sessions", "64", "--max-concurrent-generations", "16", "--log-level", "warning"]
    log("starting the daemon: " + " ".join(cmd))
    proc = subprocess.Popen(cmd)
    try:
        await wait_for_daemon(socket, proc)
        async with await AsyncClient.connect(socket, timeout=600) as client:
            await engine_decode_tps(engine, prompt, 4)
            await socket_decode_tps(client, prompt, 4)
            ours, theirs = [], []
            for i in range(args.repeats):
                ours.append(await socket_decode_tps(client, prompt, args.decode_tokens))
                theirs.append(await engine_decode_tps(engine, prompt, args.decode_tokens))
                log(f"decode run {i + 1}: socket {ours[-1]:.2f} tok/s, in-process {theirs[-1]:.2f} tok/s")
            await engine.stop()
            decode = {"socket_tokens_per_s": statistics.median(ours), "engine_tokens_per_s": statistics.median(theirs)}
            decode["ratio"] = decode["socket_tokens_per_s"] / decode["engine_tokens_per_s"]

            session = await client.create_session()
            await session.append(tokens=prompt)
            rtts = []
            for _ in range(args.rtt_requests):
                t0 = time.perf_counter()
                await session.info()
                rtts.append(time.perf_counter() - t0)
            await session.close()
            latency = {"requests": len(rtts), "p50_ms": percentile(rtts, 0.5) * 1e3, "p99_ms": percentile(rtts, 0.99) * 1e3}

        concurrency = {}
        for clients in args.clients:
            t0 = time.perf_counter()
            counts = await asyncio.gather(*(one_client(socket, prompt, args.concurrent_tokens) for _ in range(clients)))
            wall = time.perf_counter() - t0
            concurrency[str(clients)] = {"tokens": sum(counts), "wall_s": wall, "tokens_per_s": sum(counts) / wall}
            log(f"{clients} clients: {sum(counts)} tokens in {wall:.1f} s")
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return {
        "model": loaded.name,
        "dtype": loaded.dtype,
        "cache": cache,
        "decode": decode,
        "round_trip": latency,
        "concurrency": concurrency,
        "daemon_exit_code": proc.returncode,
        "targets": {"socket_over_engine_min": 0.97, "met": decode["ratio"] >= 0.97},
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="model name, folder or hub id (default: the bundled smollm2)")
    p.add_argument("--sink", type=int, default=4)
    p.add_argument("--window", type=int, default=188)
    p.add_argument("--block", type=int, default=32)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rtt-requests", type=int, default=300)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--concurrent-tokens", type=int, default=16, help="tokens each concurrent client generates")
    p.add_argument("--out", default="results/bench_daemon.json")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="kakeya-bench-") as tmp:
        result = asyncio.run(main_async(args, str(Path(tmp) / "kakeya.sock")))
    out = write_report(result, args.out)
    d, r = result["decode"], result["round_trip"]
    print(f"model: {result['model']} ({result['dtype']}, {platform.backend()})")
    print(f"streamed decode tokens/s: socket {d['socket_tokens_per_s']:.2f} vs in-process "
          f"{d['engine_tokens_per_s']:.2f} -> ratio {d['ratio']:.3f} (target >= 0.97)")
    print(f"round trip (session_info): p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms")
    for n, c in result["concurrency"].items():
        print(f"{n:>2} concurrent clients: {c['tokens_per_s']:.2f} tokens/s in total")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
