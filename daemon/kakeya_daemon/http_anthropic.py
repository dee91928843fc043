"""The Anthropic Messages API: `POST /v1/messages` (streamed or not) and `POST /v1/messages/count_tokens`.

The same path as the OpenAI endpoints (http_handlers.HttpFront.generation: the pool's
cache reuse, admission, stats, stop behaviour, logging); anthropic_api.py maps the
request and builds the replies and the exact stream events. Usage reports the prompt
tokens the session held already as `cache_read_input_tokens`.
"""

from aiohttp import web

from kakeya_mlx.errors import EngineError
from kakeya_mlx.events import DoneEvent, TokenEvent
from kakeya_mlx.toolcalls import ToolCallDelta, parse_reply

from . import openai_replies as replies
from .anthropic_api import (
    AnthropicError,
    MessagesRequest,
    MessageStream,
    Usage,
    count_tokens_response,
    message_response,
    new_message_id,
    parse_count_tokens_request,
    parse_messages_request,
    stop_reason,
)
from .http_handlers import Generation, HttpFront, Prompt, evicted_headers

MESSAGES = "/v1/messages"


def _unfinished(done) -> AnthropicError:
    error = replies.generation_error(done or DoneEvent(stop_reason="cancelled"))
    return AnthropicError.from_openai(error.status, error.message, error.type)


class AnthropicEndpoints:
    """The Messages API over the shared front."""

    def __init__(self, front: HttpFront):
        self.front = front
        self.core = front.core

    def _prompt(self, request: MessagesRequest) -> str:
        """The conversation rendered with its tools (none for tool_choice none), then the reply's given start."""
        offered = request.tools if request.tool_choice.mode != "none" else []
        try:
            text = self.core.engine.render_chat(request.messages, offered)
        except EngineError as exc:
            raise AnthropicError.from_engine(exc) from None
        return text + (request.prefill or "")

    async def count_tokens(self, request: web.Request) -> web.Response:
        body = await self.front.json_body(request)
        parsed = parse_count_tokens_request(body)
        tokens = await self.core.tokenize(self._prompt(parsed), add_special_tokens=False)
        return web.json_response(count_tokens_response(len(tokens)))

    async def messages(self, request: web.Request) -> web.StreamResponse:
        front = self.front
        body = await front.json_body(request)
        parsed = parse_messages_request(body)
        if parsed.max_tokens > front.max_new_tokens:
            raise AnthropicError(
                f"max_tokens: {parsed.max_tokens} exceeds this server's limit max_new_tokens={front.max_new_tokens}"
            )
        text = self._prompt(parsed)
        offered = parsed.tools if parsed.tool_choice.mode != "none" else []
        constraint = None
        spec = self.core.engine.tools().constraint(offered, parsed.tool_choice, parsed.parallel_tool_calls)
        if spec is not None:
            try:
                constraint = await self.core.engine.compile_constraint(spec, "tools")
            except EngineError as exc:
                raise AnthropicError.from_engine(exc) from None
        wanted = front.core.generation_request(parsed.params, constraint=constraint)
        async with front.generation(request, MESSAGES, Prompt(text), wanted) as generation:
            if parsed.stream:
                return await self._stream(request, generation, parsed, offered)
            return await self._collect(generation, parsed, offered)

    def _usage(self, generation: Generation, done: DoneEvent) -> Usage:
        counts = self.front.account(generation, done)
        return Usage(counts.prompt - counts.cached, counts.completion, counts.cached, counts.evicted)

    async def _collect(self, generation: Generation, parsed: MessagesRequest, offered) -> web.Response:
        pieces, done = [], None
        async for event in generation:
            if isinstance(event, TokenEvent):
                pieces.append(event.text)
            elif isinstance(event, DoneEvent):
                done = event
        if done is None or done.stop_reason not in replies.FINISH_REASONS:
            raise _unfinished(done)
        text, calls = "".join(pieces), []
        if offered:
            text, calls = parse_reply(text, self.core.engine.tools().format, [t.name for t in offered])
        usage = self._usage(generation, done)
        body = message_response(
            new_message_id(),
            self.front.model_name,
            text,
            calls,
            stop_reason(done.stop_reason, bool(calls)),
            done.stop_sequence,
            usage,
        )
        return web.json_response(body, headers=evicted_headers(usage.evicted_tokens))

    async def _stream(self, request, generation: Generation, parsed: MessagesRequest, offered) -> web.StreamResponse:
        events = aiter(generation)
        event = await anext(events, None)  # the prompt has been read: its evictions are known for the header
        headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        response = web.StreamResponse(headers={**headers, **evicted_headers(generation.evicted)})
        await response.prepare(request)
        checkout = generation.checkout
        # The input side as far as known now; message_delta carries the final counts.
        estimate = Usage(checkout.prompt_tokens - checkout.reused, 0, checkout.reused, generation.evicted)
        stream = MessageStream(new_message_id(), self.front.model_name, estimate)
        parser = self.core.engine.tools().parser(offered) if offered else None

        async def send(chunks: list[bytes]) -> None:
            for chunk in chunks:
                await response.write(chunk)

        async def send_pieces(pieces) -> None:
            for piece in pieces:
                await send(stream.tool_call(piece) if isinstance(piece, ToolCallDelta) else stream.text(piece))

        try:
            await send(stream.start())
            done = None
            while event is not None:
                if isinstance(event, TokenEvent):
                    await send_pieces(parser.feed(event.text) if parser is not None else [event.text])
                elif isinstance(event, DoneEvent):
                    done = event
                event = await anext(events, None)
            if done is None or done.stop_reason not in replies.FINISH_REASONS:
                await send(stream.error(_unfinished(done)))
            else:
                await send_pieces(parser.finish() if parser is not None else [])
                reason = stop_reason(done.stop_reason, parser is not None and bool(parser.calls))
                await send(stream.finish(reason, done.stop_sequence, self._usage(generation, done)))
            await response.write_eof()
        except ConnectionError:
            pass  # the client left; closing the turn cancels the generation
        return response
