"""HTTP benchmark: our OpenAI-compatible front vs `mlx_lm.server`, same model, same machine, one run.

    python -m tools.bench_http [--model smollm2] [--multiples 1 4 16] [--out results/bench_http.json]

A multi-turn chat whose history is 1x, 4x and 16x (sink + window) tokens is sent to
both servers: turn 1 (history + a question, cold), then turn 2 (the same history,
turn 1's reply and a new question), each as a stateless streaming
/v1/chat/completions request through the official `openai` client. Timed is the
second turn: time to first token and total. Ours should stay flat (only turn 2's
new tokens run, over a bounded window); mlx-lm's server reuses its prompt cache
too, but attends over the whole history. Prints the ratios; writes JSON.

Each server runs in its own process; they are measured alternately, never at the
same time. Each repeat uses a fresh conversation, so turn 1 is always cold.
"""

import argparse
import importlib.metadata
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import openai
from tools.report import write_report

FILLER = "The window slides, the sink stays, and the notes go on: entry {salt}.{i} records nothing new."


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with status {proc.returncode} before it was ready ({url})")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"server at {url} not ready after {timeout_s:.0f} s")


def conversation(tokenizer, target_tokens: int, salt: int) -> list[dict]:
    """A system message and alternating turns whose rendered length reaches target_tokens."""
    messages = [{"role": "system", "content": f"You keep notes (run {salt})."}]
    i = 0
    while True:
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        if len(tokenizer.encode(rendered, add_special_tokens=False)) >= target_tokens:
            return messages
        messages.append({"role": "user", "content": " ".join(FILLER.format(salt=salt, i=i + k) for k in range(3))})
        messages.append({"role": "assistant", "content": FILLER.format(salt=salt, i=i + 100)})
        i += 1


def timed_chat(client: openai.OpenAI, model: str, messages: list[dict], max_tokens: int) -> dict:
    """One streaming greedy chat request: time to first token, total, reply, usage."""
    t0 = time.perf_counter()
    first = None
    pieces = []
    usage = None
    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=max_tokens,
        temperature=0.0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                if first is None:
                    first = time.perf_counter()
                pieces.append(choice.delta.content)
    end = time.perf_counter()
    details = getattr(usage, "prompt_tokens_details", None) if usage else None
    return {
        "ttft_s": (first or end) - t0,
        "total_s": end - t0,
        "reply": "".join(pieces),
        "prompt_tokens": usage.prompt_tokens if usage else None,
        "completion_tokens": usage.completion_tokens if usage else None,
        "cached_tokens": getattr(details, "cached_tokens", None) if details else None,
    }


def second_turn(client, model: str, history: list[dict], salt: int, max_tokens: int) -> dict:
    first_q = {"role": "user", "content": f"Question {salt}: what did entry {salt}.0 record?"}
    turn1 = timed_chat(client, model, history + [first_q], max_tokens)
    follow = history + [
        first_q,
        {"role": "assistant", "content": turn1["reply"]},
        {"role": "user", "content": "And the entry after it?"},
    ]
    turn2 = timed_chat(client, model, follow, max_tokens)
    turn2["turn1_total_s"] = turn1["total_s"]
    return turn2


