"""Speculative decoding: drafters, and when drafting pays.

Two drafters propose the next few tokens of a session:
- prompt lookup: the tokens that followed the last n tokens (n from 4 down to 2)
  the last time they occurred anywhere in the session's history, which a
  resident session holds whole; an n-gram index keeps each lookup O(1) however
  long the history grows (and bounded in memory: LOOKUP_MAX_ENTRIES);
- a draft model sharing the target's tokenizer, with its own sink+window cache
  per session that follows the target's history by the same canonical block rule.

The target then checks all drafts in one forward pass (see decode.py). Whether
that pays depends on what a forward pass over k+1 tokens costs next to one token
on this backend and model: about k+1 times as much on a CPU, about the same on a
GPU. `ForwardCosts` measures that on the running backend, and `Policy` picks the
draft length that maximizes expected tokens per unit of cost from the acceptance
it has seen, or none.
"""

import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
from kakeya_protocol import params as rules

from .batch import forward_one
from .cache import CacheShape, SinkWindowCache
from .errors import InvalidArgumentError, ModelLoadError
from .rope import RopeSpec, layer_shifters, make_batchable

MODES = rules.SPECULATIVE_MODES
MAX_DRAFT_TOKENS = rules.MAX_DRAFT_TOKENS
LOOKUP_MAX_NGRAM = 4
LOOKUP_MIN_NGRAM = 2
# Most n-grams one session's prompt-lookup index holds (about 110 bytes each: under 30 MB);
# past it, only the n-grams of the newest history positions that fill half of it stay. The
# model sees only sink + window tokens, so what followed an n-gram tens of thousands of
# tokens back is rarely what it writes now.
LOOKUP_MAX_ENTRIES = 1 << 18
_NGRAM_LENGTHS = LOOKUP_MAX_NGRAM - LOOKUP_MIN_NGRAM + 1  # each position ends at most this many n-grams


def check_mode(mode, num_draft_tokens, has_draft_model: bool) -> None:
    """Raise InvalidArgumentError naming the field for a bad speculative choice (the shared rules)."""
    for name, value in (("speculative", mode), ("num_draft_tokens", num_draft_tokens)):
        if value is not None and rules.problem(name, value):
            raise InvalidArgumentError(rules.explain(name, value))
    if mode == "draft" and not has_draft_model:
        raise InvalidArgumentError(
            "speculative='draft' needs a draft model, and this engine has none (start it with --draft-model)"
        )


