"""One generate turn of one session, stepped by the scheduler on the compute thread.

A turn first runs the session's pending history through the model (prefill, in
block-aligned pieces the scheduler interleaves with other sessions' decoding),
then decodes: each step the scheduler feeds the turn's next token to the model,
batched with other turns, and hands back the logits that follow it.

Tokens are released only once final (see textstream.py). When a stop string is
found, the tokens that overlap it leave the history and the cache again, and the
text before the stop is re-tokenized into the history, so the history holds
exactly the text that was streamed. A full tail is committed only when more tokens
must go in, so those tokens are normally still in the uncommitted tail; if a
commit had to happen while text was held back, the cache was snapshotted first
and is restored from there.

A turn may speculate (see speculative.py): it feeds its next token plus k drafted
tokens in one pass, then takes them one by one exactly as plain decoding would
(the target's own choice after each must equal the next draft, or, when sampling,
the standard speculative sampling rule accepts it), stops at the first one it
does not take, and cuts the rejected drafts' keys and values out of the tail.
Drafts never reach past the current block, so a rejected draft never caused a
commit or an eviction.

Over 400 lines because prefill, plain decoding, stop strings and the draft-and-verify
step all act on the same turn state, and keeping them in one class keeps each
invariant (history == streamed text, cache == history) checkable in one place.
"""

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn

from .batch import forward_batch
from .cache import CacheSnapshot
from .events import DoneEvent, TokenEvent, TruncatedEvent
from .sampling import Sampler, SamplingParams
from .session import Session, make_room, prefill_piece, recompute_tail
from .speculative import SpecContext, Speculation
from .textstream import TextStream

log = logging.getLogger("kakeya.engine")


@dataclass(frozen=True)
class GenerateRequest:
    """A validated generate call."""

    max_tokens: int
    sampling: SamplingParams
    stop: tuple[str, ...]
    eos_token_ids: frozenset
    started_at: float
    speculative: str = "off"  # off, auto, prompt_lookup or draft, already resolved against the defaults
    num_draft_tokens: int = 4
    logprobs: bool = False
    top_logprobs: int = 0  # alternatives reported per token, with logprobs