def run_bench(args) -> dict:
    from kakeya_mlx.loader import load_model

    log(f"loading {args.model} ...")
    loaded = load_model(args.model, dtype=args.dtype, progress=log)
    path, tokenizer = str(loaded.path), loaded.tokenizer
    name, dtype = loaded.name, loaded.dtype
    del loaded
    span = args.sink + args.window
    log(f"model {name} ({dtype}) at {path}; sink {args.sink} + window {args.window} = {span}, block {args.block}")

    ours_port, theirs_port = free_port(), free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # Ours is the real daemon with its HTTP front on; its Unix socket sits in a private dir.
    sock_dir = tempfile.mkdtemp(prefix="kakeya-bench-http-")
    ours_cmd = [
        sys.executable, "-m", "kakeya_daemon",
        "--model", path,
        "--socket", os.path.join(sock_dir, "kakeya.sock"),
        "--http-port", str(ours_port),
        "--http-max-body-bytes", str(16 << 20),
        "--sink", str(args.sink),
        "--window", str(args.window),
        "--block", str(args.block),
        "--max-new-tokens", str(max(4096, args.max_tokens)),
        "--log-level", "warning",
    ]
    if args.dtype:
        ours_cmd += ["--dtype", args.dtype]
    theirs_cmd = [
        sys.executable,
        "-m",
        "mlx_lm",
        "server",
        "--model",
        path,
        "--port",
        str(theirs_port),
        "--log-level",
        "WARNING",
    ]
    # mlx_lm.server logs every request; keep that out of the report, in a file beside it.
    server_log = Path(args.out).with_suffix(".mlx_lm.log")
    server_log.parent.mkdir(parents=True, exist_ok=True)
    procs = []
    try:
        procs.append(subprocess.Popen(ours_cmd, env=env))
        with open(server_log, "wb") as sink:
            procs.append(subprocess.Popen(theirs_cmd, env=env, stdout=sink, stderr=subprocess.STDOUT))
        log(f"mlx_lm.server output goes to {server_log}")
        wait_ready(f"http://127.0.0.1:{ours_port}/healthz", procs[0], 600)
        wait_ready(f"http://127.0.0.1:{theirs_port}/health", procs[1], 600)
        ours = openai.OpenAI(base_url=f"http://127.0.0.1:{ours_port}/v1", api_key="none", timeout=600, max_retries=0)
        theirs = openai.OpenAI(
            base_url=f"http://127.0.0.1:{theirs_port}/v1", api_key="none", timeout=600, max_retries=0
        )
        ours_model = ours.models.list().data[0].id
        sides = {"ours": (ours, ours_model), "mlx_lm": (theirs, path)}

        warm = [{"role": "user", "content": "Hello"}]
        for client, model in sides.values():
            timed_chat(client, model, warm, 4)

        results = {}
        for multiple in args.multiples:
            target = multiple * span
            runs = {side: [] for side in sides}
            for r in range(args.repeats):
                # Alternate which side goes first so drift in machine load hits both.
                order = list(sides) if r % 2 == 0 else list(sides)[::-1]
                for side in order:
                    salt = 1000 * multiple + 10 * r + (1 if side == "ours" else 2)
                    history = conversation(tokenizer, target, salt)
                    client, model = sides[side]
                    runs[side].append(second_turn(client, model, history, salt, args.max_tokens))
                    t = runs[side][-1]
                    log(
                        f"history {target} x{multiple} repeat {r + 1} {side}: turn-2 ttft {t['ttft_s']:.3f} s, "
                        f"total {t['total_s']:.3f} s ({t['completion_tokens']} tokens, cached {t['cached_tokens']}, "
                        f"prompt {t['prompt_tokens']}); turn 1 {t['turn1_total_s']:.3f} s"
                    )
            results[str(target)] = {
                side: {
                    "ttft_s": statistics.median(t["ttft_s"] for t in runs[side]),
                    "total_s": statistics.median(t["total_s"] for t in runs[side]),
                    "turn1_total_s": statistics.median(t["turn1_total_s"] for t in runs[side]),
                    "prompt_tokens": [t["prompt_tokens"] for t in runs[side]],
                    "cached_tokens": [t["cached_tokens"] for t in runs[side]],
                    "completion_tokens": [t["completion_tokens"] for t in runs[side]],
                }
                for side in sides
            }
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()

    histories = [multiple * span for multiple in args.multiples]
    first, last = str(histories[0]), str(histories[-1])
    for h in map(str, histories):
        for key in ("ttft_s", "total_s"):
            results[h][f"mlx_lm_over_ours_{key}"] = results[h]["mlx_lm"][key] / results[h]["ours"][key]
    return {
        "model": name,
        "dtype": dtype,
        "path": path,
        "versions": {pkg: importlib.metadata.version(pkg) for pkg in ("mlx", "mlx-lm", "aiohttp", "openai")},
        "cache": {"sink": args.sink, "window": args.window, "block": args.block},
        "max_tokens": args.max_tokens,
        "repeats": args.repeats,
        "histories": histories,
        "second_turn": results,
        "ours_last_over_first_ttft": results[last]["ours"]["ttft_s"] / results[first]["ours"]["ttft_s"],
        "mlx_lm_last_over_first_ttft": results[last]["mlx_lm"]["ttft_s"] / results[first]["mlx_lm"]["ttft_s"],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="model name or path (default: the bundled smollm2)")
    p.add_argument("--dtype", default=None, help="compute dtype for ours (default: the loader's choice)")
    p.add_argument("--sink", type=int, default=4)
    p.add_argument("--window", type=int, default=188, help="window tokens (default 188: sink+window = 192)")
    p.add_argument("--block", type=int, default=32)
    p.add_argument(
        "--multiples", type=int, nargs="+", default=[1, 4, 16], help="history lengths in units of sink+window"
    )
    p.add_argument("--repeats", type=int, default=3, help="conversations timed per history length and side")
    p.add_argument("--max-tokens", type=int, default=16, help="tokens generated per turn")
    p.add_argument("--out", default="results/bench_http.json", help="where to write the JSON results")
    args = p.parse_args(argv)
    result = run_bench(args)
    out = write_report(result, args.out)
    print(f"model: {result['model']} ({result['dtype']}), sink+window {args.sink + args.window}, block {args.block}")
    for h in result["histories"]:
        r = result["second_turn"][str(h)]
        o, m = r["ours"], r["mlx_lm"]
        print(
            f"second turn at history {h:>6}: ttft ours {o['ttft_s']:.3f} s vs mlx_lm.server {m['ttft_s']:.3f} s "
            f"(x{r['mlx_lm_over_ours_ttft_s']:.2f}); total ours {o['total_s']:.3f} s vs {m['total_s']:.3f} s "
            f"(x{r['mlx_lm_over_ours_total_s']:.2f}); cached ours {o['cached_tokens']} / prompt {o['prompt_tokens']}"
        )
    print(
        f"ttft {result['histories'][-1]}/{result['histories'][0]}: ours {result['ours_last_over_first_ttft']:.3f}, "
        f"mlx_lm.server {result['mlx_lm_last_over_first_ttft']:.3f}"
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
