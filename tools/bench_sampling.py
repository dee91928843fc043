"""Which default sampling serves the bundled model's chat best: candidate defaults side by side, in one run.

    python -m tools.bench_sampling [--dtype bfloat16] [--seeds 1,2,3] [--out results/bench_sampling.json]

For each candidate (plain greedy, greedy with a repetition penalty, and sampling at a
few temperatures with top-p 0.9, top-k 40 and a 1.1 repetition penalty), SmolLM2-135M-Instruct
answers tools.bench_dtype's factual questions in the chat template, once per seed; the
table gives the answers that hold the expected word and the ones that loop (a 3-word
run repeated three times). The daemon's documented default is kakeya_protocol.params.DEFAULT_SAMPLING.
"""

import argparse
import asyncio
import sys
from pathlib import Path

from kakeya_mlx.engine import Engine, EngineConfig
from kakeya_mlx.loader import load_model
from kakeya_mlx.sampling import SamplingParams
from kakeya_protocol import params as rules
from tools.bench_dtype import MODEL, QUESTIONS, answers, log
from tools.report import write_report

REPO = Path(__file__).resolve().parents[1]
FILTERS = {"top_p": 0.9, "top_k": 40, "repetition_penalty": 1.1}
CANDIDATES = {
    "greedy": {"temperature": 0.0},
    "greedy, penalty 1.1": {"temperature": 0.0, "repetition_penalty": 1.1},
    **{f"temperature {t:g}": {"temperature": t, **FILTERS} for t in (0.2, 0.4, 0.7)},
}


async def run(dtype: str, seeds: list[int]) -> dict:
    loaded = load_model("smollm2", dtype=dtype, progress=log)
    engine = Engine(loaded, EngineConfig(recompute_blocks=False))
    await engine.start()
    out = {}
    for name, settings in CANDIDATES.items():
        greedy = settings["temperature"] == 0.0
        runs = [await answers(engine, SamplingParams(**settings, seed=s)) for s in ([0] if greedy else seeds)]
        out[name] = {
            "settings": settings,
            "answers": len(QUESTIONS) * len(runs),
            "correct": sum(r["correct"] for r in runs),
            "looping": sum(r["looping"] for r in runs),
            "runs": runs,
        }
        log(f"{name:22s} correct {out[name]['correct']}/{out[name]['answers']}, looping {out[name]['looping']}")
    await engine.stop()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--seeds", default="1,2,3", help="seeds of the sampled candidates (default 1,2,3)")
    parser.add_argument("--out", default=str(REPO / "results" / "bench_sampling.json"))
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    results = asyncio.run(run(args.dtype, seeds))
    report = {"benchmark": "sampling", "model": MODEL, "dtype": args.dtype, "seeds": seeds}
    report.update(default_sampling=rules.DEFAULT_SAMPLING, results=results)
    log(f"wrote {write_report(report, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
