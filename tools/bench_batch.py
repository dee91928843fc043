"""Batched decoding benchmark: the batch scheduler vs round-robin, through the socket and in-process.

    python -m tools.bench_batch [--model smollm2] [--clients 1,2,4,8,16] [--tokens 96]
                                [--out results/bench_batch.json]

Two daemons serve the same model as separate processes, one batching every decoding
generation into one forward pass (decode_batch_size=16), one stepping them one at a
time (decode_batch_size=1, the round-robin scheduler). For each client count, N
clients on their own connections each append a distinct prompt and generate
greedily at the same time; the same is measured in this process on the engine
directly, so the daemon's own overhead shows. Reported per configuration: total
generated tokens/s (first request to last done) and each client's inter-token
latency, p50 and p99 over all clients' tokens. Configurations run alternately
within each client count, so machine noise hits all of them alike. Each client
generates about `--tokens` / N tokens (at least 8).
"""

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


from kakeya_client import AsyncClient
from kakeya_mlx.engine import Engine, EngineConfig
from kakeya_mlx.events import TokenEvent
from kakeya_mlx.loader import load_model
from tools.report import write_report

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [
    "Tell me about the history of lighthouses.",
    "Explain how a bicycle stays upright.",
    "Write a short poem about the sea.",
    "What makes bread rise?",
    "Describe a busy market in the morning.",
    "How do bees make honey?",
    "Give three tips for learning a language.",
    "Why is the sky blue?",
]
MODES = {"batched": 16, "round_robin": 1}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summarize(starts: float, ends: list[float], gaps: list[list[float]], tokens: int) -> dict:
    flat = [g for client in gaps for g in client]
    return {
        "total_tokens_per_s": tokens / (max(ends) - starts),
        "inter_token_ms_p50": 1000 * percentile(flat, 0.5) if flat else None,
        "inter_token_ms_p99": 1000 * percentile(flat, 0.99) if flat else None,
        "tokens": tokens,
    }


async def socket_run(path: Path, clients: int, tokens: int) -> dict:
    conns = [await AsyncClient(path, timeout=600).__aenter__() for _ in range(clients)]
    try:
        sessions = []
        for i, conn in enumerate(conns):
            session = await conn.create_session()
            await session.append(messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}])
            # Prefill before the clock starts: this measures decoding.
            async for _ in session.generate(max_tokens=1, temperature=0, speculative="off"):
                pass
            sessions.append(session)
        gaps: list[list[float]] = [[] for _ in sessions]
        ends: list[float] = [0.0] * len(sessions)
        counts = [0] * len(sessions)

        async def one(i: int, session) -> None:
            last = None
            async for event in session.generate(max_tokens=tokens, temperature=0, speculative="off"):
                now = time.perf_counter()
                n = len(getattr(event, "tokens", []) or [])
                if n:
                    if last is not None:
                        gaps[i].extend([(now - last) / n] * n)
                    last = now
                    counts[i] += n
            ends[i] = time.perf_counter()

        start = time.perf_counter()
        await asyncio.gather(*(one(i, s) for i, s in enumerate(sessions)))
        for session in sessions:
            await session.close()
        return summarize(start, ends, gaps, sum(counts))
    finally:
        for conn in conns:
            await conn.__aexit__(None, None, None)


async def engine_run(engine: Engine, clients: int, tokens: int) -> dict:
    sids = []
    for i in range(clients):
        sid = await engine.create_session()
        await engine.append(sid, messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}])
        await engine.prefill(sid)
        sids.append(sid)
    gaps: list[list[float]] = [[] for _ in sids]
    ends: list[float] = [0.0] * len(sids)
    counts = [0] * len(sids)

    async def one(i: int, sid: str) -> None:
        last = None
        async for event in engine.generate(sid, max_tokens=tokens, speculative="off"):
            if isinstance(event, TokenEvent):
                now = time.perf_counter()
                if last is not None:
                    gaps[i].append(now - last)
                last = now
                counts[i] += 1
        ends[i] = time.perf_counter()

    start = time.perf_counter()
    await asyncio.gather(*(one(i, s) for i, s in enumerate(sids)))
    for sid in sids:
        await engine.close_session(sid)
    return summarize(start, ends, gaps, sum(counts))


