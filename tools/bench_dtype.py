"""Which dtype the bundled model should be converted to on the CPU backend: quality and speed, side by side.

    python -m tools.bench_dtype [--dtypes bfloat16,float32] [--runs 3] [--out results/bench_dtype.json]

SmolLM2-135M-Instruct ships 4-bit (Q4_1); on MLX's CPU backend it is dequantized to a
float dtype (platform.default_compute_dtype_for_gguf). Each dtype is loaded at once,
beside the others, and measured through the engine:

- quality: chat answers to short factual questions, greedy and with the daemon's
  default sampling (two seeds; an answer counts when it holds the expected word; one
  that repeats a 3-word run three times is looping), the perplexity of a fixed English
  text, and how often the
  dtype's likeliest next token agrees with float32's over that text (float32 is the
  dequantized weights as they are; the other dtypes round them);
- speed: decode tokens/s (128 tokens) and prefill tokens/s (a ~300-token prompt),
  the dtypes taken alternately, medians over the runs.
"""

import argparse
import asyncio
import statistics
import sys
from pathlib import Path

import mlx.core as mx

from kakeya_mlx.engine import Engine, EngineConfig
from kakeya_mlx.loader import LoadedModel, load_model
from kakeya_mlx.events import TokenEvent
from kakeya_mlx.sampling import SamplingParams
from kakeya_protocol import params as rules
from tools.report import write_report

REPO = Path(__file__).resolve().parents[1]
MODEL = "SmolLM2-135M-Instruct (Q4_1 GGUF)"
QUESTIONS = [
    ("What is the capital of France?", "paris"),
    ("What is the capital of Japan?", "tokyo"),
    ("What is the capital of Italy?", "rome"),
    ("What is the capital of Germany?", "berlin"),
    ("What is the capital of Spain?", "madrid"),
    ("How many days are there in a week?", "seven|7"),
    ("What is the largest planet in the solar system?", "jupiter"),
    ("Which gas do plants take in from the air to make food?", "carbon dioxide|co2"),
    ("At how many degrees Celsius does water freeze?", "0"),
    ("Who wrote Romeo and Juliet?", "shakespeare"),
    ("What colour is the sky on a clear day?", "blue"),
    ("What is 2 + 3?", "5"),
]
# Plain factual prose, written for this benchmark.
TEXT = (
    "Water moves through the world in a cycle. The sun warms oceans, lakes and rivers, and some of their water "
    "turns into vapour that rises into the air. As the vapour climbs, it cools and gathers into tiny droplets "
    "that form clouds. When the droplets join and grow heavy, they fall back to the ground as rain or snow. "
    "Some of that water runs over the land into streams and rivers, some soaks into the soil and feeds plants, "
    "and some seeps deep underground, where it can stay for thousands of years. Rivers carry water back to the "
    "sea, and the cycle begins again. Because the same water is used again and again, the water you drink today "
    "may once have fallen as snow on a mountain far away."
)
ANSWER_TOKENS = 40
# Seeds of the answers drawn with the daemon's default sampling (kakeya_protocol.params.DEFAULT_SAMPLING).
SEEDS = (1, 2)
DECODE_TOKENS = 128


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


async def answer(engine: Engine, question: str, sampling: SamplingParams) -> str:
    sid = await engine.create_session()
    await engine.append(sid, messages=[{"role": "user", "content": question}])
    stream = engine.generate(sid, max_tokens=ANSWER_TOKENS, sampling=sampling)
    pieces = [e.text async for e in stream if isinstance(e, TokenEvent)]
    await engine.close_session(sid)
    return "".join(pieces)


def correct(answer: str, expected: str) -> bool:
    return any(word in answer.lower() for word in expected.split("|"))


def looping(answer: str) -> bool:
    """Whether the answer repeats itself: some 3-word run occurs 3 times or more."""
    words = answer.split()
    runs = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
    return any(runs.count(r) >= 3 for r in set(runs))


async def answers(engine: Engine, sampling: SamplingParams) -> dict:
    out = [(q, await answer(engine, q, sampling)) for q, _ in QUESTIONS]
    return {
        "correct": sum(correct(a, expected) for (_, a), (_, expected) in zip(out, QUESTIONS)),
        "looping": sum(looping(a) for _, a in out),
        "answers": [{"question": q, "answer": a, "correct": correct(a, e)} for (q, a), (_, e) in zip(out, QUESTIONS)],
    }


async def speed(engine: Engine, prompt: list[int]) -> tuple[float, float]:
    """(decode tokens/s, prefill tokens/s) of one turn: `prompt`, then DECODE_TOKENS greedy tokens."""
    sid = await engine.create_session()
    await engine.append(sid, tokens=prompt)
    stream = engine.generate(sid, max_tokens=DECODE_TOKENS, sampling=SamplingParams(temperature=0.0))
    done = [e async for e in stream][-1]
    await engine.close_session(sid)
    return done.decode_tokens_per_s, done.prefill_tokens_per_s


