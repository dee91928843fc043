"""The OpenAI endpoints: `POST /v1/chat/completions` and `POST /v1/completions`, streamed or not.

A request becomes a prompt (chat messages rendered through the model's template, with
its tools) and a generation request (the shared parameter rules, plus a constraint
for `response_format` or a forced tool call, and log probabilities when asked); its
turn runs on a pooled session (http_handlers.HttpFront.generation). Replies carry
parsed tool calls and log probabilities in OpenAI's shapes (openai_replies.py).
"""

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

from aiohttp import web

from kakeya_mlx.errors import EngineError
from kakeya_mlx.events import DoneEvent, TokenEvent
from kakeya_mlx.toolcalls import Tool, ToolCallDelta, parse_reply

from . import openai_api as api
from . import openai_replies as replies
from .core import GenerationRequest
from .http_handlers import Generation, HttpFront, Prompt, evicted_headers, from_engine

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


@dataclass
class _Asked:
    """What one request asked for, beyond the turn itself."""

    chat: bool
    model: str
    generation: GenerationRequest
    tools: Sequence[Tool]  # the tools the reply may call (their calls are parsed out of it)
    stream: bool
    include_usage: bool


@dataclass
class _Logprobs:
    """The log probabilities of the tokens seen so far, waiting to go out with the next piece of the reply."""

    alternatives: bool
    eos: frozenset
    events: list = field(default_factory=list)
    offset: int = 0  # completions' text_offset: the length of the token texts so far

    def add(self, event: TokenEvent) -> None:
        # End tokens are no part of the reply's text, as in OpenAI's replies.
        if event.logprob is not None and event.token_id not in self.eos:
            self.events.append(event)

    async def take(self, front: HttpFront, chat: bool) -> Optional[dict]:
        """The waiting entries in OpenAI's shape (None when there are none), and forget them."""
        if not self.events:
            return None
        events, self.events = self.events, []
        ids = [e.token_id for e in events] + [t for e in events for t, _ in e.top_logprobs or ()]
        known = dict(zip(ids, await front.core.engine.token_bytes(ids)))
        entries = [
            replies.TokenLogprob(known[e.token_id], e.logprob, tuple((known[t], lp) for t, lp in e.top_logprobs or ()))
            for e in events
        ]
        if chat:
            return replies.chat_logprobs(entries)
        taken = replies.completion_logprobs(entries, self.offset, self.alternatives)
        self.offset += sum(len(t) for t in taken["tokens"])
        return taken