def start_daemon(model: str, batch: int, sock: Path, log_path: Path) -> subprocess.Popen:
    args = [
        sys.executable, "-m", "kakeya_daemon", "--model", model, "--socket", str(sock),
        "--decode-batch-size", str(batch), "--max-concurrent-generations", "16",
        "--speculative", "off", "--idle-ttl-s", "0", "--log-level", "warning",
    ]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    with open(log_path, "wb") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)


async def wait_ready(proc: subprocess.Popen, sock: Path, log_path: Path) -> None:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("daemon exited:\n" + log_path.read_text())
        try:
            async with AsyncClient(sock, timeout=5):
                return
        except Exception:
            await asyncio.sleep(0.5)
    raise RuntimeError("daemon did not start:\n" + log_path.read_text())


async def bench(args) -> dict:
    counts = [int(c) for c in args.clients.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="kk-bench-", dir="/tmp"))
    procs, socks = {}, {}
    try:
        for mode, batch in MODES.items():
            socks[mode] = tmp / f"{mode}.sock"
            procs[mode] = start_daemon(args.model, batch, socks[mode], tmp / f"{mode}.log")
        log(f"loading {args.model} in this process")
        loaded = load_model(args.model)
        engines = {mode: Engine(loaded, EngineConfig(decode_batch_size=batch, speculative="off")) for mode, batch in MODES.items()}
        for engine in engines.values():
            await engine.start()
        for mode in MODES:
            await wait_ready(procs[mode], socks[mode], tmp / f"{mode}.log")
        results: dict = {"socket": {m: {} for m in MODES}, "in_process": {m: {} for m in MODES}}
        for n in counts:
            tokens = max(8, args.tokens // n)
            order = list(MODES) if n % 2 else list(reversed(MODES))
            for mode in order:
                results["socket"][mode][n] = await socket_run(socks[mode], n, tokens)
                log(f"{n} clients socket {mode}: {results['socket'][mode][n]['total_tokens_per_s']:.2f} tok/s")
                results["in_process"][mode][n] = await engine_run(engines[mode], n, tokens)
                log(f"{n} clients in-process {mode}: {results['in_process'][mode][n]['total_tokens_per_s']:.2f} tok/s")
        for engine in engines.values():
            await engine.stop()
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            proc.wait(60)
        shutil.rmtree(tmp, ignore_errors=True)
    return results


def ratios(results: dict, counts: list[int]) -> dict:
    out = {}
    for path, by_mode in results.items():
        b, r = by_mode["batched"], by_mode["round_robin"]
        lone = b[counts[0]]["inter_token_ms_p50"]
        out[path] = {
            n: {
                "batched_over_round_robin_tokens_per_s": b[n]["total_tokens_per_s"] / r[n]["total_tokens_per_s"],
                "batched_tokens_per_s_over_one_client": b[n]["total_tokens_per_s"] / b[counts[0]]["total_tokens_per_s"],
                "batched_p50_latency_over_one_client": (b[n]["inter_token_ms_p50"] / lone) if lone else None,
            }
            for n in counts
        }
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.bench_batch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", help="model (default: the bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--clients", default="1,2,4,8,16", help="comma-separated client counts")
    parser.add_argument("--tokens", type=int, default=96, help="tokens per configuration, split over its clients")
    parser.add_argument("--out", type=Path, default=Path("results/bench_batch.json"))
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.clients.split(",")]
    started = time.time()
    results = asyncio.run(bench(args))
    report = {
        "results": results,
        "ratios": ratios(results, counts),
        "setup": {
            "model": args.model,
            "tokens_per_configuration": args.tokens,
            "load_average": os.getloadavg(),
            "wall_s": time.time() - started,
        },
    }
    write_report(report, args.out)
    print(f"{'path':11} {'clients':>7} {'batched tok/s':>13} {'round-robin':>11} {'ratio':>6} {'p50 ms':>7} {'p99 ms':>7}")
    for path, by_mode in results.items():
        for n in counts:
            b, r = by_mode["batched"][n], by_mode["round_robin"][n]
            ratio = b["total_tokens_per_s"] / r["total_tokens_per_s"]
            print(
                f"{path:11} {n:7d} {b['total_tokens_per_s']:13.2f} {r['total_tokens_per_s']:11.2f} {ratio:6.2f} "
                f"{b['inter_token_ms_p50'] or 0:7.0f} {b['inter_token_ms_p99'] or 0:7.0f}"
            )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