class Generation:
    """The state of one turn. `deliver(events)` is called on the compute thread with each step's events."""

    def __init__(
        self,
        session: Session,
        request: GenerateRequest,
        tokenizer,
        deliver: Callable[[list], None],
        recompute: bool,
        spec: Optional[SpecContext] = None,
        matcher=None,
    ):
        """`matcher`: a constrain.TokenMatcher the tokens must satisfy (structured output), or None."""
        self.session = session
        self.request = request
        self.tokenizer = tokenizer
        self.deliver = deliver
        self.recompute = recompute
        self.stream = TextStream(tokenizer, list(request.stop))
        self.sampler = Sampler(request.sampling)
        self.spec = spec if request.speculative != "off" else None
        self.drafts: list[int] = []  # drafted to follow next_token this step
        self.draft_probs: Optional[list] = None  # the draft model's distributions, when sampling
        self.matcher = matcher
        self.verify_masks: Optional[mx.array] = None  # the constraint's mask after each fed token
        self.next_scores: Optional[mx.array] = None  # the logits next_token was picked from (for logprobs)
        self.token_logprobs: list = []  # (logprob, top) for each generated token, when asked
        self.drafter: Optional[str] = None
        self.bonus: Optional[mx.array] = None  # the target's own token after the ones it took
        self.drafted = self.accepted = 0
        self.started = False
        self.finished = False
        self.next_token: Optional[mx.array] = None  # sampled from session.logits, not yet fed
        self.generated: list[int] = []  # fed to the model this turn, in history order
        self.released: list[int] = []  # sent in token events
        self.snapshot: Optional[CacheSnapshot] = None
        self.events: list = []
        self.cached_before = 0
        self.prompt_done = 0
        self.t_prefilled: Optional[float] = None
        self.t_first: Optional[float] = None

    # ---- prefill -----------------------------------------------------------

    @property
    def prefilling(self) -> bool:
        return self.session.pending > 0

    def begin(self) -> None:
        """First step: make the starting state depend on the history alone."""
        session, cache = self.session, self.session.cache
        self.started = True
        if self.recompute and cache.tail_pieces > 1:
            cache.drop_tail()  # it runs again, in one piece with what is pending
            session.logits = None
        if session.logits is None and not session.pending:
            # Nothing left to run, yet no logits: run the last cached token again.
            if cache.tail:
                cache.truncate(cache.processed - 1)
            else:
                session.reset_cache()
        self.cached_before = cache.processed

    def prefill(self, model: nn.Module, budget: int) -> int:
        """Run up to `budget` pending tokens; returns how many ran."""
        done, evicted = prefill_piece(model, self.session, budget, self.recompute)
        self.prompt_done += done
        if evicted:
            self._truncated(evicted)
        draft = self._draft_session()
        if draft is not None:  # the draft model follows along, a piece at a time
            prefill_piece(self.spec.draft.model, draft, max(done, 1), False)
        return done

    def sample_first(self) -> None:
        """After prefill: pick the first token from the logits that follow the history."""
        self.t_prefilled = time.perf_counter()
        self.next_token = self._pick(self.session.logits)

    def _pick(self, logits: mx.array) -> mx.array:
        context = self.request.sampling.repetition_context
        mask = self.matcher.allowed_mask() if self.matcher is not None else None
        token = self.sampler.pick(logits, self.session.history[-context:], mask, self.generated)
        self.next_scores = logits
        mx.async_eval(token)
        return token

    def _scores(self, logits: mx.array, token_id: int) -> Optional[tuple]:
        """(logprob of token_id, top alternatives) under the model's own distribution, when asked for."""
        if not self.request.logprobs:
            return None
        logprobs = logits.astype(mx.float32)[0]
        logprobs = logprobs - mx.logsumexp(logprobs)
        n = self.request.top_logprobs
        if n:
            top = mx.argpartition(-logprobs, n - 1)[:n]
            values, ids = mx.concatenate([logprobs[token_id : token_id + 1], logprobs[top]]).tolist(), top.tolist()
            alternatives = sorted(zip(ids, values[1:]), key=lambda pair: -pair[1])
            return values[0], tuple(alternatives)
        return logprobs[token_id].item(), None

    # ---- decoding ----------------------------------------------------------

    def make_room(self) -> None:
        """Commit a full tail before the next token goes in, snapshotting it if a stop may still reach back."""
        cache = self.session.cache
        if cache.room_in_block() == 0 and self.stream.pending_tokens and self.snapshot is None:
            self.snapshot = cache.snapshot()
        evicted = make_room(self.session)
        if evicted:
            self._truncated(evicted)

    def plan(self, model: nn.Module, alone: bool) -> None:
        """Draft the tokens to feed after next_token this step (none, unless speculating pays)."""
        self.drafts, self.draft_probs = [], None
        spec = self.spec
        if spec is None:
            return
        mode = self.request.speculative
        if mode == "auto" and not (alone and self.request.sampling.greedy):
            # Batched with others, the batch already shares the weights' cost. A sampled
            # turn's draws would depend on that (drafts change which random numbers are
            # used), so auto leaves sampling alone: a seed gives the same tokens either way.
            return
        cache = self.session.cache
        k_max = min(
            self.request.num_draft_tokens,
            cache.room_in_block() - 1,
            self.request.max_tokens - len(self.generated) - 1,
        )
        if k_max < 1:
            return
        spec.measure(model, cache.shape, cache.ropes, self.tokenizer.vocab_size)
        state = self._speculation()
        t0 = self.next_token.item()
        if mode in ("auto", "prompt_lookup"):
            k = state.policies["prompt_lookup"].choose(k_max, spec.costs, 0.0, forced=mode != "auto")
            if k:
                self.drafts = state.lookup.propose(self.session.history, t0, k)
            if self.drafts or mode == "prompt_lookup":
                self.drafter = "prompt_lookup"
                return self._constrain_drafts(t0)
        if spec.draft is not None and mode in ("auto", "draft"):
            k = state.policies["draft"].choose(k_max, spec.costs, spec.draft_cost, forced=mode != "auto")
            if k:
                self.drafts, self.draft_probs = self._draft_with_model(t0, k)
                self.drafter = "draft"
                self._constrain_drafts(t0)

    def _constrain_drafts(self, t0: int) -> None:
        """Keep the drafts the constraint allows, and its mask after each fed token for verification."""
        self.verify_masks = None
        if self.matcher is None or not self.drafts:
            return
        eos = self.request.eos_token_ids
        ends = [i for i, d in enumerate(self.drafts) if d in eos]
        if ends:  # the end of a constrained reply is the target's own choice
            self.drafts = self.drafts[: ends[0]]
        valid = self.matcher.valid_prefix_length([t0, *self.drafts])
        self.drafts = self.drafts[: max(0, valid - 1)]
        if self.draft_probs is not None:
            self.draft_probs = self.draft_probs[: len(self.drafts)]
        if self.drafts:
            self.verify_masks = self.matcher.draft_masks([t0, *self.drafts])[1:]

    def _speculation(self) -> Speculation:
        session = self.session
        if session.speculation is None:
            session.speculation = Speculation()
        return session.speculation

    def _draft_session(self) -> Optional[Session]:
        """The draft model's session following this one (made on first use)."""
        spec = self.spec
        if spec is None or spec.draft is None or self.request.speculative not in ("auto", "draft"):
            return None
        state = self._speculation()
        if state.draft is None:
            state.draft = Session(self.session.id, spec.draft.shape, spec.draft.ropes)
        state.draft.history = self.session.history
        draft = state.draft
        if draft.cache.processed > len(draft.history):  # the history was cut back (a stop string)
            position = len(draft.history)
            if position >= draft.cache.committed_position:
                draft.cache.truncate(position)
                draft.logits = None
            else:
                draft.reset_cache()
        return draft

    def _draft_with_model(self, t0: int, k: int) -> tuple[list[int], Optional[list]]:
        """k tokens from the draft model after the history and t0 (greedy, or sampled with their distributions)."""
        draft = self._draft_session()
        model = self.spec.draft.model
        block = draft.cache.shape.block
        # Usually the few tokens taken since the last step; a long backlog (speculation
        # just turned on) is worked off a couple of blocks per step instead.
        prefill_piece(model, draft, 2 * block, False)
        if draft.pending:
            return [], None
        make_room(draft)
        k = min(k, draft.cache.room_in_block())
        if k < 1:
            return [], None
        sampling = self.request.sampling
        context = sampling.repetition_context
        recent = self.session.history[-context:] + [t0]
        generated = self.generated + [t0]
        token = mx.array([t0])
        tokens, probs = [], []
        for _ in range(k):
            logits = forward_batch(model, [draft.cache.layers], token[None], [1])[0, -1:]
            draft.cache.add_tail([0])  # placeholder id; cut back to the taken tokens after verification
            if sampling.greedy:
                token = self.sampler.pick(logits, recent[-context:], None, generated)
            else:
                logprobs = self.sampler.logprobs(logits, recent[-context:], None, generated)
                token = mx.random.categorical(logprobs, key=self.sampler.next_key())
                probs.append(mx.exp(logprobs))
            tokens.append(token)
            mx.eval(token)
            recent.append(token.item())
            generated.append(recent[-1])
        ids = [t.item() for t in tokens]
        draft.cache.token_ids[-k:] = [t0, *ids[:-1]]
        return ids, (probs if probs else None)

    def feed(self) -> list:
        """What to run this step: next_token, then the drafts (a lazy array and ints)."""
        return [self.next_token, *self.drafts]

    def take(self, logits: mx.array, model: nn.Module) -> None:
        """The model has run next_token and the drafts; `logits` (1 + drafts, vocab) follow each of them."""
        fed = self.drafts
        t0 = self.next_token.item()
        # The target's own choice after each fed token, computed together (one host sync).
        taken = self._verify([t0, *fed], logits)
        self.drafted += len(fed)
        self.accepted += taken - 1
        self._speculation().policies[self.drafter].record(len(fed), taken - 1)
        tokens = [t0, *fed][:taken]
        cache = self.session.cache
        # The rejected drafts' keys and values stay in the buffer past the live
        # length, to be overwritten; the taken ones are added like plain decoding.
        for layer in cache.layers:
            layer.offset = cache.length + len(tokens)
        for i, token_id in enumerate(tokens):
            scores = self.next_scores if i == 0 else logits[i - 1 : i]
            if not self._take_token(token_id, logits[i : i + 1], scores):
                return
        self._after_draft(len(tokens))
        if self.recompute and cache.room_in_block() == 0 and cache.tail_pieces > 1:
            recompute_tail(model, self.session)
            self.next_token = self._pick(self.session.logits)
        else:
            self.next_token, self.next_scores = self.bonus, logits[len(tokens) - 1 : len(tokens)]
            mx.async_eval(self.next_token)

    def _verify(self, fed: list[int], logits: mx.array) -> int:
        """How many of `fed` the target takes (the first always); sets self.bonus, the token after them."""
        sampling = self.request.sampling
        context = sampling.repetition_context
        recent = self.session.history[-context:]
        contexts = [(recent + fed[: i + 1])[-context:] for i in range(len(fed))]
        so_far = [self.generated + fed[: i + 1] for i in range(len(fed))]
        masks = self.verify_masks if self.verify_masks is not None else [None] * len(fed)
        if sampling.greedy:
            choices = [self.sampler.pick(logits[i : i + 1], contexts[i], masks[i], so_far[i]) for i in range(len(fed))]
            values = mx.concatenate(choices).tolist()
            taken = 1
            while taken < len(fed) and values[taken - 1] == fed[taken]:
                taken += 1
            self.bonus = mx.array([values[taken - 1]])
            return taken
        # Speculative sampling: take draft x with probability min(1, p(x) / q(x)); at the first
        # refusal draw from the leftover max(0, p - q); after the last draft draw from p.
        p = [
            mx.exp(self.sampler.logprobs(logits[i : i + 1], contexts[i], masks[i], so_far[i])) for i in range(len(fed))
        ]
        drafts = fed[1:]
        q = self.draft_probs
        checks, fallbacks = [], []
        for i, x in enumerate(drafts):
            q_x = q[i][0, x] if q is not None else 1.0
            u = mx.random.uniform(key=self.sampler.next_key())
            checks.append(u * q_x < p[i][0, x])
            leftover = mx.maximum(p[i] - (q[i] if q is not None else mx.zeros_like(p[i]).at[0, x].add(1.0)), 0)
            total = leftover.sum()
            leftover = mx.where(total > 0, leftover / mx.maximum(total, 1e-30), p[i])
            fallbacks.append(mx.random.categorical(mx.log(leftover), key=self.sampler.next_key()))
        final = mx.random.categorical(mx.log(p[-1]), key=self.sampler.next_key())
        ok = mx.stack(checks).tolist() if checks else []
        taken = 1
        while taken - 1 < len(drafts) and ok[taken - 1]:
            taken += 1
        self.bonus = final if taken - 1 == len(drafts) else fallbacks[taken - 1]
        return taken

    def _after_draft(self, taken: int) -> None:
        """Cut the draft model's cache back to the tokens the target took."""
        if self.drafter != "draft":
            return
        draft = self._draft_session()
        if draft is not None and draft.cache.processed > len(draft.history):
            draft.cache.truncate(len(draft.history))

    def take_plain(self, token_id: int, logits: mx.array, model: nn.Module) -> None:
        """The model has run next_token (`token_id`); `logits` follow it."""
        cache = self.session.cache
        if not self._take_token(token_id, logits, self.next_scores):
            return
        if self.recompute and cache.room_in_block() == 0 and cache.tail_pieces > 1:
            recompute_tail(model, self.session)
        self.next_token = self._pick(self.session.logits)

    def _take_token(self, token_id: int, logits: mx.array, scores: Optional[mx.array]) -> bool:
        """Add one token the model has run to the history; False once the turn has finished.

        `logits` follow the token; `scores` are the logits it was picked from.
        """
        session, request = self.session, self.request
        session.history.append(token_id)
        session.cache.add_tail([token_id])
        session.logits = logits
        self.generated.append(token_id)
        self.token_logprobs.append(self._scores(scores, token_id) if scores is not None else None)
        if self.t_first is None:
            self.t_first = time.perf_counter()
        self.stream.add(token_id)
        if self.matcher is not None and not (token_id in request.eos_token_ids and self.matcher.is_finished()):
            self.matcher.accept(token_id)  # a finished matcher takes nothing more; its end token just ends the turn
        if token_id in request.eos_token_ids:
            self.finish("eos")
        elif self.matcher is not None and self.matcher.is_finished() and not request.eos_token_ids:
            self.finish("eos")  # the constrained text is complete and the model has no end token to say so
        elif self.stream.stopped:
            self.finish("stop_sequence")
        else:
            self._release()
            if len(self.generated) >= request.max_tokens:
                self.finish("max_tokens")
        return not self.finished

    def _release(self) -> None:
        for token_id, text in self.stream.take():
            scores = self.token_logprobs[len(self.released)] if self.request.logprobs else None
            self.released.append(token_id)
            self.events.append(TokenEvent(token_id, text, *(scores or (None, None))))
        if self.snapshot is not None:
            first_held = len(self.session.history) - self.stream.pending_tokens
            if first_held >= self.session.cache.committed_position:
                self.snapshot = None  # nothing held back lies before the last commit any more

    def _truncated(self, evicted: int) -> None:
        self.events.append(TruncatedEvent(evicted=evicted, total_evicted=self.session.cache.evicted))

    # ---- the end -----------------------------------------------------------

    def finish(self, stop_reason: str, error: Optional[BaseException] = None) -> None:
        """End the turn: settle the history, deliver the last events and the DoneEvent."""
        if self.finished:
            return
        self.finished = True
        if error is None:
            self.session.cache.truncate(self.session.cache.processed)  # drafts past the end
            if stop_reason == "stop_sequence":
                self._cut_at_stop()
            else:
                self.stream.flush()
                self._release()
            session = self.session
            mx.eval(session.logits, session.cache.arrays())
            session.cache.check_invariants()
        self.snapshot = None
        self.events.append(self._done(stop_reason, error))
        self.flush_events()

    def _cut_at_stop(self) -> None:
        """Drop the generated tokens that overlap the stop string; re-tokenize the text before it."""
        session, cache = self.session, self.session.cache
        self._release()  # the tokens that end before the stop string
        keep = len(session.history) - len(self.generated) + len(self.released)
        remainder = self.stream.remainder
        extra = list(self.tokenizer.encode(remainder, add_special_tokens=False)) if remainder else []
        if keep < cache.committed_position and self.snapshot is not None:
            cache.restore(self.snapshot)
        if keep < cache.committed_position:
            # The held-back text ran over more than a block: rebuild the cache from the
            # history instead (exact, the cache being canonical; the next turn pays for it).
            log.info("session %s: stop string reached back past a committed block; rebuilding its cache", session.id)
            session.reset_cache()
        else:
            cut = min(keep, cache.processed)
            if cut > cache.committed_position and not extra:
                cut -= 1  # the next turn recomputes the logits that follow the last kept token
            cache.truncate(cut)
            session.logits = None if cut < keep or extra else cache.boundary_logits
        del session.history[keep:]
        session.history.extend(extra)
        self.generated = self.generated[: len(self.released)] + extra
        text = self.stream.text
        for i, token_id in enumerate(extra):
            piece = self.tokenizer.decode(self.released + extra[: i + 1], skip_special_tokens=True)
            self.events.append(TokenEvent(token_id, piece[len(text) :]))
            text = piece
        self.released += extra

    def _done(self, stop_reason: str, error: Optional[BaseException]) -> DoneEvent:
        t_end = time.perf_counter()
        started = self.request.started_at
        t_first = self.t_first or t_end
        prefill_s = (self.t_prefilled or t_end) - started
        decode_s = t_end - t_first
        prompt, generated = self.prompt_done, len(self.generated)
        done = DoneEvent(
            stop_reason=stop_reason,
            prompt_tokens=prompt,
            generated_tokens=generated,
            cached_tokens=self.cached_before,
            ttft_s=t_first - started,
            prefill_tokens_per_s=prompt / prefill_s if prompt and prefill_s > 0 else 0.0,
            decode_tokens_per_s=(generated - 1) / decode_s if generated > 1 and decode_s > 0 else 0.0,
            total_s=t_end - started,
            text=self.tokenizer.decode(self.released, skip_special_tokens=True) if self.released else "",
            stop_sequence=self.stream.stop_sequence if stop_reason == "stop_sequence" else None,
            token_ids=list(self.released),
            draft_tokens=self.drafted,
            accepted_tokens=self.accepted,
        )
        if error is not None:
            done = dataclasses.replace(
                done, stop_reason="error", error_code="internal", error_message=f"{type(error).__name__}: {error}"
            )
        return done

    def flush_events(self) -> None:
        if self.events:
            events, self.events = self.events, []
            self.deliver(events)
