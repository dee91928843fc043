"""Chat messages rendered with the model's template, and continued exactly as it renders them.

A session's history is append-only, so a `messages` append adds only the text the
template renders after what the history already holds: closing an assistant reply
the model generated (or an empty one, when nothing was generated), or filling the
open assistant turn with a written reply, never repeating its header.

Where the history stands is one number per session (`Session.chat_reply_start`):
the history index at which the assistant turn opened by the last `messages` append
(with its generation prompt) begins; None when the history ends otherwise (a closed
turn, or text or tokens of the client's own). The rest is read from the history:
tokens past that index are the reply generated so far, and a reply that ended on an
end-of-sequence token has it as the history's last token.

The template is asked for differences only: it renders a short probe conversation
with and without the new messages, and the new text is what the longer rendering
adds. The probe's content is a character no template alters, so the closing text a
template puts after an assistant reply is learnt from it, whatever the reply.
"""

from collections.abc import Collection, Sequence
from typing import Optional

from .errors import InvalidArgumentError

PROBE = "\x00"
_USER = {"role": "user", "content": PROBE}
_ASSISTANT = {"role": "assistant", "content": PROBE}
_QUOTE_LIMIT = 80


def shown(value) -> str:
    """`repr(value)`, cut to a bounded length: error messages never echo a client value whole."""
    text = repr(value)
    return text if len(text) <= _QUOTE_LIMIT else f"{text[: _QUOTE_LIMIT - 20]}... ({len(text)} characters)"


def render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    """The whole conversation `messages` as the template renders it."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as exc:
        raise InvalidArgumentError(
            f"the chat template could not render these messages: {type(exc).__name__}: {shown(str(exc))}"
        ) from exc


def _added(tokenizer, before: list[dict], before_prompt: bool, messages: list[dict], add_generation_prompt: bool) -> str:
    """What the template renders for `before + messages` beyond its rendering of `before`."""
    base = render(tokenizer, before, before_prompt)
    full = render(tokenizer, before + messages, add_generation_prompt)
    if not full.startswith(base):
        raise InvalidArgumentError(
            "this model's chat template cannot render a continuation of a conversation; "
            "append the turn as text or tokens instead"
        )
    return full[len(base) :]


def after_closed_turn(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    """The text `messages` add after a history that ends on a closed turn."""
    return _added(tokenizer, [_USER, _ASSISTANT], False, messages, add_generation_prompt)


def opens_turn(messages: list[dict], add_generation_prompt: bool) -> bool:
    """Whether appending `messages` ends with a generation prompt.

    Not after the assistant's own message: its turn is complete, and a prompt there
    would be an empty assistant turn once the next user message closes it.
    """
    return add_generation_prompt and messages[-1]["role"] != "assistant"


def continuation(
    tokenizer,
    messages: list[dict],
    add_generation_prompt: bool,
    history: Sequence[int],
    reply_start: Optional[int],
    eos_token_ids: Collection[int],
) -> str:
    """The text a `messages` append adds to `history`, so that the history holds what the
    template renders for the whole conversation (the assistant's replies being the text
    of the tokens generated for them)."""
    add_generation_prompt = opens_turn(messages, add_generation_prompt)
    if not history:
        return render(tokenizer, messages, add_generation_prompt)
    if reply_start is None:
        return after_closed_turn(tokenizer, messages, add_generation_prompt)
    replied = len(history) > reply_start
    if not replied and messages[0]["role"] == "assistant":  # a written reply fills the open turn
        return _added(tokenizer, [_USER], True, messages, add_generation_prompt)
    # Close the open turn (the generated reply, or an empty one), then the new messages.
    text = _added(tokenizer, [_USER], True, [_ASSISTANT, *messages], add_generation_prompt)
    if not text.startswith(PROBE):
        raise InvalidArgumentError(
            "this model's chat template alters an assistant reply's text, so the generated reply "
            "cannot be closed exactly; append the turn as text or tokens instead"
        )
    text = text[len(PROBE) :]
    if replied and history[-1] in eos_token_ids:
        # The reply ended on an end-of-sequence token. Where the template closes a turn
        # with that token (<|im_end|>, <|eot_id|>, </s>), it is already in the history;
        # any other one stays part of the reply's text, and the closing follows it.
        eos_text = tokenizer.decode([history[-1]], skip_special_tokens=False)
        if eos_text and text.startswith(eos_text):
            text = text[len(eos_text) :]
    return text
