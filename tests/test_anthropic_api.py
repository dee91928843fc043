"""The Anthropic Messages API mapping, checked by the official `anthropic` client parsing what it builds.

The client talks to an in-process handler (httpx.MockTransport) that calls the mapping
functions, so the client's own request building, response models and stream
accumulator judge the shapes; the replies come from the tiny test model.
"""

import json

import anthropic
import jsonschema
import pytest
from decode_loop import constrained_decode
from kakeya_daemon.anthropic_api import (
    AnthropicError,
    MessageStream,
    Usage,
    count_tokens_response,
    message_response,
    new_message_id,
    parse_count_tokens_request,
    parse_messages_request,
    stop_reason,
)

from kakeya_mlx.constrain import Constrainer
from kakeya_mlx.errors import InvalidArgumentError
from kakeya_mlx.toolcalls import HERMES, ToolCallDelta, ToolCallParser, parse_reply, render_prompt, tool_support

try:  # the HTTP library the client is built on: httpx2 in recent releases, httpx before
    import httpx2 as httpx
except ImportError:
    import httpx

WEATHER = {
    "name": "get_weather",
    "description": "Current weather for a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"],
        "additionalProperties": False,
    },
}
CONVERSATION = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": [
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris", "unit": "celsius"}},
        ],
    },
    {
        "role": "user",
        "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "18 C"}]},
            {"type": "text", "text": "And tomorrow?"},
        ],
    },
]


def _client(handler) -> anthropic.Anthropic:
    def respond(request: httpx.Request) -> httpx.Response:
        try:
            return handler(request.url.path, json.loads(request.content))
        except AnthropicError as e:
            return httpx.Response(e.status, json=e.body())

    return anthropic.Anthropic(
        api_key="unused",
        base_url="http://kakeya.test",
        max_retries=0,
        http_client=httpx.Client(transport=httpx.MockTransport(respond)),
    )


def _generate(loaded, request, seed: int = 0):
    """Decode a reply to a request forcing a call: (text pieces, a parser, prompt tokens, output tokens)."""
    support = tool_support(loaded.tokenizer, loaded.chat_template)
    prompt_text = render_prompt(loaded.tokenizer, support, request.messages, request.tools)
    prompt = loaded.tokenizer.encode(prompt_text, add_special_tokens=False)
    constrainer = Constrainer.for_model(loaded)
    spec = request.constraint(support.format, loaded.tokenizer.get_vocab())  # these tests force a call
    out = constrained_decode(
        loaded, constrainer.matcher(constrainer.compile(spec)), prompt, request.max_tokens, 1.0, seed
    )
    pieces = [
        loaded.tokenizer.decode(out.tokens[: i + 1])[len(loaded.tokenizer.decode(out.tokens[:i])) :]
        for i in range(len(out.tokens))
    ]
    return pieces, ToolCallParser(support.format, [t.name for t in request.tools]), len(prompt), len(out.tokens)


def test_the_client_reads_a_reply_with_a_forced_tool_call(loaded_qwen3):
    seen = []

    def handler(path, body):
        request = parse_messages_request(body)
        seen.append(request)
        pieces, parser, n_in, n_out = _generate(loaded_qwen3, request)
        content, calls = parse_reply("".join(pieces), parser.format, [t.name for t in request.tools])
        reply = message_response(
            new_message_id(),
            request.model,
            content,
            calls,
            stop_reason("eos", bool(calls)),
            None,
            Usage(n_in, n_out, 7),
        )
        return httpx.Response(200, json=reply)

    message = _client(handler).messages.create(
        model="tiny",
        max_tokens=200,
        system="Be brief.",
        messages=CONVERSATION,
        tools=[WEATHER],
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
    )
    assert message.stop_reason == "tool_use" and message.role == "assistant"
    (call,) = [b for b in message.content if b.type == "tool_use"]
    assert call.name == "get_weather"
    jsonschema.validate(call.input, WEATHER["input_schema"])
    assert message.usage.cache_read_input_tokens == 7 and message.usage.output_tokens > 0

    request = seen[0]  # what the client sent, as the engine sees it
    assert request.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                {
                    "id": "toolu_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "toolu_1", "content": "18 C"},
        {"role": "user", "content": "And tomorrow?"},
    ]
    # Only what the body gave: the daemon core supplies the defaults in force (no temperature here).
    assert request.params == {"max_tokens": 200} and request.tool_choice.mode == "required"