class OpenAIEndpoints:
    """The OpenAI API's generating endpoints over the shared front."""

    def __init__(self, front: HttpFront):
        self.front = front
        self.core = front.core

    async def _read(self, request: web.Request, chat: bool) -> tuple[dict, str, dict]:
        """(the body, the model id replies carry, the generation params) of a checked request."""
        front = self.front
        body = await front.json_body(request)
        model = front.check_model(body)
        api.reject_unsupported(body, chat)
        return body, model, api.generation_params(body, chat, front.max_new_tokens)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body, model, params = await self._read(request, chat=True)
        extras = api.chat_extras(body)
        messages = api.chat_messages(body.get("messages"))
        engine = self.core.engine
        # tool_choice "none": the model is not told of the tools, so it cannot call them.
        offered = extras.tools if extras.tool_choice.mode != "none" else []
        try:
            text = engine.render_chat(messages, offered)
        except EngineError as exc:
            raise from_engine(exc, param="messages") from None
        tools = engine.tools()
        spec, where = extras.response_format, extras.response_format_field
        forced = tools.constraint(offered, extras.tool_choice, extras.parallel_tool_calls) if offered else None
        if forced is not None:
            spec, where = forced, "tools"
        asked = await self._asked(True, model, body, params, spec, where, offered)
        return await self._run(request, CHAT, Prompt(text), asked)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body, model, params = await self._read(request, chat=False)
        if "prompt" not in body:
            raise api.ApiError(400, "prompt: required", param="prompt", code="missing_required_parameter")
        text, tokens = api.completion_prompt(body["prompt"])
        spec, where = api.response_format(body)
        asked = await self._asked(False, model, body, params, spec, where, [])
        return await self._run(request, COMPLETIONS, Prompt(text, tokens, add_special=True), asked)

    async def _asked(self, chat, model, body, params, spec, where, tools) -> _Asked:
        """Check the stream options and compile the constraint now: a bad one is a 400 before any session is touched."""
        stream, include_usage = api.stream_options(body)
        constraint = None
        if spec is not None:
            try:
                constraint = await self.core.engine.compile_constraint(spec, where)
            except EngineError as exc:
                raise from_engine(exc, param=where) from None
        generation = self.core.generation_request(params, constraint=constraint)
        return _Asked(chat, model, generation, tools, stream, include_usage)

    async def _run(self, request: web.Request, endpoint: str, prompt: Prompt, asked: _Asked) -> web.StreamResponse:
        async with self.front.generation(request, endpoint, prompt, asked.generation) as generation:
            logprobs = None
            if asked.generation.logprobs:
                logprobs = _Logprobs(asked.generation.top_logprobs > 0, self.core.engine.eos_token_ids)
            reply = replies.Reply(asked.chat, asked.model)
            if asked.stream:
                return await self._stream(request, generation, reply, asked, logprobs)
            return await self._collect(generation, reply, asked, logprobs)

    async def _collect(self, generation: Generation, reply, asked: _Asked, logprobs) -> web.Response:
        pieces, done = [], None
        async for event in generation:
            if isinstance(event, TokenEvent):
                pieces.append(event.text)
                if logprobs is not None:
                    logprobs.add(event)
            elif isinstance(event, DoneEvent):
                done = event
        if done is None or done.stop_reason not in replies.FINISH_REASONS:
            raise replies.generation_error(done or DoneEvent(stop_reason="cancelled"))
        text, calls = "".join(pieces), []
        if asked.tools:
            text, calls = parse_reply(text, self.core.engine.tools().format, [t.name for t in asked.tools])
        counts = self.front.account(generation, done)
        usage = replies.usage(counts.prompt, done, counts.evicted)
        taken = None
        if logprobs is not None:
            taken = await logprobs.take(self.front, asked.chat) or (replies.chat_logprobs([]) if asked.chat else None)
        body = reply.whole(text, replies.finish_reason(done.stop_reason, bool(calls)), usage, calls, taken)
        return web.json_response(body, dumps=api.dumps, headers=evicted_headers(counts.evicted))

    async def _stream(self, request, generation: Generation, reply, asked: _Asked, logprobs) -> web.StreamResponse:
        events = aiter(generation)
        event = await anext(events, None)  # the prompt has been read: its evictions are known for the header
        headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        response = web.StreamResponse(headers={**headers, **evicted_headers(generation.evicted)})
        await response.prepare(request)

        async def send(obj) -> None:
            await response.write(b"data: " + api.dumps(obj).encode() + b"\n\n")

        async def send_piece(piece) -> None:
            taken = await logprobs.take(self.front, asked.chat) if logprobs is not None else None
            if isinstance(piece, ToolCallDelta):
                await send(reply.chunk({"tool_calls": [piece.to_openai()]}, logprobs=taken))
            else:
                await send(reply.chunk(piece, logprobs=taken))

        parser = self.core.engine.tools().parser(asked.tools) if asked.tools else None
        try:
            if reply.chat:
                await send(reply.chunk({"role": "assistant", "content": ""}))
            done = None
            while event is not None:
                if isinstance(event, TokenEvent):
                    if logprobs is not None:
                        logprobs.add(event)
                    # Text held back (part of a character, maybe a stop string) waits, its log probabilities with it.
                    pieces = parser.feed(event.text) if parser is not None else [event.text]
                    for piece in filter(None, pieces):
                        await send_piece(piece)
                elif isinstance(event, DoneEvent):
                    done = event
                event = await anext(events, None)
            if done is None or done.stop_reason not in replies.FINISH_REASONS:
                await send(replies.generation_error(done or DoneEvent(stop_reason="cancelled")).body())
            else:
                for piece in filter(None, parser.finish() if parser is not None else []):
                    await send_piece(piece)
                counts = self.front.account(generation, done)
                called = parser is not None and bool(parser.calls)
                taken = await logprobs.take(self.front, asked.chat) if logprobs is not None else None
                await send(reply.chunk(None, replies.finish_reason(done.stop_reason, called), logprobs=taken))
                if asked.include_usage:
                    await send(reply.usage_chunk(replies.usage(counts.prompt, done, counts.evicted)))
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except ConnectionError:
            pass  # the client left; closing the turn cancels the generation
        return response
