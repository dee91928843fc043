"""A chat continued with `messages` appends is exactly what the chat template renders.

After every way a turn can end, appending the next messages leaves the session's
history equal, token for token, to the tokenization of the template's rendering of
the whole conversation, the assistant's turns being the text that was streamed.
Three chat formats with different turn closings: ChatML (`<|im_end|>` then a
newline), Llama-3 (`<|eot_id|>`, no newline, BOS from the template) and Mistral
(no generation prompt; a reply is closed by `</s>`, the end-of-sequence token
itself). The models use the test-model maker's "chars" tokenizer, one token per
character: what a model generates is then always the tokenizer's own encoding of
its text, so exact equality is a property of the engine alone (with a merging
tokenizer it also needs the model's tokens to be the canonical encoding of their
text; see test_a_reply_in_a_merging_tokenizer_closes_exactly_by_text).
"""

import dataclasses

import mlx.core as mx
import pytest

from kakeya_client import AsyncClient
from kakeya_client.events import TokensEvent
from kakeya_daemon.server import running_daemon
from kakeya_mlx import chat
from kakeya_mlx.engine import Engine, EngineConfig
from kakeya_mlx.errors import InvalidArgumentError
from kakeya_mlx.events import DoneEvent, TokenEvent
from kakeya_mlx.loader import load_model
from test_daemon import make_config, sock_dir  # noqa: F401  (fixture)

FORMATS = ["chatml", "llama3", "mistral"]
CONFIG = EngineConfig(sink=4, window=200, block=8)  # no eviction: cache positions follow the history
FIRST = [{"role": "user", "content": "Hello there, how are you?"}]
NEXT = [{"role": "user", "content": "Thanks! And tomorrow?"}]
LATER = [{"role": "user", "content": "Bye."}]
REPLY_TOKENS = 12
CUT = 4  # tokens generated before an end of sequence, a cancel or a fault


def _model_dir(make_model, fmt):
    return make_model("llama", tokenizer="chars", chat_format=fmt)


@pytest.fixture(scope="module", params=FORMATS)
def fmt(request):
    return request.param


@pytest.fixture(scope="module")
def loaded(make_model, fmt):
    return load_model(_model_dir(make_model, fmt))


def _ids(loaded, conversation, add_generation_prompt=True) -> list[int]:
    text = chat.render(loaded.tokenizer, conversation, add_generation_prompt)
    return loaded.tokenizer.encode(text, add_special_tokens=False)


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


async def _with_engine(loaded, scenario):
    engine = Engine(loaded, CONFIG)
    await engine.start()
    try:
        return await scenario(engine)
    finally:
        await engine.stop()


async def _turn(engine, sid, cancel_after=None, **params) -> tuple[str, DoneEvent]:
    """Generate; return the streamed text and the done event."""
    texts, seen = [], 0
    async for event in engine.generate(sid, **params):
        if isinstance(event, TokenEvent):
            texts.append(event.text)
            seen += 1
            if seen == cancel_after:
                await engine.cancel(sid)
        elif isinstance(event, DoneEvent):
            done = event
    return "".join(texts), done


async def _free_reply(loaded) -> list[int]:
    """The tokens the model replies to FIRST when nothing ends it early."""

    async def scenario(engine):
        sid = await engine.create_session()
        await engine.append(sid, messages=FIRST)
        return (await _turn(engine, sid, max_tokens=REPLY_TOKENS))[1].token_ids

    return await _with_engine(dataclasses.replace(loaded, eos_token_ids=[]), scenario)


def _ending_on(loaded, eos: int, reply: list[int]):
    """A copy of the model that ends `reply` with `eos` after at least CUT tokens: the
    output rows of `eos` and of a token it first picks there are swapped, so it picks
    `eos` exactly where it would have picked that token."""
    cut = next(k for k in range(CUT, len(reply)) if reply[k] not in reply[:k] and eos not in reply[:k])
    model = load_model(loaded.path).model
    order = list(range(loaded.vocab_size))
    order[eos], order[reply[cut]] = reply[cut], eos
    model.update({"lm_head": {"weight": model.lm_head.weight[mx.array(order)]}})
    mx.eval(model.parameters())
    return dataclasses.replace(loaded, model=model)


class _FailsPastLength:
    """The real model, whose forward pass raises once (as a device fault would) when it
    would take the cache past `length` positions."""

    def __init__(self, model, length: int):
        self._model, self._length, self.failed = model, length, False

    def __getattr__(self, name):
        return getattr(self._model, name)

    def __call__(self, inputs, cache=None, **kwargs):
        # Batched caches give one offset per row; the fault fires on the longest.
        longest = int(mx.max(mx.array(cache[0].offset)).item())
        if not self.failed and longest + inputs.shape[1] > self._length:
            self.failed = True
            raise RuntimeError("injected device fault")
        return self._model(inputs, cache=cache, **kwargs)


