"""Constrained-decoding benchmark: what a token mask costs next to a decode step, in one run.

    python -m tools.bench_constrain [--out results/bench_constrain.json]

For JSON-schema constraints of realistic size, with the tokenizers of SmolLM2-135M-Instruct
(vocab 49152) and of the tiny test model (vocab 640), it measures through
kakeya_mlx.constrain (llguidance underneath):
- the one-off costs: building the tokenizer view, compiling each schema;
- the per-token cost: `allowed_mask()` (evaluated) + `accept()`, over the tokens of a
  valid instance, as mean / p50 / p99;
and, in the same run, a SmolLM2 bf16 decode step on this machine, plain and constrained
(forward + mask + argmax + accept), so the printed ratios are side by side.
If xgrammar is importable (it needs torch, so it is not a dependency), the same per-token
and compile costs are measured for it too, as the comparison that chose the library.
"""

import argparse
import importlib.util
import json
import statistics
import sys
import time

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache
from tokenizers import Tokenizer

from kakeya_mlx import platform
from kakeya_mlx.constrain import Constrainer, tokenizer_json_of
from kakeya_mlx.loader import load_model
from tools.make_test_model import EOS_TOKEN, trained_tokenizer_json
from tools.report import write_report

ADDRESS = {
    "type": "object",
    "properties": {
        "street": {"type": "string"},
        "city": {"type": "string"},
        "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
        "country": {"type": "string", "enum": ["US", "DE", "FR", "JP"]},
    },
    "required": ["street", "city", "zip", "country"],
    "additionalProperties": False,
}
ORDER = {
    "$defs": {
        "address": ADDRESS,
        "item": {
            "type": "object",
            "properties": {
                "sku": {"type": "string"},
                "qty": {"type": "integer", "minimum": 1, "maximum": 100},
                "price": {"type": "number"},
                "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
            },
            "required": ["sku", "qty", "price"],
            "additionalProperties": False,
        },
    },
    "type": "object",
    "properties": {
        "order_id": {"type": "string"},
        "customer": {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "email": {"type": "string", "format": "email"},
                "vip": {"type": "boolean"},
            },
            "required": ["name", "email"],
        },
        "shipping": {"$ref": "#/$defs/address"},
        "billing": {"anyOf": [{"$ref": "#/$defs/address"}, {"type": "null"}]},
        "items": {"type": "array", "items": {"$ref": "#/$defs/item"}, "minItems": 1, "maxItems": 20},
        "status": {"enum": ["pending", "paid", "shipped"]},
        "note": {"type": "string", "maxLength": 200},
    },
    "required": ["order_id", "customer", "shipping", "items", "status"],
    "additionalProperties": False,
}
ORDER_INSTANCE = {
    "order_id": "A-1029",
    "customer": {"name": "Ada Lovelace", "email": "ada@example.com", "vip": True},
    "shipping": {"street": "12 Analytical Way", "city": "London", "zip": "01234", "country": "DE"},
    "billing": None,
    "items": [
        {"sku": "ENG-1", "qty": 2, "price": 19.99, "tags": ["gear", "brass"]},
        {"sku": "CARD-7", "qty": 40, "price": 0.5},
    ],
    "status": "paid",
    "note": "Leave at the door, please.",
}


