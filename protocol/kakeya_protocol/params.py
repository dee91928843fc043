"""Generation parameters: one rule set (types, ranges, defaults) for every front and the engine.

The socket codec checks `generate` requests with these rules, the HTTP fronts map
their bodies onto them, and the engine's `SamplingParams.validate` uses them, so
a value means the same thing, and is refused with the same words, wherever it
comes from. The ranges are what the sampler computes correctly in float32.
Plain data and functions; the engine may import this module (and only this one)
of the protocol package.

Which sampling a generate gets when it leaves a field out is one rule too
(`resolve_sampling`): the request's own value wins, then the model's
(`model_sampling`: its generation_config.json), then DEFAULT_SAMPLING. A request
that asks temperature 0 decodes greedily with only the fields it gives itself.
A rule's `default` is the value that turns its field off: what the engine uses
for a field nothing sets.
"""

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

from .quote import quote

# One default for the socket, the CLI and the HTTP front (capped by the server's max_new_tokens).
DEFAULT_MAX_TOKENS = 256
MAX_STOP_SEQUENCES = 16
SEED_LIMIT = 2**63
# A temperature below this decodes greedily: dividing logits by a smaller one
# overflows float32 and sampling would degenerate (vLLM draws the same line).
GREEDY_TEMPERATURE = 1e-5
# Keeps penalised logits (x * p or x / p) far from float32 overflow and underflow.
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 100.0
MAX_TOP_K = 2**31 - 1
# How many of the session's most recent history tokens repetition_penalty looks at.
REPETITION_CONTEXT = 64
# OpenAI's range for frequency_penalty and presence_penalty.
MAX_OCCURRENCE_PENALTY = 2.0
# Most alternatives a token's log probabilities may list (OpenAI's limit).
MAX_TOP_LOGPROBS = 20
# Speculative decoding: off, auto (drafts when it measurably pays), or a named drafter.
SPECULATIVE_MODES = ("off", "auto", "prompt_lookup", "draft")
MAX_DRAFT_TOKENS = 16


def python_type_name(value: Any) -> str:
    return type(value).__name__


@dataclass(frozen=True)
class Rule:
    """One numeric parameter: integer or any finite number, an inclusive range (low may be open), a default."""

    name: str
    integer: bool
    default: Any
    low: float
    high: Optional[float] = None
    low_open: bool = False
    note: str = ""

    def range_text(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {_number(self.low)}"
        return f"in {'(' if self.low_open else '['}{_number(self.low)}, {_number(self.high)}]"

    def problem(self, value: Any, type_name: Callable[[Any], str] = python_type_name) -> Optional[str]:
        """Why `value` breaks this rule ("must be ..."), or None when it is fine."""
        is_int = isinstance(value, int) and not isinstance(value, bool)
        if self.integer and not is_int:
            return f"must be an integer, got {type_name(value)}"
        if not (is_int or isinstance(value, float)):
            return f"must be a number, got {type_name(value)}"
        if isinstance(value, float) and not math.isfinite(value):
            return "must be finite"
        too_low = value <= self.low if self.low_open else value < self.low
        if too_low or (self.high is not None and value > self.high):
            return f"must be {self.range_text()}" + (f" ({self.note})" if self.note else "")
        return None


def _number(x: float) -> str:
    return {SEED_LIMIT - 1: "2**63 - 1", MAX_TOP_K: "2**31 - 1"}.get(x, f"{x:g}")


RULES: dict[str, Rule] = {
    r.name: r
    for r in (
        Rule("max_tokens", True, DEFAULT_MAX_TOKENS, 1, note="and at most the server's max_new_tokens"),
        Rule("temperature", False, 0.0, 0, 2, note=f"0 decodes greedily, as does anything below {GREEDY_TEMPERATURE:g}"),
        Rule("top_p", False, 1.0, 0, 1, low_open=True, note="1 turns it off"),
        Rule("top_k", True, 0, 0, MAX_TOP_K, note="0 turns it off"),
        Rule("min_p", False, 0.0, 0, 1, note="0 turns it off"),
        Rule(
            "repetition_penalty",
            False,
            1.0,
            MIN_REPETITION_PENALTY,
            MAX_REPETITION_PENALTY,
            note="1 turns it off",
        ),
        Rule(
            "frequency_penalty",
            False,
            0.0,
            -MAX_OCCURRENCE_PENALTY,
            MAX_OCCURRENCE_PENALTY,
            note="subtracted from a token's logit once per time this turn generated it; 0 turns it off",
        ),
        Rule(
            "presence_penalty",
            False,
            0.0,
            -MAX_OCCURRENCE_PENALTY,
            MAX_OCCURRENCE_PENALTY,
            note="subtracted from the logit of every token this turn generated; 0 turns it off",
        ),
        Rule("seed", True, None, 0, SEED_LIMIT - 1),
        Rule("top_logprobs", True, 0, 0, MAX_TOP_LOGPROBS, note="alternatives listed per token, with logprobs"),
        Rule("num_draft_tokens", True, None, 1, MAX_DRAFT_TOKENS, note="the most tokens drafted per step"),
    )
}
SAMPLING_NAMES = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "frequency_penalty",
    "presence_penalty",
    "seed",
)