def _closing_eos(loaded) -> int:
    """The end-of-sequence token that closes a turn in the template (config.json's)."""
    return loaded.config["eos_token_id"]


async def _conversation_after(loaded, ending: str):
    """FIRST, a reply ended as `ending` says, NEXT, a second reply, LATER; checks the
    history against the template after each append. Returns the first turn's done
    event, its streamed text and the reply's token ids in the history."""
    prompt_length = len(_ids(loaded, FIRST))
    model, generate, first = loaded, dict(max_tokens=REPLY_TOKENS), FIRST
    if ending in ("eos", "other_eos"):
        closing = _closing_eos(loaded)
        eos = closing if ending == "eos" else next(e for e in loaded.eos_token_ids if e != closing)
        model = _ending_on(loaded, eos, await _free_reply(loaded))
    elif ending == "stop_sequence":
        free = loaded.tokenizer.decode(await _free_reply(loaded))
        generate["stop"] = [free[CUT : CUT + 2]]
    elif ending == "cancelled":
        generate = dict(max_tokens=200, cancel_after=CUT)
    elif ending == "cancelled_in_prefill":
        first = [{"role": "user", "content": " ".join(["A long question, asked at length."] * 12)}]
    elif ending == "error":
        model = dataclasses.replace(loaded, model=_FailsPastLength(loaded.model, prompt_length + CUT))

    async def scenario(engine):
        sid = await engine.create_session()
        appended = await engine.append(sid, messages=first)
        assert engine.session_history(sid) == appended["tokens"] == _ids(loaded, first)
        if ending == "cancelled_in_prefill":
            stream = engine.generate(sid, max_tokens=REPLY_TOKENS)
            await engine.cancel(sid)  # before the compute thread is through the prompt's pieces
            streamed, done = "", [e async for e in stream][-1]
        else:
            streamed, done = await _turn(engine, sid, **generate)
        reply = engine.session_history(sid)[len(appended["tokens"]) :]
        if ending == "other_eos":
            # An end-of-sequence token that is not the template's turn closing stays in
            # the reply (it is in the history); the template's closing follows it.
            streamed += loaded.tokenizer.decode(reply[-1:], skip_special_tokens=False)
        conversation = [*first, _assistant(streamed)]

        before = len(engine.session_history(sid))
        appended = await engine.append(sid, messages=NEXT)
        assert engine.session_history(sid) == _ids(loaded, conversation + NEXT)
        assert appended["tokens"] == engine.session_history(sid)[before:]
        # And the conversation goes on exactly.
        second, _ = await _turn(engine, sid, max_tokens=6)
        await engine.append(sid, messages=LATER)
        assert engine.session_history(sid) == _ids(loaded, conversation + NEXT + [_assistant(second)] + LATER)
        return done, streamed, reply

    return await _with_engine(model, scenario)


ENDINGS = ["eos", "other_eos", "max_tokens", "cancelled", "cancelled_in_prefill", "error"]


@pytest.mark.parametrize("ending", ENDINGS)
async def test_the_next_messages_continue_exactly_as_the_template_renders(loaded, fmt, ending):
    if ending == "other_eos" and len(loaded.eos_token_ids) < 2:
        pytest.skip(f"{fmt} has a single end-of-sequence token")
    done, streamed, reply = await _conversation_after(loaded, ending)
    assert done.stop_reason == {"other_eos": "eos", "cancelled_in_prefill": "cancelled"}.get(ending, ending)
    if ending in ("eos", "other_eos"):
        assert len(reply) > CUT and reply[-1] in loaded.eos_token_ids
        assert (reply[-1] == _closing_eos(loaded)) == (ending == "eos")
    elif ending == "cancelled":
        assert CUT <= len(reply) < 200
    else:
        assert len(reply) == {"max_tokens": REPLY_TOKENS, "cancelled_in_prefill": 0, "error": CUT}[ending], reply


async def test_the_next_messages_continue_exactly_after_a_stop_string(loaded):
    done, streamed, _ = await _conversation_after(loaded, "stop_sequence")
    assert done.stop_reason == "stop_sequence" and 0 < len(streamed) <= CUT


async def test_a_written_reply_fills_the_open_turn_without_a_second_header(loaded):
    written = _assistant("Fine, thanks.")

    async def scenario(engine):
        sid = await engine.create_session()
        await engine.append(sid, messages=FIRST)  # ends with the generation prompt
        await engine.append(sid, messages=[written])  # default add_generation_prompt=True
        assert engine.session_history(sid) == _ids(loaded, [*FIRST, written], add_generation_prompt=False)
        await engine.append(sid, messages=NEXT)
        assert engine.session_history(sid) == _ids(loaded, [*FIRST, written, *NEXT])
        # The same conversation appended at once renders the same.
        other = await engine.create_session()
        await engine.append(other, messages=[*FIRST, written, *NEXT])
        assert engine.session_history(other) == engine.session_history(sid)

    await _with_engine(loaded, scenario)


