"""The events a generate streams, as typed values."""

from dataclasses import dataclass, field
from typing import Optional, Union

from kakeya_protocol import EventMessage

from .errors import KakeyaError, error_from


@dataclass(frozen=True)
class TokensEvent:
    """New tokens and the text they completed ("" while a character or a possible stop string is pending).

    When the generate asked for them: `logprobs`, each token's log probability (None for
    a token the model did not choose: re-tokenized before a stop string), and
    `top_logprobs`, each token's likeliest alternatives as (token id, log probability).
    """

    tokens: list[int]
    text: str
    logprobs: Optional[list] = None
    top_logprobs: Optional[list] = None


@dataclass(frozen=True)
class TruncatedEvent:
    """The session's window slid: `evicted` tokens left the cache now, `total_evicted` so far."""

    evicted: int
    total_evicted: int


@dataclass(frozen=True)
class DoneEvent:
    """The last event of every generate. `error` is set only when stop_reason is "error"."""

    stop_reason: str
    prompt_tokens: int
    generated_tokens: int
    cached_tokens: int
    timings: dict = field(default_factory=dict)
    error: Optional[KakeyaError] = None
    draft_tokens: int = 0  # drafted for speculative decoding (0 from a daemon that does not say)
    accepted_tokens: int = 0


Event = Union[TokensEvent, TruncatedEvent, DoneEvent]


def event_from(message: EventMessage) -> Optional[Event]:
    """The typed event, or None for an event this client does not know (a newer daemon's)."""
    data = message.data
    if message.event == "tokens":
        top = data.get("top_logprobs")
        if top is not None:
            top = [None if pairs is None else [(t, lp) for t, lp in pairs] for pairs in top]
        return TokensEvent(list(data["tokens"]), data["text"], data.get("logprobs"), top)
    if message.event == "truncated":
        return TruncatedEvent(data["evicted"], data["total_evicted"])
    if message.event == "done":
        error = data.get("error")
        return DoneEvent(
            stop_reason=data["stop_reason"],
            prompt_tokens=data["prompt_tokens"],
            generated_tokens=data["generated_tokens"],
            cached_tokens=data["cached_tokens"],
            timings=dict(data["timings"]),
            error=error_from(error["code"], error["message"]) if error else None,
            draft_tokens=data.get("draft_tokens", 0),
            accepted_tokens=data.get("accepted_tokens", 0),
        )
    return None
