"""Token selection: greedy, or seeded sampling with temperature / top-k / top-p / min-p,
and an optional repetition penalty. Everything stays on the device; the only host
sync per token is reading the chosen id."""

import random
from dataclasses import dataclass
from typing import Callable, Optional

import mlx.core as mx

from .errors import InvalidArgumentError


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token. temperature 0 means greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    repetition_context: int = 64
    seed: Optional[int] = None

    def validate(self) -> None:
        """Raise InvalidArgumentError naming the first bad field."""

        def bad(field: str, why: str):
            raise InvalidArgumentError(f"{field}={getattr(self, field)!r}: {why}")

        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                bad(name, "must be a number")
            if value != value or value in (float("inf"), float("-inf")):
                bad(name, "must be finite")
        for name in ("top_k", "repetition_context"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                bad(name, "must be an integer")
        if self.temperature < 0:
            bad("temperature", "must be >= 0 (0 means greedy)")
        if not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if self.top_k < 0:
            bad("top_k", "must be >= 0 (0 turns it off)")
        if not 0 <= self.min_p <= 1:
            bad("min_p", "must be in [0, 1]")
        if self.repetition_penalty <= 0:
            bad("repetition_penalty", "must be > 0 (1 turns it off)")
        if self.repetition_context < 1:
            bad("repetition_context", "must be >= 1")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            bad("seed", "must be an integer")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            bad("seed", "must be in [0, 2**63)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: mx.array, recent: list[int], penalty: float) -> mx.array:
    """CTRL-style penalty: shrink the logits of recently seen tokens."""
    if penalty == 1.0 or not recent:
        return logits
    ids = mx.array(sorted(set(recent)))
    picked = logits[:, ids]
    logits[:, ids] = mx.where(picked < 0, picked * penalty, picked / penalty)
    return logits


def _filter(logprobs: mx.array, params: SamplingParams) -> mx.array:
    """Set to -inf every token the top-k / top-p / min-p rules exclude."""
    neg_inf = mx.array(-float("inf"), logprobs.dtype)
    vocab = logprobs.shape[-1]
    if 0 < params.top_k < vocab:
        kth = mx.sort(logprobs, axis=-1)[:, vocab - params.top_k][:, None]
        logprobs = mx.where(logprobs < kth, neg_inf, logprobs)
    if params.min_p > 0:
        floor = logprobs.max(axis=-1, keepdims=True) + mx.log(mx.array(params.min_p))
        logprobs = mx.where(logprobs < floor, neg_inf, logprobs)
    if params.top_p < 1:
        order = mx.argsort(-logprobs, axis=-1)
        sorted_lp = mx.take_along_axis(logprobs, order, axis=-1)
        probs = mx.exp(sorted_lp)
        # Keep a token while the mass before it is still below top_p.
        before = mx.cumsum(probs, axis=-1) - probs
        sorted_lp = mx.where(before < params.top_p, sorted_lp, neg_inf)
        inverse = mx.argsort(order, axis=-1)
        logprobs = mx.take_along_axis(sorted_lp, inverse, axis=-1)
    return logprobs


class Sampler:
    """Picks tokens for one generation: greedy, or seeded sampling from the filtered distribution.

    A seeded sampler draws from its own key chain, so the same seed gives the same
    tokens whatever other sessions do in between.
    """

    def __init__(self, params: SamplingParams):
        self.params = params
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        self._key = mx.random.key(seed)

    def next_key(self) -> mx.array:
        self._key, draw = mx.random.split(self._key)
        return draw

    def adjusted(self, logits: mx.array, recent: list[int], mask: Optional[mx.array] = None) -> mx.array:
        """Logits (rows, vocab) in float32 after the repetition penalty, and -inf where `mask` is False."""
        adjusted = apply_repetition_penalty(logits.astype(mx.float32), recent, self.params.repetition_penalty)
        if mask is not None:
            adjusted = mx.where(mask, adjusted, mx.array(-float("inf"), mx.float32))
        return adjusted

    def logprobs(self, logits: mx.array, recent: list[int], mask: Optional[mx.array] = None) -> mx.array:
        """The normalized log-distribution sampling draws from: penalty, mask, temperature, then top-k / top-p / min-p."""
        scaled = self.adjusted(logits, recent, mask) / self.params.temperature
        scaled = scaled - mx.logsumexp(scaled, axis=-1, keepdims=True)
        kept = _filter(scaled, self.params)
        return kept - mx.logsumexp(kept, axis=-1, keepdims=True)

    def pick(self, logits: mx.array, recent: list[int], mask: Optional[mx.array] = None) -> mx.array:
        """The next token id as a (1,) array, lazily; only where `mask` is True, when given."""
        if self.params.greedy:
            return mx.argmax(self.adjusted(logits, recent, mask), axis=-1)
        return mx.random.categorical(self.logprobs(logits, recent, mask), key=self.next_key())


def make_sampler(params: SamplingParams) -> Callable[[mx.array, list[int]], mx.array]:
    """Return pick(logits (1, vocab), recent_token_ids) -> (1,) token id array, lazily."""
    return Sampler(params).pick