async def test_a_reply_generated_over_several_turns_is_one_assistant_turn(loaded):
    async def scenario(engine):
        sid = await engine.create_session()
        await engine.append(sid, messages=FIRST)
        first, _ = await _turn(engine, sid, max_tokens=5)
        more, _ = await _turn(engine, sid, max_tokens=4)
        await engine.append(sid, messages=NEXT)
        assert engine.session_history(sid) == _ids(loaded, [*FIRST, _assistant(first + more), *NEXT])

    await _with_engine(dataclasses.replace(loaded, eos_token_ids=[]), scenario)


async def test_after_text_of_the_clients_own_messages_add_only_their_turns(loaded):
    """Text or tokens appended after a reply are the client's: the engine does not close
    the reply for it (the client may have closed it itself)."""

    async def scenario(engine):
        sid = await engine.create_session()
        await engine.append(sid, messages=FIRST)
        await _turn(engine, sid, max_tokens=5)
        closing = chat.render(loaded.tokenizer, [*FIRST, _assistant("x")], False).rpartition("x")[2]
        await engine.append(sid, text=closing)
        before = engine.session_history(sid)
        await engine.append(sid, messages=NEXT)
        added = engine.session_history(sid)[len(before) :]
        assert added == loaded.tokenizer.encode(chat.after_closed_turn(loaded.tokenizer, NEXT, True), add_special_tokens=False)
        assert loaded.tokenizer.decode(before, skip_special_tokens=False).endswith(closing)

    await _with_engine(dataclasses.replace(loaded, eos_token_ids=[]), scenario)


async def test_template_errors_are_invalid_arguments_that_quote_a_bounded_text(loaded, fmt):
    async def scenario(engine):
        sid = await engine.create_session()
        huge = {"role": "user", "content": 7, "extra": "x" * 100_000}
        with pytest.raises(InvalidArgumentError) as bad:
            await engine.append(sid, messages=[huge])
        assert "messages[0]" in bad.value.message and len(bad.value.message) < 300
        if fmt == "mistral":  # its template refuses a conversation that does not alternate
            with pytest.raises(InvalidArgumentError, match="alternate"):
                await engine.append(sid, messages=[_assistant("x" * 100_000)])
        assert engine.session_history(sid) == []

    await _with_engine(loaded, scenario)


async def test_a_reply_in_a_merging_tokenizer_closes_exactly_by_text(loaded_qwen3):
    """With a merging BPE a model may generate tokens that are not the tokenizer's own
    encoding of their text; the history keeps them. Then the history's text is exactly
    the template's rendering, and its ids are the rendering's around the reply."""
    tokenizer = loaded_qwen3.tokenizer

    async def scenario(engine):
        sid = await engine.create_session()
        await engine.append(sid, messages=FIRST)
        streamed, done = await _turn(engine, sid, max_tokens=REPLY_TOKENS)
        await engine.append(sid, messages=NEXT)
        return streamed, done, engine.session_history(sid)

    streamed, done, history = await _with_engine(dataclasses.replace(loaded_qwen3, eos_token_ids=[]), scenario)
    conversation = [*FIRST, _assistant(streamed), *NEXT]
    rendered = chat.render(tokenizer, conversation, True)
    assert tokenizer.decode(history, skip_special_tokens=False) == rendered
    before, _, after = rendered.partition(streamed + "<|im_end|>")
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    assert history == encode(before) + done.token_ids + encode("<|im_end|>" + after)


async def test_through_the_daemon_append_returns_the_ids_that_continue_the_conversation(make_model, sock_dir):
    """Over the wire: the ids `append` returns and the generated ids together are the
    tokenization of the rendered conversation."""
    path = _model_dir(make_model, "chatml")
    loaded = load_model(path)
    async with running_daemon(make_config(path, sock_dir), loaded=loaded) as daemon:
        async with AsyncClient(daemon.socket_path) as client:
            session = await client.create_session()
            first = await session.append(messages=FIRST)
            async with session.generate(max_tokens=REPLY_TOKENS, temperature=0) as stream:  # greedy: no end token
                events = [event async for event in stream]
            second = await session.append(messages=NEXT)
            info = await session.info()
    streamed = "".join(e.text for e in events if isinstance(e, TokensEvent))
    generated = [t for e in events if isinstance(e, TokensEvent) for t in e.tokens]
    conversation = [*FIRST, _assistant(streamed), *NEXT]
    assert first["tokens"] + generated + second["tokens"] == _ids(loaded, conversation)
    assert info["history_length"] == len(_ids(loaded, conversation)) and events[-1].stop_reason == "max_tokens"