class PromptLookup:
    """An n-gram index over a session's growing (and occasionally cut back) history."""

    def __init__(self):
        self._last_end: dict[tuple, int] = {}  # n-gram -> where its last occurrence in the history ends
        self._indexed = 0  # n-grams ending before this position are indexed

    def _catch_up(self, history: list[int]) -> None:
        if self._indexed > len(history):
            self._indexed = len(history)  # cut back: stale entries are checked at lookup
        # Positions older than a full index's worth would be trimmed at once: skip them.
        for end in range(max(self._indexed, len(history) - LOOKUP_MAX_ENTRIES // _NGRAM_LENGTHS), len(history)):
            for n in range(LOOKUP_MIN_NGRAM, LOOKUP_MAX_NGRAM + 1):
                if end + 1 >= n:
                    self._last_end[tuple(history[end + 1 - n : end + 1])] = end
        self._indexed = len(history)
        if len(self._last_end) > LOOKUP_MAX_ENTRIES:
            # At most half the cap stays, so the next trim is many steps away.
            horizon = self._indexed - LOOKUP_MAX_ENTRIES // (2 * _NGRAM_LENGTHS)
            self._last_end = {k: v for k, v in self._last_end.items() if v >= horizon}

    def propose(self, history: list[int], next_token: int, k: int) -> list[int]:
        """Up to k tokens that followed the longest earlier occurrence of the last n tokens of
        history + [next_token] (the history is read in place: a step costs the same however long it is)."""
        self._catch_up(history)
        length = len(history)
        for n in range(LOOKUP_MAX_NGRAM, LOOKUP_MIN_NGRAM - 1, -1):
            if length < n:
                continue
            key = (*history[length - n + 1 :], next_token)
            end = self._last_end.get(key)
            if end is None or end >= length or tuple(history[end + 1 - n : end + 1]) != key:
                continue
            follow = history[end + 1 : end + 1 + k]
            return follow + [next_token] if len(follow) < k else follow
        return []


class DraftModel:
    """A small model sharing the target's tokenizer, drafting greedily on its own caches."""

    def __init__(self, loaded, shape: CacheShape):
        self.loaded = loaded
        self.model: nn.Module = loaded.model
        self.shape = shape
        self.ropes: list[RopeSpec] = layer_shifters(loaded.model, shape.bound)
        make_batchable(loaded.model, shape.bound)

    def new_cache(self) -> SinkWindowCache:
        return SinkWindowCache(self.shape, self.ropes)


def check_draft_model(target, draft, shape: CacheShape) -> None:
    """Raise ModelLoadError naming why `draft` cannot draft for `target`."""
    name = draft.name
    t_tok, d_tok = target.tokenizer, draft.tokenizer
    if t_tok.vocab_size != d_tok.vocab_size or t_tok.get_vocab() != d_tok.get_vocab():
        raise ModelLoadError(
            f"draft model {name} has another tokenizer (vocabulary of {d_tok.vocab_size} tokens, "
            f"the target's has {t_tok.vocab_size} or differs); a draft model must share the target's tokenizer"
        )
    for what in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(t_tok, what, None) != getattr(d_tok, what, None):
            raise ModelLoadError(
                f"draft model {name} has {what}={getattr(d_tok, what, None)!r}, the target "
                f"{getattr(t_tok, what, None)!r}; special token ids must match"
            )
    if draft.max_position_embeddings < shape.bound:
        raise ModelLoadError(
            f"draft model {name} was trained on {draft.max_position_embeddings} positions, fewer than "
            f"sink + window + block = {shape.bound}; choose a smaller window or another draft model"
        )


class ForwardCosts:
    """What one forward pass over n tokens costs next to one token, on this backend and model."""

    def __init__(self, ratios: dict[int, float]):
        self.ratios = ratios

    def ratio(self, n: int) -> float:
        if n in self.ratios:
            return self.ratios[n]
        known = sorted(self.ratios)
        below = max((m for m in known if m <= n), default=known[0])
        above = min((m for m in known if m >= n), default=known[-1])
        if below == above:
            return self.ratios[below] * n / below
        w = (n - below) / (above - below)
        return self.ratios[below] * (1 - w) + self.ratios[above] * w

    @classmethod
    def measure(cls, model: nn.Module, shape: CacheShape, ropes: list[RopeSpec], vocab: int, ns: Sequence[int]):
        """Time forward passes over n tokens on a scratch cache (runs on the compute thread)."""
        cache = SinkWindowCache(shape, ropes)
        context = min(shape.block * 2, shape.committed_limit)
        prompt = [(7 * i) % max(vocab - 1, 1) + 1 for i in range(context)]
        mx.eval(forward_one(model, cache.layers, prompt[: shape.block]))
        base = cache.layers[0].offset
        times = {}
        for n in sorted(set([1, *ns])):
            best = float("inf")
            for _ in range(3):
                for layer in cache.layers:
                    layer.offset = base
                t0 = time.perf_counter()
                mx.eval(forward_one(model, cache.layers, prompt[:n]))
                best = min(best, time.perf_counter() - t0)
            times[n] = best
        return cls({n: t / times[1] for n, t in times.items()})


@dataclass
class Policy:
    """Per session and drafter: the acceptance seen so far, and the draft length it makes worth it."""

    accepted: float = 1.0  # decayed counts of accepted and rejected drafts (a weak prior of 1:1)
    rejected: float = 1.0
    plain_steps: int = 0  # since the last probe, while drafting did not pay
    probe_every: int = 16

    @property
    def acceptance(self) -> float:
        return self.accepted / (self.accepted + self.rejected)

    def record(self, drafted: int, accepted: int) -> None:
        decay = 0.9**drafted
        self.accepted = self.accepted * decay + accepted
        self.rejected = self.rejected * decay + (1 if accepted < drafted else 0)

    def choose(self, k_max: int, costs: ForwardCosts, draft_cost: float, forced: bool) -> int:
        """Draft length with the best expected tokens per unit of cost; 0 when none beats plain decoding.

        `draft_cost` is one drafted token's cost next to one target token (0 for
        prompt lookup). A forced drafter always drafts at least one token.
        """
        if k_max < 1:
            return 0
        alpha = min(self.acceptance, 0.999)
        best_k, best = 0, 1.0
        for k in range(1, k_max + 1):
            expected = (1 - alpha ** (k + 1)) / (1 - alpha)
            gain = expected / (costs.ratio(k + 1) + k * draft_cost)
            if gain > best:
                best_k, best = k, gain
        if forced:
            return max(best_k, 1)
        if best_k:
            self.plain_steps, self.probe_every = 0, 16
            return best_k
        # Not paying now; probe now and then, since acceptance changes with the text.
        ceiling = max((k + 1) / (costs.ratio(k + 1) + k * draft_cost) for k in range(1, k_max + 1))
        if ceiling <= 1.0:
            return 0  # it cannot pay on this backend even if every draft were accepted
        self.plain_steps += 1
        if self.plain_steps >= self.probe_every:
            self.plain_steps, self.probe_every = 0, min(self.probe_every * 2, 512)
            return 1
        return 0


@dataclass
class Speculation:
    """A session's speculative state, kept across its turns.

    `draft` is a Session on the draft model whose history is the target
    session's own history list, so it always reads the same tokens.
    """

    lookup: PromptLookup = field(default_factory=PromptLookup)
    draft: Optional[object] = None
    policies: dict = field(default_factory=lambda: {"prompt_lookup": Policy(), "draft": Policy()})


@dataclass
class SpecContext:
    """What every turn shares: the daemon's defaults, the draft model, and measured costs."""

    mode: str = "auto"
    num_draft_tokens: int = 4
    draft: Optional[DraftModel] = None
    costs: Optional[ForwardCosts] = None
    draft_cost: float = 0.0  # one draft-model token next to one target token

    def measure(self, target: nn.Module, shape: CacheShape, ropes: list[RopeSpec], vocab: int) -> None:
        """Measure forward costs once, on the compute thread, the first time a turn may speculate."""
        if self.costs is not None:
            return
        ns = range(1, MAX_DRAFT_TOKENS + 2)
        self.costs = ForwardCosts.measure(target, shape, ropes, vocab, [n for n in ns if n in (1, 2, 3, 5, 9, 17)])
        if self.draft is not None:
            t_target = _one_token_seconds(target, shape, ropes, vocab)
            t_draft = _one_token_seconds(self.draft.model, shape, self.draft.ropes, vocab)
            self.draft_cost = t_draft / t_target


def _one_token_seconds(model: nn.Module, shape: CacheShape, ropes: list[RopeSpec], vocab: int) -> float:
    cache = SinkWindowCache(shape, ropes)
    mx.eval(forward_one(model, cache.layers, [1 % vocab] * shape.block))
    best = float("inf")
    for _ in range(3):
        for layer in cache.layers:
            layer.offset = shape.block
        t0 = time.perf_counter()
        mx.eval(forward_one(model, cache.layers, [2 % vocab]))
        best = min(best, time.perf_counter() - t0)
    return best