def _call(name: str, parameters: dict) -> dict:
    return {
        "type": "object",
        "properties": {"name": {"const": name}, "arguments": parameters},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


TOOL_CALL = {
    "anyOf": [
        _call(
            "get_weather",
            {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
                "required": ["city"],
            },
        ),
        _call(
            "search_web",
            {
                "type": "object",
                "properties": {
                    "query": {"type": "string"},
                    "max_results": {"type": "integer", "minimum": 1, "maximum": 50},
                },
                "required": ["query"],
            },
        ),
        _call(
            "send_email",
            {
                "type": "object",
                "properties": {
                    "to": {"type": "array", "items": {"type": "string", "format": "email"}},
                    "subject": {"type": "string"},
                    "body": {"type": "string"},
                },
                "required": ["to", "subject", "body"],
            },
        ),
    ]
}
TOOL_CALL_INSTANCE = {
    "name": "send_email",
    "arguments": {"to": ["bob@example.org"], "subject": "Lunch", "body": "Noon at the usual place?"},
}

CASES = {
    "order (nested, $ref, anyOf, enum, pattern, format)": (
        {"type": "json_schema", "schema": ORDER, "strict": True},
        ORDER_INSTANCE,
    ),
    "tool call (anyOf of 3 functions)": (
        {"type": "json_schema", "schema": TOOL_CALL, "strict": True},
        TOOL_CALL_INSTANCE,
    ),
    "json_object": ({"type": "json_object"}, ORDER_INSTANCE),
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _summary(seconds: list[float]) -> dict:
    ordered = sorted(seconds)
    return {
        "mean_us": statistics.mean(seconds) * 1e6,
        "p50_us": ordered[len(ordered) // 2] * 1e6,
        "p99_us": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e6,
        "tokens": len(seconds),
    }


def ours_costs(tokenizer_json: str, eos_ids: list[int], width: int, repeats: int) -> dict:
    t0 = time.perf_counter()
    constrainer = Constrainer(tokenizer_json, eos_ids, width)
    out = {"tokenizer_build_ms": (time.perf_counter() - t0) * 1e3, "cases": {}}
    for name, (spec, instance) in CASES.items():
        t0 = time.perf_counter()
        constraint = constrainer.compile(spec)
        compile_ms = (time.perf_counter() - t0) * 1e3
        ids = constrainer.tokenize(json.dumps(instance))
        times = []
        for r in range(repeats + 1):
            matcher = constrainer.matcher(constraint)
            for token in ids:
                t0 = time.perf_counter()
                mx.eval(matcher.allowed_mask())
                matcher.accept(token)
                if r:  # the first pass warms up
                    times.append(time.perf_counter() - t0)
            assert matcher.is_finished(), name
        out["cases"][name] = {"compile_ms": compile_ms, "per_token": _summary(times)}
    return out


def xgrammar_costs(tokenizer_json: str, eos_ids: list[int], repeats: int) -> dict | None:
    """The same cases through xgrammar, where it is installed (it is not a dependency)."""
    if importlib.util.find_spec("xgrammar") is None:
        return None
    t0 = time.perf_counter()
    import xgrammar
    from transformers import PreTrainedTokenizerFast

    import_s = time.perf_counter() - t0
    pulls = sorted(m for m in ("torch", "transformers") if m in sys.modules)
    hf = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tokenizer_json))
    t0 = time.perf_counter()
    info = xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=len(hf), stop_token_ids=eos_ids)
    compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    out = {
        "version": xgrammar.__version__ if hasattr(xgrammar, "__version__") else "?",
        "import_s": import_s,
        "import_pulls_in": pulls,
        "tokenizer_build_ms": (time.perf_counter() - t0) * 1e3,
        "cases": {},
    }
    for name, (spec, instance) in CASES.items():
        t0 = time.perf_counter()
        if spec["type"] == "json_object":
            compiled = compiler.compile_builtin_json_grammar()
        else:
            compiled = compiler.compile_json_schema(json.dumps(spec["schema"]), strict_mode=spec["strict"])
        compile_ms = (time.perf_counter() - t0) * 1e3
        ids = hf.encode(json.dumps(instance))
        bitmask = xgrammar.allocate_token_bitmask(1, info.vocab_size)
        times = []
        for r in range(repeats + 1):
            matcher = xgrammar.GrammarMatcher(compiled)
            for token in ids:
                t0 = time.perf_counter()
                matcher.fill_next_token_bitmask(bitmask)
                accepted = matcher.accept_token(token)
                if r:
                    times.append(time.perf_counter() - t0)
                assert accepted, name
        out["cases"][name] = {"compile_ms": compile_ms, "per_token": _summary(times)}
    return out


