"""Token selection: greedy, or seeded sampling with temperature / top-k / top-p / min-p,
and optional repetition, frequency and presence penalties. Everything stays on the
device; the only host sync per token is reading the chosen id."""

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable, Optional

import mlx.core as mx
import numpy as np
from kakeya_protocol import params as rules

from .errors import InvalidArgumentError


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token. temperature 0 (or below rules.GREEDY_TEMPERATURE) means greedy.

    The types, ranges and defaults are the protocol's generation-parameter rules
    (kakeya_protocol.params), shared with the socket codec and the HTTP front.
    """

    temperature: float = rules.RULES["temperature"].default
    top_p: float = rules.RULES["top_p"].default
    top_k: int = rules.RULES["top_k"].default
    min_p: float = rules.RULES["min_p"].default
    repetition_penalty: float = rules.RULES["repetition_penalty"].default
    repetition_context: int = rules.REPETITION_CONTEXT
    frequency_penalty: float = rules.RULES["frequency_penalty"].default
    presence_penalty: float = rules.RULES["presence_penalty"].default
    seed: Optional[int] = None

    def validate(self) -> None:
        """Raise InvalidArgumentError naming the first bad field and its range."""
        for name in rules.SAMPLING_NAMES:
            value = getattr(self, name)
            if name == "seed" and value is None:
                continue
            message = rules.explain(name, value)
            if message is not None:
                raise InvalidArgumentError(message)
        context = self.repetition_context
        if isinstance(context, bool) or not isinstance(context, int) or context < 1:
            raise InvalidArgumentError(f"repetition_context={context!r}: must be an integer >= 1")

    @property
    def greedy(self) -> bool:
        return rules.is_greedy(self.temperature)


def apply_repetition_penalty(logits: mx.array, recent: list[int], penalty: float) -> mx.array:
    """CTRL-style penalty: shrink the logits of recently seen tokens."""
    if penalty == 1.0 or not recent:
        return logits
    ids = mx.array(sorted(set(recent)))
    picked = logits[:, ids]
    penalty = float(penalty)
    logits[:, ids] = mx.where(picked < 0, picked * penalty, picked / penalty)
    return logits


def apply_occurrence_penalties(
    logits: mx.array, generated: Sequence[int], frequency: float, presence: float
) -> mx.array:
    """OpenAI's penalties: each logit minus frequency x the token's count in `generated`, minus presence if there."""
    if (frequency == 0 and presence == 0) or not generated:
        return logits
    ids, counts = np.unique(np.asarray(generated, dtype=np.int64), return_counts=True)
    return logits.at[:, mx.array(ids)].add(-mx.array(counts * float(frequency) + float(presence), mx.float32))


def _filter(logprobs: mx.array, params: SamplingParams) -> mx.array:
    """Set to -inf every token the top-k / top-p / min-p rules exclude."""
    neg_inf = mx.array(-float("inf"), logprobs.dtype)
    vocab = logprobs.shape[-1]
    if 0 < params.top_k < vocab:
        kth = mx.sort(logprobs, axis=-1)[:, vocab - params.top_k][:, None]
        logprobs = mx.where(logprobs < kth, neg_inf, logprobs)
    if params.min_p > 0:
        floor = logprobs.max(axis=-1, keepdims=True) + mx.log(mx.array(float(params.min_p)))
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

    def adjusted(
        self, logits: mx.array, recent: list[int], mask: Optional[mx.array] = None, generated: Sequence[int] = ()
    ) -> mx.array:
        """Logits (rows, vocab) in float32 after the penalties, and -inf where `mask` is False.

        `recent` is what repetition_penalty looks at (the history's last tokens);
        `generated` what frequency_penalty and presence_penalty count (this turn's tokens so far).
        """
        p = self.params
        adjusted = apply_repetition_penalty(logits.astype(mx.float32), recent, p.repetition_penalty)
        adjusted = apply_occurrence_penalties(adjusted, generated, p.frequency_penalty, p.presence_penalty)
        if mask is not None:
            adjusted = mx.where(mask, adjusted, mx.array(-float("inf"), mx.float32))
        return adjusted

    def logprobs(
        self, logits: mx.array, recent: list[int], mask: Optional[mx.array] = None, generated: Sequence[int] = ()
    ) -> mx.array:
        """The normalized log-distribution sampling draws from: penalties, mask, temperature, top-k / top-p / min-p."""
        scaled = self.adjusted(logits, recent, mask, generated) / float(self.params.temperature)
        scaled = scaled - mx.logsumexp(scaled, axis=-1, keepdims=True)
        kept = _filter(scaled, self.params)
        return kept - mx.logsumexp(kept, axis=-1, keepdims=True)

    def pick(
        self, logits: mx.array, recent: list[int], mask: Optional[mx.array] = None, generated: Sequence[int] = ()
    ) -> mx.array:
        """The next token id as a (1,) array, lazily; only where `mask` is True, when given."""
        if self.params.greedy:
            return mx.argmax(self.adjusted(logits, recent, mask, generated), axis=-1)
        return mx.random.categorical(self.logprobs(logits, recent, mask, generated), key=self.next_key())


def make_sampler(params: SamplingParams) -> Callable[[mx.array, list[int]], mx.array]:
    """Return pick(logits (1, vocab), recent_token_ids) -> (1,) token id array, lazily."""
    return Sampler(params).pick