def problem(name: str, value: Any, type_name: Callable[[Any], str] = python_type_name) -> Optional[str]:
    """Why generation parameter `name` cannot be `value` ("must be ..."), or None."""
    if name == "stop":
        return stop_problem(value, type_name)
    if name == "speculative":
        return speculative_problem(value, type_name)
    return RULES[name].problem(value, type_name)


def speculative_problem(value: Any, type_name: Callable[[Any], str] = python_type_name) -> Optional[str]:
    if not isinstance(value, str):
        return f"must be a string, got {type_name(value)}"
    if value not in SPECULATIVE_MODES:
        return f"must be one of {', '.join(SPECULATIVE_MODES)}"
    return None


def explain(name: str, value: Any, type_name: Callable[[Any], str] = python_type_name) -> Optional[str]:
    """The error message for a bad value, naming the field and the rule ("top_p=0: must be in (0, 1] ..."), or None."""
    why = problem(name, value, type_name)
    if why is None:
        return None
    if why.startswith("["):  # an element of a list: "stop[2]=...: ..."
        return name + why
    return f"{name}={quote(value)}: {why}"


def stop_problem(value: Any, type_name: Callable[[Any], str] = python_type_name) -> Optional[str]:
    if not isinstance(value, list):
        return f"must be an array of strings, got {type_name(value)}"
    if len(value) > MAX_STOP_SEQUENCES:
        return f"has {len(value)} entries; at most {MAX_STOP_SEQUENCES} are allowed"
    for i, s in enumerate(value):
        if not isinstance(s, str) or not s:
            return f"[{i}]={quote(s)}: must be a non-empty string"
    return None


# Sampling for a generate that does not say, where the model's generation_config.json
# does not either. Greedy decoding with no penalty made small chat models loop
# (SmolLM2 repeating a phrase until stopped); the top-p, top-k and repetition penalty
# are the kind local runners default to (Ollama, LM Studio), and the temperature is
# lower than their 0.8 because small models lose facts when sampled hot: on SmolLM2's
# chat answers to short factual questions (tools/bench_sampling.py, recorded in
# docs/bench_sampling.json) 0.4 kept 25 of 36 right and 0.7 only 20, none looping.
DEFAULT_SAMPLING = {"temperature": 0.4, "top_p": 0.9, "top_k": 40, "min_p": 0.0, "repetition_penalty": 1.1}
DEFAULTED_NAMES = tuple(DEFAULT_SAMPLING)


def model_sampling(generation_config: Any) -> tuple[dict, list[str]]:
    """The sampling defaults a model's generation_config.json gives, and why any of its values were dropped.

    `do_sample: false` makes the model's default greedy (temperature 0; its top-p /
    top-k do not apply, as in transformers); a value outside the rules is dropped.
    """
    if not isinstance(generation_config, dict):
        return {}, []
    found, dropped = {}, []
    greedy = generation_config.get("do_sample") is False
    for name in DEFAULTED_NAMES:
        value = generation_config.get(name)
        if value is None or (greedy and name != "repetition_penalty"):
            continue
        if name == "top_k" and isinstance(value, float) and value.is_integer():
            value = int(value)
        why = problem(name, value)
        if why is None:
            found[name] = value
        else:
            dropped.append(f"{name}={quote(value)}: {why}")
    if greedy:
        found["temperature"] = 0.0
    return found, dropped


def sampling_defaults(model: dict) -> tuple[dict, dict]:
    """(values, sources): for each defaulted field, the model's value ("model") else DEFAULT_SAMPLING's ("default")."""
    values = {name: model.get(name, DEFAULT_SAMPLING[name]) for name in DEFAULTED_NAMES}
    sources = {name: "model" if name in model else "default" for name in DEFAULTED_NAMES}
    return values, sources


def resolve_sampling(requested: dict, defaults: dict) -> dict:
    """The sampling fields a generate gets: the request's own, the `defaults` where it gives none.

    A request that asks for temperature 0 (greedy) gets only its own fields: the
    defaults' filters and penalty do not apply to it.
    """
    given = {name: requested[name] for name in SAMPLING_NAMES if requested.get(name) is not None}
    if "temperature" in given and is_greedy(given["temperature"]):
        return given
    return {**defaults, **given}


def default_max_tokens(max_new_tokens: int) -> int:
    """max_tokens when a request leaves it out: DEFAULT_MAX_TOKENS, or the server's limit if lower."""
    return min(DEFAULT_MAX_TOKENS, max_new_tokens)


def is_greedy(temperature: float) -> bool:
    return temperature < GREEDY_TEMPERATURE