def decode_steps(loaded, constrainer: Constrainer, steps: int, rounds: int) -> dict:
    """Median ms per decode step, plain and under the tool-call schema.

    The two decodes advance in lockstep, one step each in turn, so load from other work
    on the machine falls on both alike.
    """
    constraint = constrainer.compile(CASES["tool call (anyOf of 3 functions)"][0])
    prompt = loaded.tokenizer.encode("Write an email to Bob about lunch. Reply with a tool call.")
    times: dict[str, list[float]] = {"plain": [], "constrained": []}

    def start():
        cache = make_prompt_cache(loaded.model)
        logits = loaded.model(mx.array([prompt]), cache=cache)[:, -1, :]
        mx.eval(logits)
        return {"cache": cache, "logits": logits}

    def step(state, matcher) -> float | None:
        """Seconds one decode step took; None once the constraint is complete."""
        t0 = time.perf_counter()
        logits = state["logits"]
        if matcher is not None:
            logits = mx.where(matcher.allowed_mask(), logits, -mx.inf)
        token = int(mx.argmax(logits, axis=-1).item())
        if matcher is not None:
            matcher.accept(token)
            if matcher.is_finished():
                return None
        state["logits"] = loaded.model(mx.array([[token]]), cache=state["cache"])[:, -1, :]
        mx.eval(state["logits"])
        return time.perf_counter() - t0

    for i in range(rounds + 1):  # round 0 warms up
        plain, constrained, matcher = start(), start(), constrainer.matcher(constraint)
        for _ in range(steps):
            plain_s, constrained_s = step(plain, None), step(constrained, matcher)
            if constrained_s is None:
                break
            if i:
                times["plain"].append(plain_s)
                times["constrained"].append(constrained_s)
        if not i:
            continue
        log(
            f"decode round {i}: plain {statistics.median(times['plain']) * 1e3:.1f} ms/step, "
            f"constrained {statistics.median(times['constrained']) * 1e3:.1f} ms/step"
        )
    return {
        "plain_step_ms": statistics.median(times["plain"]) * 1e3,
        "constrained_step_ms": statistics.median(times["constrained"]) * 1e3,
        "steps_timed": [len(times["plain"]), len(times["constrained"])],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=20, help="passes over each instance's tokens")
    p.add_argument("--decode-steps", type=int, default=24, help="decode steps per round")
    p.add_argument("--decode-rounds", type=int, default=3, help="alternating plain/constrained rounds")
    p.add_argument("--out", default="results/bench_constrain.json", help="where to write the JSON results")
    args = p.parse_args(argv)

    log("loading smollm2 (bfloat16) ...")
    loaded = load_model("smollm2", dtype="bfloat16", progress=log)
    smol_json = tokenizer_json_of(loaded)
    tiny_json = trained_tokenizer_json()
    tiny_eos = [json.loads(tiny_json)["model"]["vocab"][EOS_TOKEN]]
    tiny_width = len(json.loads(tiny_json)["model"]["vocab"])
    log("mask costs through kakeya_mlx.constrain (llguidance) ...")
    tokenizers = {
        f"{loaded.name} (vocab {loaded.vocab_size})": ours_costs(
            smol_json, loaded.eos_token_ids, loaded.vocab_size, args.repeats
        ),
        f"tiny test model (vocab {tiny_width})": ours_costs(tiny_json, tiny_eos, tiny_width, args.repeats),
    }
    log("decode steps, plain and constrained ...")
    decode = decode_steps(loaded, Constrainer.for_model(loaded), args.decode_steps, args.decode_rounds)
    step_us = decode["plain_step_ms"] * 1e3
    for costs in tokenizers.values():
        for case in costs["cases"].values():
            case["mask_over_decode_step"] = case["per_token"]["mean_us"] / step_us
    decode["constrained_over_plain"] = decode["constrained_step_ms"] / decode["plain_step_ms"]
    log("xgrammar, if installed ...")
    xgrammar = {
        name: xgrammar_costs(text, eos, args.repeats)
        for name, text, eos in [
            (list(tokenizers)[0], smol_json, loaded.eos_token_ids),
            (list(tokenizers)[1], tiny_json, tiny_eos),
        ]
    }
    import llguidance

    result = {
        "llguidance": llguidance.__version__,
        "decode_model": loaded.name,
        "decode_dtype": loaded.dtype,
        "decode": decode,
        "ours": tokenizers,
        "xgrammar": xgrammar if any(xgrammar.values()) else None,
    }
    out = write_report(result, args.out)

    print(
        f"backend {platform.backend()}; decode model {loaded.name} ({loaded.dtype}); llguidance {result['llguidance']}"
    )
    print(
        f"decode step: plain {decode['plain_step_ms']:.1f} ms, constrained {decode['constrained_step_ms']:.1f} ms "
        f"-> ratio {decode['constrained_over_plain']:.3f}"
    )
    for tok_name, costs in tokenizers.items():
        print(f"{tok_name}: tokenizer view built in {costs['tokenizer_build_ms']:.0f} ms")
        for case_name, case in costs["cases"].items():
            pt = case["per_token"]
            line = (
                f"  {case_name}: compile {case['compile_ms']:.1f} ms; mask+accept mean {pt['mean_us']:.1f} us "
                f"(p99 {pt['p99_us']:.0f} us) = {case['mask_over_decode_step']:.2e} of a decode step"
            )
            other = (xgrammar.get(tok_name) or {}).get("cases", {}).get(case_name)
            if other:
                line += (
                    f"; xgrammar compile {other['compile_ms']:.1f} ms, per token {other['per_token']['mean_us']:.1f} us"
                )
            print(line)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
