"""Speculative decoding benchmark: each drafter vs plain greedy, same model, same run.

    python -m tools.bench_speculative [--model smollm2] [--draft-model smollm2] [--tokens 96]
                                      [--repeats 2] [--out results/bench_speculative.json]

For each task and each mode (off, prompt_lookup, draft, auto) it generates greedily
from the same chat prompt and reports tokens/s relative to plain decoding, the
drafted and accepted counts, the acceptance rate and the mean accepted run length,
and whether the output equals plain greedy output (it must, always). Modes run
alternately within each repeat so that machine noise hits all of them alike.

Tasks: (a) repetitive — repeat a passage quoted in the prompt; continue a code
file shown in the prompt; (b) free generation. It also records the forward-cost
curve the engine measured (what k+1 tokens cost next to one), which is what the
auto policy decides from.
"""

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path


from kakeya_mlx.engine import Engine, EngineConfig
from kakeya_mlx.loader import load_model
from tools.report import write_report

PASSAGE = (
    "The lighthouse stood at the end of the long stone pier. Every evening the keeper climbed the "
    "one hundred and twelve steps, trimmed the wick, polished the great lens and lit the lamp. Ships "
    "far out at sea saw the beam sweep across the water every ten seconds, and they knew where the "
    "rocks were."
)
CODE = '''def mean(values):
    """The arithmetic mean of a non-empty list."""
    return sum(values) / len(values)


def variance(values):
    """The population variance of a non-empty list."""
    m = mean(values)
    return sum((v - m) ** 2 for v in values) / len(values)


def stddev(values):
    """The population standard deviation of a non-empty list."""
    return variance(values) ** 0.5


def median(values):
'''
TASKS = {
    "repeat_passage": ("repetitive", f"Here is a paragraph:\n\n{PASSAGE}\n\nRepeat the paragraph exactly, word for word."),
    "continue_code": ("repetitive", f"Continue this Python file:\n\n{CODE}"),
    "free_story": ("free", "Write a short story about a lighthouse keeper who finds a message in a bottle."),
}
MODES = ("off", "prompt_lookup", "draft", "auto")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


async def run_once(engine: Engine, prompt: str, mode: str, tokens: int) -> dict:
    sid = await engine.create_session()
    await engine.append(sid, messages=[{"role": "user", "content": prompt}])
    await engine.prefill(sid)
    counters = engine.scheduler_counters()
    verified = counters["verify_rows"]
    t0 = time.perf_counter()
    done = [e async for e in engine.generate(sid, max_tokens=tokens, speculative=mode)][-1]
    elapsed = time.perf_counter() - t0
    await engine.close_session(sid)
    return {
        "token_ids": done.token_ids,
        "seconds": elapsed,
        "tokens": done.generated_tokens,
        "drafted": done.draft_tokens,
        "accepted": done.accepted_tokens,
        "verify_steps": engine.scheduler_counters()["verify_rows"] - verified,
    }


async def bench(args) -> dict:
    log(f"loading {args.model}")
    target = load_model(args.model)
    draft = load_model(args.draft_model) if args.draft_model else None
    config = EngineConfig(window=args.window, block=args.block, num_draft_tokens=args.num_draft_tokens)
    engine = Engine(target, config, draft=draft)
    await engine.start()
    modes = [m for m in MODES if m != "draft" or draft is not None]
    results = {}
    try:
        for task, (kind, prompt) in TASKS.items():
            runs = {m: [] for m in modes}
            for r in range(args.repeats):
                for mode in modes if r % 2 == 0 else reversed(modes):
                    out = await run_once(engine, prompt, mode, args.tokens)
                    runs[mode].append(out)
                    log(f"{task} {mode} repeat {r}: {out['tokens'] / out['seconds']:.2f} tok/s, "
                        f"drafted {out['drafted']}, accepted {out['accepted']}")
            plain = runs["off"]
            plain_tps = statistics.median(o["tokens"] / o["seconds"] for o in plain)
            entry = {"kind": kind, "plain_tokens_per_s": plain_tps, "modes": {}}
            for mode in modes:
                if mode == "off":
                    continue
                outs = runs[mode]
                tps = statistics.median(o["tokens"] / o["seconds"] for o in outs)
                drafted, accepted = sum(o["drafted"] for o in outs), sum(o["accepted"] for o in outs)
                steps = sum(o["verify_steps"] for o in outs)
                entry["modes"][mode] = {
                    "tokens_per_s": tps,
                    "ratio_vs_plain": tps / plain_tps,
                    "identical_to_plain": all(o["token_ids"] == plain[0]["token_ids"] for o in outs),
                    "drafted": drafted,
                    "accepted": accepted,
                    "acceptance_rate": accepted / drafted if drafted else None,
                    "verify_steps": steps,
                    "mean_accepted_run": accepted / steps if steps else None,
                }
            results[task] = entry
        costs = engine.spec.costs.ratios if engine.spec.costs else {}
    finally:
        await engine.stop()
    return {
        "results": results,
        "forward_cost_ratio": {str(n): r for n, r in sorted(costs.items())},
        "draft_cost_ratio": engine.spec.draft_cost,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.bench_speculative", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", help="target model (default: the bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--draft-model", default="smollm2", help="draft model sharing the tokenizer ('' for none)")
    parser.add_argument("--tokens", type=int, default=96, help="tokens generated per run")
    parser.add_argument("--repeats", type=int, default=2, help="runs per task and mode")
    parser.add_argument("--num-draft-tokens", type=int, default=4, help="most tokens drafted per step")
    parser.add_argument("--window", type=int, default=956, help="cache window")
    parser.add_argument("--block", type=int, default=64, help="cache block")
    parser.add_argument("--out", type=Path, default=Path("results/bench_speculative.json"))
    args = parser.parse_args(argv)
    started = time.time()
    report = asyncio.run(bench(args))
    report["setup"] = {
        "model": args.model,
        "draft_model": args.draft_model or None,
        "tokens": args.tokens,
        "repeats": args.repeats,
        "num_draft_tokens": args.num_draft_tokens,
        "wall_s": time.time() - started,
    }
    write_report(report, args.out)
    print(f"{'task':16} {'mode':14} {'tok/s':>7} {'ratio':>6} {'same':>5} {'accept':>7}")
    for task, entry in report["results"].items():
        print(f"{task:16} {'off':14} {entry['plain_tokens_per_s']:7.2f} {1.0:6.2f}")
        for mode, m in entry["modes"].items():
            rate = f"{m['acceptance_rate']:.2f}" if m["acceptance_rate"] is not None else "-"
            print(f"{task:16} {mode:14} {m['tokens_per_s']:7.2f} {m['ratio_vs_plain']:6.2f} {str(m['identical_to_plain']):>5} {rate:>7}")
    print(f"forward cost of n tokens / 1 token: {report['forward_cost_ratio']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