def test_the_client_accumulates_our_stream_events(loaded_qwen3):
    events_sent, call_ids = [], []

    def handler(path, body):
        request = parse_messages_request(body)
        assert request.stream
        pieces, parser, n_in, n_out = _generate(loaded_qwen3, request, seed=3)
        stream = MessageStream(new_message_id(), request.model, Usage(n_in, cache_read_input_tokens=5))
        chunks = stream.start() + stream.text("Let me look that up.")
        for piece in pieces:
            for item in parser.feed(piece):
                chunks += stream.tool_call(item) if isinstance(item, ToolCallDelta) else stream.text(item)
        for item in parser.finish():
            chunks += stream.tool_call(item) if isinstance(item, ToolCallDelta) else stream.text(item)
        chunks += stream.finish(stop_reason("eos", bool(parser.calls)), None, Usage(n_in, n_out, 5))
        call_ids.extend(c.id for c in parser.calls)
        events_sent.extend(json.loads(c.decode().split("data: ", 1)[1])["type"] for c in chunks)
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=b"".join(chunks))

    client = _client(handler)
    ask = {
        "model": "tiny",
        "max_tokens": 200,
        "messages": CONVERSATION[:1],
        "tools": [WEATHER],
        "tool_choice": {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
    }
    with client.messages.stream(**ask) as stream:
        final = stream.get_final_message()
    sent_first = list(events_sent)
    events_sent.clear()
    received = [
        event.type for event in client.messages.create(**ask, stream=True)
    ]  # each parsed into the client's event models
    assert received == [e for e in events_sent if e != "ping"]  # the client passes every event on but pings
    events_sent[:] = sent_first
    assert events_sent[:2] == ["message_start", "ping"] and events_sent[-2:] == ["message_delta", "message_stop"]
    assert events_sent[2:-2] == [
        "content_block_start",
        "content_block_delta",
        "content_block_stop",  # the text block
        "content_block_start",
        "content_block_delta",
        "content_block_stop",  # the tool_use block
    ]
    assert final.stop_reason == "tool_use" and final.usage.cache_read_input_tokens == 5
    text, call = final.content
    assert text.type == "text" and text.text == "Let me look that up."
    assert call.type == "tool_use" and call.name == "get_weather" and call.id == call_ids[0]
    jsonschema.validate(call.input, WEATHER["input_schema"])


def test_plain_text_streams_in_one_block_with_its_stop_reason():
    stream = MessageStream("msg_x", "tiny", Usage(3))
    chunks = (
        stream.start()
        + stream.text("Hello")
        + stream.text("")
        + stream.text(", world")
        + stream.finish("max_tokens", None, Usage(3, 2))
    )

    client = _client(
        lambda path, body: httpx.Response(200, headers={"content-type": "text/event-stream"}, content=b"".join(chunks))
    )
    with client.messages.stream(model="tiny", max_tokens=2, messages=[{"role": "user", "content": "hi"}]) as s:
        final = s.get_final_message()
    assert [b.text for b in final.content] == ["Hello, world"]
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 2 and final.usage.input_tokens == 3


def test_count_tokens_through_the_client(loaded_qwen3):
    def handler(path, body):
        assert path == "/v1/messages/count_tokens"
        request = parse_count_tokens_request(body)
        support = tool_support(loaded_qwen3.tokenizer, loaded_qwen3.chat_template)
        text = render_prompt(loaded_qwen3.tokenizer, support, request.messages, request.tools)
        return httpx.Response(
            200, json=count_tokens_response(len(loaded_qwen3.tokenizer.encode(text, add_special_tokens=False)))
        )

    client = _client(handler)
    with_tools = client.messages.count_tokens(model="tiny", messages=CONVERSATION, tools=[WEATHER])
    without = client.messages.count_tokens(model="tiny", messages=CONVERSATION)
    assert with_tools.input_tokens > without.input_tokens > 10


def test_the_client_raises_our_errors_with_the_field_named():
    client = _client(lambda path, body: parse_messages_request(body))
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(
            model="tiny",
            max_tokens=10,
            messages=CONVERSATION[:2]
            + [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_9", "content": "x"}]}],
        )
    assert caught.value.status_code == 400
    assert caught.value.body == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": caught.value.body["error"]["message"]},
    }
    assert caught.value.body["error"]["message"].startswith("messages[2].content[0].tool_use_id:")


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"max_tokens": None}, "max_tokens:"),
        ({"max_tokens": 0}, "max_tokens:"),
        ({"model": ""}, "model:"),
        ({"messages": []}, "messages:"),
        ({"messages": [{"role": "system", "content": "x"}]}, "messages[0].role:"),
        ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, "messages[0].content[0]:"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "a"},
                            {"type": "tool_result", "tool_use_id": "t", "content": "r"},
                        ],
                    }
                ]
            },
            "messages[0].content[1]:",
        ),
        (
            {
                "messages": CONVERSATION[:1]
                + [{"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": "{}"}]}]
            },
            "messages[1].content[0].input:",
        ),
        ({"system": 5}, "system:"),
        ({"system": [{"type": "image"}]}, "system[0]:"),
        ({"temperature": 1.5}, "temperature:"),
        ({"top_p": -0.1}, "top_p:"),
        ({"top_k": 2.5}, "top_k:"),
        ({"stop_sequences": ["ok", ""]}, "stop_sequences:"),
        ({"stream": "yes"}, "stream:"),
        ({"tools": [{"name": "bad name", "input_schema": {"type": "object"}}]}, "tools[0].name:"),
        ({"tools": [{"name": "f", "input_schema": {"type": "objekt"}}]}, "tools[0].input_schema: cannot be compiled"),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools[0]:"),
        ({"tools": [WEATHER], "tool_choice": {"type": "tool", "name": "nope"}}, "tool_choice.name:"),
        ({"tool_choice": {"type": "any"}}, "tool_choice.type:"),
        ({"tools": [WEATHER], "tool_choice": {"type": "sometimes"}}, "tool_choice.type:"),
    ],
)
def test_bad_requests_name_the_field(change, field):
    body = {"model": "tiny", "max_tokens": 16, "messages": CONVERSATION}
    body.update(change)
    body = {k: v for k, v in body.items() if v is not None}
    with pytest.raises(AnthropicError) as caught:
        parse_messages_request(body)
    assert caught.value.message.startswith(field) and caught.value.status == 400
    assert caught.value.body()["error"]["type"] == "invalid_request_error"


