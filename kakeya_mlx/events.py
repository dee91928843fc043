"""What a generation streams: token events, a truncation notice, and one final done event."""

from dataclasses import dataclass, field
from typing import Optional

STOP_REASONS = ("max_tokens", "eos", "stop_sequence", "cancelled", "error")


@dataclass(frozen=True)
class TokenEvent:
    """One generated token and its text (empty for a token that only began a character).

    When asked for, `logprob` is the token's log probability under the model's own
    distribution at that step (log-softmax of its logits, before any penalty,
    temperature, filter or constraint) and `top_logprobs` the likeliest tokens
    there, as (token id, log probability), most likely first.
    """

    token_id: int
    text: str
    logprob: Optional[float] = None
    top_logprobs: Optional[tuple] = None


@dataclass(frozen=True)
class TruncatedEvent:
    """The window slid during this turn: `evicted` more tokens left the model's view."""

    evicted: int
    total_evicted: int


@dataclass(frozen=True)
class DoneEvent:
    """The last event of every generation."""

    stop_reason: str
    prompt_tokens: int = 0
    generated_tokens: int = 0
    cached_tokens: int = 0
    ttft_s: float = 0.0
    prefill_tokens_per_s: float = 0.0
    decode_tokens_per_s: float = 0.0
    total_s: float = 0.0
    text: str = ""
    stop_sequence: Optional[str] = None  # the stop string that ended the turn, when stop_reason is "stop_sequence"
    error_code: Optional[str] = None
    error_message: Optional[str] = None
    token_ids: list = field(default_factory=list, repr=False)
    draft_tokens: int = 0  # tokens drafted for speculative decoding this turn
    accepted_tokens: int = 0  # of those, the ones the model took
