"""The OpenAI API's response objects: whole replies, stream chunks, usage, log probabilities.

Pure functions and data, built from what a turn produced: text, parsed tool calls
(kakeya_mlx.toolcalls), the engine's stop reason, token counts, and per-token log
probabilities with each token's bytes.
"""

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

from kakeya_mlx.events import DoneEvent
from kakeya_mlx.toolcalls import ToolCall

from .openai_api import ApiError

FINISH_REASONS = {"eos": "stop", "stop_sequence": "stop", "max_tokens": "length"}


def finish_reason(stop_reason: str, called: bool) -> str:
    """OpenAI's finish_reason for the engine's stop reason; "tool_calls" when the reply ended on calls."""
    if called and stop_reason == "eos":
        return "tool_calls"
    return FINISH_REASONS[stop_reason]


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's bytes and log probability, and its likeliest alternatives (bytes, logprob)."""

    token: bytes
    logprob: float
    top: tuple[tuple[bytes, float], ...]


def _text(token: bytes) -> str:
    return token.decode("utf-8", errors="replace")


def _chat_entry(token: bytes, logprob: float) -> dict:
    return {"token": _text(token), "logprob": logprob, "bytes": list(token)}


def chat_logprobs(entries: Sequence[TokenLogprob]) -> dict:
    """A chat choice's `logprobs`: one entry per token, each with its `top_logprobs`."""
    content = [
        {**_chat_entry(e.token, e.logprob), "top_logprobs": [_chat_entry(t, lp) for t, lp in e.top]} for e in entries
    ]
    return {"content": content, "refusal": None}


def _by_text(top: tuple[tuple[bytes, float], ...]) -> dict:
    """Alternatives keyed by their text; where two decode alike (parts of characters), the likelier stays."""
    out: dict = {}
    for token, logprob in top:
        out.setdefault(_text(token), logprob)
    return out


def completion_logprobs(entries: Sequence[TokenLogprob], offset: int, alternatives: bool) -> dict:
    """A completion choice's `logprobs`: parallel lists. `text_offset` counts the token texts before each,
    from `offset` (the length of the earlier chunks' token texts)."""
    tokens = [_text(e.token) for e in entries]
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    return {
        "tokens": tokens,
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [_by_text(e.top) for e in entries] if alternatives else None,
        "text_offset": offsets,
    }


class Reply:
    """Builds the OpenAI response objects of one request."""

    def __init__(self, chat: bool, model: str):
        self.chat = chat
        self.model = model
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _envelope(self, object_name: str, choices: list) -> dict:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model, "choices": choices}

    def whole(
        self,
        text: Optional[str],
        finish: str,
        usage: dict,
        tool_calls: Sequence[ToolCall] = (),
        logprobs: Optional[dict] = None,
    ) -> dict:
        if self.chat:
            message: dict = {"role": "assistant", "content": text}
            if tool_calls:
                message["tool_calls"] = [c.to_openai() for c in tool_calls]
            choice = {"index": 0, "message": message, "logprobs": logprobs, "finish_reason": finish}
            body = self._envelope("chat.completion", [choice])
        else:
            choice = {"index": 0, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
            body = self._envelope("text_completion", [choice])
        body["usage"] = usage
        return body

    def chunk(self, delta, finish: Optional[str] = None, logprobs: Optional[dict] = None) -> dict:
        """A streamed piece: delta is text, a chat delta map, or None for the closing chunk."""
        if self.chat:
            if delta is None:
                delta = {}
            elif isinstance(delta, str):
                delta = {"content": delta}
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            return self._envelope("chat.completion.chunk", [choice])
        choice = {"index": 0, "text": delta or "", "logprobs": logprobs, "finish_reason": finish}
        return self._envelope("text_completion", [choice])

    def usage_chunk(self, usage: dict) -> dict:
        body = self._envelope("chat.completion.chunk" if self.chat else "text_completion", [])
        body["usage"] = usage
        return body


def usage(prompt_tokens: int, done: DoneEvent, evicted: int) -> dict:
    """OpenAI's usage, plus `evicted_tokens`: tokens of the conversation the model no longer sees."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": done.generated_tokens,
        "total_tokens": prompt_tokens + done.generated_tokens,
        "prompt_tokens_details": {"cached_tokens": min(done.cached_tokens, prompt_tokens)},
        "evicted_tokens": evicted,
    }


def generation_error(done: DoneEvent) -> ApiError:
    """The error for a turn that did not finish: cancelled (the daemon is stopping) or failed."""
    if done.stop_reason == "cancelled":
        return ApiError(
            503,
            "the generation was cancelled before it finished (the daemon is stopping, or a cancel request)",
            "server_error",
            code="cancelled",
        )
    return ApiError.from_code(done.error_code or "internal", done.error_message or "the generation failed")