def test_requests_map_to_engine_terms():
    request = parse_messages_request(
        {
            "model": "tiny",
            "max_tokens": 9,
            "system": [{"type": "text", "text": "One."}, {"type": "text", "text": "Two."}],
            "messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi"}],
            "temperature": 0,
            "top_p": 0.9,
            "top_k": 5,
            "stop_sequences": ["\n\n"],
            "metadata": {"user_id": "ignored"},
            "tools": [WEATHER],
            "tool_choice": {"type": "auto", "disable_parallel_tool_use": True},
        }
    )
    assert request.messages == [{"role": "system", "content": "One.\n\nTwo."}, {"role": "user", "content": "Say hi"}]
    assert request.prefill == "Hi"  # a final assistant message is continued
    assert request.params == {"max_tokens": 9, "temperature": 0.0, "top_p": 0.9, "top_k": 5, "stop": ["\n\n"]}
    assert request.stop_sequences == ["\n\n"] and request.max_tokens == 9
    assert request.tool_choice.mode == "auto" and not request.parallel_tool_calls
    assert request.constraint(HERMES) is None  # auto forces nothing
    assert (
        parse_count_tokens_request({"model": "tiny", "messages": [{"role": "user", "content": "x"}]}).max_tokens is None
    )


def test_stop_reasons_and_engine_errors_map_to_anthropic_terms():
    assert [stop_reason(r, False) for r in ("eos", "max_tokens", "stop_sequence")] == [
        "end_turn",
        "max_tokens",
        "stop_sequence",
    ]
    assert stop_reason("eos", True) == "tool_use" and stop_reason("max_tokens", True) == "max_tokens"
    error = AnthropicError.from_engine(InvalidArgumentError("constraint.pattern: bad"))
    assert (error.status, error.body()) == (
        400,
        {"type": "error", "error": {"type": "invalid_request_error", "message": "constraint.pattern: bad"}},
    )
    reply = message_response("msg_1", "tiny", "Hi", [], "stop_sequence", "\n\n", Usage(4, 2))
    assert anthropic.types.Message.model_validate(reply).stop_sequence == "\n\n"