def text_logprobs(loaded: LoadedModel, ids: list[int]) -> mx.array:
    """Log-probabilities (float32) the model gives each next token of `ids`, in one forward pass."""
    logits = loaded.model(mx.array(ids)[None])[0].astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def quality(loaded: LoadedModel, reference: LoadedModel) -> dict:
    ids = loaded.tokenizer.encode(TEXT)
    lp, ref_lp = text_logprobs(loaded, ids), text_logprobs(reference, ids)
    chosen = mx.take_along_axis(lp[:-1], mx.array(ids[1:])[:, None], axis=-1)
    perplexity = mx.exp(-chosen.mean()).item()
    agreement = (mx.argmax(lp, axis=-1) == mx.argmax(ref_lp, axis=-1)).astype(mx.float32).mean().item()
    return {"perplexity": perplexity, "top1_agreement_with_float32": agreement, "text_tokens": len(ids)}


async def run(dtypes: list[str], runs: int) -> dict:
    models = {d: load_model("smollm2", dtype=d, progress=log) for d in dtypes}
    reference = models.get("float32") or load_model("smollm2", dtype="float32", progress=log)
    engines = {d: Engine(m, EngineConfig(recompute_blocks=False)) for d, m in models.items()}
    for engine in engines.values():
        await engine.start()
    out = {}
    for d, engine in engines.items():
        greedy = await answers(engine, SamplingParams(temperature=0.0))
        sampled = [await answers(engine, SamplingParams(**rules.DEFAULT_SAMPLING, seed=s)) for s in SEEDS]
        out[d] = {
            "questions": len(QUESTIONS),
            "greedy": greedy,
            "default_sampling": {
                "seeds": list(SEEDS),
                "correct": sum(s["correct"] for s in sampled),
                "looping": sum(s["looping"] for s in sampled),
                "runs": sampled,
            },
            **quality(models[d], reference),
        }
        log(
            f"{d}: greedy {greedy['correct']}/{len(QUESTIONS)} correct ({greedy['looping']} looping); default "
            f"sampling {out[d]['default_sampling']['correct']}/{len(QUESTIONS) * len(SEEDS)} correct "
            f"({out[d]['default_sampling']['looping']} looping); perplexity {out[d]['perplexity']:.2f}"
        )
    prompt = models[dtypes[0]].tokenizer.encode(" ".join([TEXT] * 2))
    samples = {d: [] for d in dtypes}
    for i in range(runs):
        for d, engine in engines.items():  # alternately, so both see the same machine
            samples[d].append(await speed(engine, prompt))
        log(f"speed run {i + 1}/{runs}: " + ", ".join(f"{d} {s[-1][0]:.2f} tok/s" for d, s in samples.items()))
    for d in dtypes:
        out[d]["decode_tokens_per_s"] = statistics.median(s[0] for s in samples[d])
        out[d]["prefill_tokens_per_s"] = statistics.median(s[1] for s in samples[d])
        out[d]["weights_bytes"] = engines[d].weights_bytes()
    for engine in engines.values():
        await engine.stop()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", default="bfloat16,float32", help="comma-separated (default bfloat16,float32)")
    parser.add_argument("--runs", type=int, default=3, help="speed runs per dtype (default 3)")
    parser.add_argument("--out", default=str(REPO / "results" / "bench_dtype.json"))
    args = parser.parse_args()
    dtypes = args.dtypes.split(",")
    results = asyncio.run(run(dtypes, args.runs))
    base = results[dtypes[0]]
    for d, r in results.items():
        sampled = r["default_sampling"]

        def ratio(measure: str) -> float:
            return r[measure] / base[measure]

        log(
            f"{d:9s} greedy {r['greedy']['correct']}/{r['questions']} (looping {r['greedy']['looping']})  sampled "
            f"{sampled['correct']}/{r['questions'] * len(SEEDS)} (looping {sampled['looping']})  "
            f"perplexity {r['perplexity']:6.2f}  "
            f"agreement {r['top1_agreement_with_float32']:.3f}  "
            f"decode {r['decode_tokens_per_s']:.2f} tok/s (x{ratio('decode_tokens_per_s'):.2f})  "
            f"prefill {r['prefill_tokens_per_s']:.1f} tok/s (x{ratio('prefill_tokens_per_s'):.2f})  "
            f"weights {r['weights_bytes'] / 2**20:.0f} MiB"
        )
    report = {"benchmark": "dtype", "model": MODEL, "runs": args.runs, "results": results}
    log(f"wrote {write_report(report, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
