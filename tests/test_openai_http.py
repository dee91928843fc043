"""The OpenAI-compatible HTTP front, spoken to by the official `openai` client and raw HTTP.

A real tiny model with its real tokenizer and chat template, served by the real
daemon (core, admission, session pool) with its HTTP front on a loopback port
(and a Unix socket).
"""

import asyncio
import contextlib
import dataclasses
import json
import shutil
import socket
import tempfile
from pathlib import Path

import aiohttp
import httpx2
import openai
import pytest

from kakeya_daemon.server import Daemon, running_daemon
from kakeya_mlx.engine import Engine
from kakeya_mlx.loader import load_model
from test_daemon import make_config
from tools.make_test_model import make_test_model

KEY = "sk-test-key"
MAX_BODY = 64 * 1024
QUESTION = [{"role": "user", "content": "The quick brown fox jumps over the lazy dog. What next?"}]
# Guards a wait against a server that never finishes; not a performance threshold.
HANG_GUARD_S = 120.0


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_test_model(tmp_path_factory.mktemp("http-model"), variant="qwen3", seed=0)


@pytest.fixture(scope="module")
def endless(model_dir):
    """The test model with no end-of-sequence token: every generation runs to max_tokens."""
    return dataclasses.replace(load_model(str(model_dir)), eos_token_ids=[])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class Front:
    daemon: Daemon
    url: str
    model: str

    clients: list = dataclasses.field(default_factory=list)

    @property
    def engine(self) -> Engine:
        return self.daemon.engine

    def client(self, api_key: str = KEY) -> openai.AsyncOpenAI:
        self.clients.append(openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0))
        return self.clients[-1]

    def sessions(self) -> list[dict]:
        return self.daemon.core.list_sessions()


@contextlib.asynccontextmanager
async def running_front(loaded, **settings):
    directory = Path(tempfile.mkdtemp(prefix="kh-", dir="/tmp"))
    options = dict(
        max_append_tokens=1024, max_new_tokens=1000, http_port=free_port(), http_api_keys=KEY, http_max_body_bytes=MAX_BODY
    )
    options.update(settings)
    try:
        async with running_daemon(make_config("unused", directory, **options), loaded=loaded) as daemon:
            url = next((u for u in daemon.http.urls if u.startswith("http://")), None)
            front = Front(daemon, url, daemon.engine.model_info()["name"])
            try:
                yield front
            finally:
                for client in front.clients:
                    await client.close()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
async def front(endless):
    async with running_front(endless) as f:
        yield f


async def engine_reply(engine: Engine, tokens: list[int], max_tokens: int) -> str:
    """What the engine itself generates (greedy) after `tokens`, on a fresh session."""
    sid = await engine.create_session()
    await engine.append(sid, tokens=tokens)
    done = [e async for e in engine.generate(sid, max_tokens=max_tokens)][-1]
    await engine.close_session(sid)
    return done.text


async def chat_prompt_tokens(engine: Engine, messages: list[dict]) -> list[int]:
    text = engine.render_messages(messages, continuation=False, add_generation_prompt=True)
    return await engine.tokenize(text, add_special_tokens=False)


async def raw_post(front: Front, path: str, data: bytes, headers=None) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json", **(headers or {})}
    async with aiohttp.ClientSession() as http:
        async with http.post(front.url + path, data=data, headers=headers) as r:
            return r.status, await r.json()


def assert_error_envelope(body: dict, param=None) -> dict:
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if param is not None:
        assert error["param"] == param
    return error


# ---- models, health, auth ----------------------------------------------------


async def test_models_health_and_bearer_keys(front):
    client = front.client()
    models = await client.models.list()
    assert [m.id for m in models.data] == [front.model]
    assert (await client.models.retrieve(front.model)).id == front.model
    # One model is served, so any id names it; the reply says which it is.
    assert (await client.models.retrieve("gpt-4o")).id == front.model

    with pytest.raises(openai.AuthenticationError) as wrong:
        await front.client(api_key="sk-wrong").models.list()
    assert wrong.value.status_code == 401 and wrong.value.code == "invalid_api_key"
    async with aiohttp.ClientSession() as http:
        async with http.get(front.url + "/v1/models") as r:  # no Authorization header at all
            assert r.status == 401 and "Bearer" in r.headers["WWW-Authenticate"]
            assert assert_error_envelope(await r.json())["type"] == "authentication_error"
        async with http.get(front.url + "/healthz") as r:  # health needs no key
            assert r.status == 200 and (await r.json())["status"] == "ok"
        async with http.get(front.url + "/v1/nothing-here", headers={"Authorization": f"Bearer {KEY}"}) as r:
            assert r.status == 404
            assert_error_envelope(await r.json())


# ---- completions -----------------------------------------------------------------


async def test_chat_completion_is_the_engines_greedy_reply_with_usage(front):
    client = front.client()
    reply = await client.chat.completions.create(model=front.model, messages=QUESTION, max_tokens=12, temperature=0)
    prompt = await chat_prompt_tokens(front.engine, QUESTION)
    assert reply.object == "chat.completion" and reply.model == front.model
    choice = reply.choices[0]
    assert choice.finish_reason == "length" and choice.message.role == "assistant"
    assert choice.message.content == await engine_reply(front.engine, prompt, 12)
    assert reply.usage.prompt_tokens == len(prompt)
    assert reply.usage.completion_tokens == 12
    assert reply.usage.total_tokens == len(prompt) + 12
    assert reply.usage.prompt_tokens_details.cached_tokens == 0


async def test_streamed_deltas_concatenate_to_the_whole_reply(front):
    client = front.client()
    whole = await client.chat.completions.create(model=front.model, messages=QUESTION, max_tokens=20, temperature=0)
    stream = await client.chat.completions.create(
        model=front.model,
        messages=QUESTION,
        max_tokens=20,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(deltas) == whole.choices[0].message.content
    # Deltas come from the engine's text stream: none ends inside a character or a joined grapheme.
    assert not any(d.endswith(("\ufffd", "\u200d")) for d in deltas[:-1])
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


async def test_stop_string_ends_with_finish_reason_stop(front):
    client = front.client()
    full = (
        (await client.chat.completions.create(model=front.model, messages=QUESTION, max_tokens=40, temperature=0))
        .choices[0]
        .message.content
    )
    visible = [i for i in range(4, len(full) - 2) if full[i : i + 2].strip() and full[i : i + 2] not in full[:i]]
    assert visible, f"need a stop string inside the reply {full!r}"
    stop = full[visible[0] : visible[0] + 2]
    for stream in (False, True):
        kw = dict(model=front.model, messages=QUESTION, max_tokens=40, temperature=0, stop=[stop])
        if stream:
            chunks = [c async for c in await client.chat.completions.create(stream=True, **kw)]
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        else:
            reply = await client.chat.completions.create(**kw)
            text, finish = reply.choices[0].message.content, [reply.choices[0].finish_reason]
        assert text == full[: visible[0]]
        assert finish == ["stop"]


async def test_seeded_sampling_repeats(front):
    client = front.client()
    kw = dict(model=front.model, messages=QUESTION, max_completion_tokens=10, temperature=0.9, top_p=0.95, seed=7)
    first = await client.chat.completions.create(**kw)
    again = await client.chat.completions.create(**kw)
    assert first.choices[0].message.content == again.choices[0].message.content
    assert first.usage.completion_tokens == 10


async def test_text_completion_with_text_and_token_prompts(front):
    client = front.client()
    prompt = "Once upon a time"
    ids = await front.engine.tokenize(prompt, add_special_tokens=True)
    by_text = await client.completions.create(model=front.model, prompt=prompt, max_tokens=8, temperature=0)
    assert by_text.object == "text_completion" and by_text.choices[0].finish_reason == "length"
    assert by_text.choices[0].text == await engine_reply(front.engine, ids, 8)
    assert by_text.usage.prompt_tokens == len(ids) and by_text.usage.completion_tokens == 8
    by_ids = await client.completions.create(model=front.model, prompt=ids, max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    streamed = await client.completions.create(
        model=front.model, prompt=prompt, max_tokens=8, temperature=0, stream=True
    )
    assert "".join([c.choices[0].text async for c in streamed]) == by_text.choices[0].text


# ---- cache reuse across stateless requests ---------------------------------------------


async def test_next_chat_turn_reuses_the_resident_session(front):
    client = front.client()
    first = await client.chat.completions.create(model=front.model, messages=QUESTION, max_tokens=16, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    sessions_after_first = len(front.sessions())
    turn2 = QUESTION + [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "Tell me more."},
    ]
    second = await client.chat.completions.create(model=front.model, messages=turn2, max_tokens=16, temperature=0)
    reused = second.usage.prompt_tokens_details.cached_tokens
    # The whole first exchange (prompt and reply) stayed resident: only the new turn ran.
    assert reused == first.usage.prompt_tokens + first.usage.completion_tokens
    assert second.usage.prompt_tokens > reused
    assert len(front.sessions()) == sessions_after_first

    # The third turn, streamed, continues the same session again.
    turn3 = turn2 + [
        {"role": "assistant", "content": second.choices[0].message.content},
        {"role": "user", "content": "Thanks."},
    ]
    chunks = [
        c
        async for c in await client.chat.completions.create(
            model=front.model,
            messages=turn3,
            max_tokens=4,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    ]
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == second.usage.prompt_tokens + 16

    # A conversation that does not extend any resident history starts from scratch.
    other = [{"role": "user", "content": "A different question entirely."}]
    fresh = await client.chat.completions.create(model=front.model, messages=other, max_tokens=4, temperature=0)
    assert fresh.usage.prompt_tokens_details.cached_tokens == 0


async def test_completion_that_extends_a_previous_one_reuses_it(front):
    client = front.client()
    prompt = "1 2 3 4 5 6 7"
    first = await client.completions.create(model=front.model, prompt=prompt, max_tokens=10, temperature=0)
    longer = prompt + first.choices[0].text + " and so on"
    second = await client.completions.create(model=front.model, prompt=longer, max_tokens=5, temperature=0)
    assert second.usage.prompt_tokens_details.cached_tokens == first.usage.prompt_tokens + 10
    # Reuse is exact: the same output as running the extended history from scratch.
    (session,) = front.sessions()
    history = front.engine.session_history(session["session_id"])
    assert len(history) == second.usage.prompt_tokens + 5
    assert second.choices[0].text == await engine_reply(front.engine, history[:-5], 5)


async def test_at_most_max_sessions_least_recently_used_closed(endless):
    async with running_front(endless, http_max_sessions=2) as front:
        client = front.client()
        prompts = [await front.engine.tokenize(f"Conversation number {i}.") for i in range(3)]
        for ids in prompts:
            await client.completions.create(model=front.model, prompt=ids, max_tokens=4, temperature=0)

        def histories_from(ids: list[int]) -> list[list[int]]:
            histories = [front.engine.session_history(s["session_id"]) for s in front.sessions()]
            return [h for h in histories if h[: len(ids)] == ids]

        assert len(front.sessions()) == 2
        assert histories_from(prompts[0]) == []  # the least recently used was closed to make room
        (newest,) = histories_from(prompts[2])
        reply = await client.completions.create(
            model=front.model, prompt=newest + prompts[1], max_tokens=4, temperature=0
        )
        assert reply.usage.prompt_tokens_details.cached_tokens == len(newest)
        reply = await client.completions.create(
            model=front.model, prompt=prompts[0] + prompts[1], max_tokens=4, temperature=0
        )
        assert reply.usage.prompt_tokens_details.cached_tokens == 0
        assert len(front.sessions()) == 2


# ---- rejections ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, param",
    [
        ({"messages": QUESTION, "max_tokens": "8"}, "max_tokens"),
        ({"messages": QUESTION, "max_tokens": 0}, "max_tokens"),
        ({"messages": QUESTION, "max_tokens": 10**6}, "max_tokens"),
        ({"messages": QUESTION, "max_completion_tokens": 2.5}, "max_completion_tokens"),
        ({"messages": QUESTION, "temperature": True}, "temperature"),
        ({"messages": QUESTION, "temperature": 3}, "temperature"),
        ({"messages": QUESTION, "top_p": 0}, "top_p"),
        ({"messages": QUESTION, "seed": "1"}, "seed"),
        ({"messages": QUESTION, "stop": [1]}, "stop"),
        ({"messages": QUESTION, "stream": "yes"}, "stream"),
        ({"messages": QUESTION, "n": 2}, "n"),
        ({"messages": QUESTION, "logprobs": "yes"}, "logprobs"),
        ({"messages": QUESTION, "presence_penalty": 2.5}, "presence_penalty"),
        ({"messages": QUESTION, "functions": [{"name": "f"}]}, "functions"),
        ({"messages": QUESTION, "model": 5}, "model"),
        ({"messages": []}, "messages"),
        ({"messages": "hello"}, "messages"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}],
                    }
                ]
            },
            "messages[0].content[0]",
        ),
    ],
)
async def test_bad_chat_requests_get_a_400_naming_the_field(front, body, param):
    status, reply = await raw_post(front, "/v1/chat/completions", json.dumps(body).encode())
    assert status == 400, reply
    assert assert_error_envelope(reply, param)["type"] == "invalid_request_error"


async def test_text_parts_and_harmless_fields_are_accepted(front):
    parts = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]},
    ]
    body = {
        "model": front.model,
        "messages": parts,
        "max_tokens": 3,
        "temperature": 0,
        "user": "someone",
        "metadata": {"k": "v"},
        "n": 1,
        "logprobs": False,
        "tools": [],
        "frequency_penalty": 0,
        "some_future_field": {"ignored": True},
    }
    status, reply = await raw_post(front, "/v1/chat/completions", json.dumps(body).encode())
    assert status == 200, reply
    assert reply["usage"]["completion_tokens"] == 3


async def test_malformed_and_oversize_bodies(front):
    for data in (b"{not json", b"[1, 2, 3]", b'{"messages": NaN}', "\u00ff".encode("latin-1")):
        status, reply = await raw_post(front, "/v1/chat/completions", data)
        assert status == 400 and assert_error_envelope(reply)["code"] == "invalid_json", data
    big = json.dumps({"messages": [{"role": "user", "content": "x" * MAX_BODY}]}).encode()
    status, reply = await raw_post(front, "/v1/chat/completions", big)
    assert status == 413 and f"http_max_body_bytes={MAX_BODY}" in assert_error_envelope(reply)["message"]
    status, reply = await raw_post(front, "/v1/completions", json.dumps({"prompt": ["a", "b"]}).encode())
    assert status == 400 and assert_error_envelope(reply, "prompt")["code"] == "unsupported_parameter"
    status, reply = await raw_post(front, "/v1/completions", json.dumps({"prompt": [10**9]}).encode())
    assert status == 400 and "vocabulary" in assert_error_envelope(reply)["message"]
    # The openai client surfaces these as typed errors too.
    with pytest.raises(openai.BadRequestError) as bad:
        await front.client().chat.completions.create(model=front.model, messages=QUESTION, n=2)
    assert bad.value.param == "n"


async def test_admission_refusal_is_a_429_and_counted(endless):
    async with running_front(endless, max_concurrent_generations=1, queue_policy="reject") as front:
        client = front.client()
        long_one = await client.chat.completions.create(
            model=front.model, messages=QUESTION, max_tokens=900, temperature=0, stream=True
        )
        first = await long_one.__anext__()  # the slot is taken once the stream has started
        assert first.choices[0].delta.role == "assistant"
        with pytest.raises(openai.RateLimitError) as refused:
            await client.chat.completions.create(model=front.model, messages=QUESTION, max_tokens=2)
        assert "max_concurrent_generations" in refused.value.message
        await long_one.close()
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as http:
            async with http.get(front.url + "/metrics") as r:
                text = await r.text()
        assert 'kakeya_rejections_total{reason="max_concurrent_generations"} 1' in text


# ---- disconnects, metrics, Unix socket --------------------------------------------------


async def until(predicate) -> None:
    async with asyncio.timeout(HANG_GUARD_S):
        while not predicate():
            await asyncio.sleep(0.02)


@pytest.mark.parametrize("stream", [True, False])
async def test_client_disconnect_cancels_the_generation(front, stream):
    body = json.dumps(
        {"model": front.model, "messages": QUESTION, "max_tokens": 900, "temperature": 0, "stream": stream}
    )
    prompt = await chat_prompt_tokens(front.engine, QUESTION)
    host, port = front.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode()
    )
    await writer.drain()
    if stream:
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"text/event-stream" in head
        for _ in range(3):
            await reader.readuntil(b"\n\n")
    await until(lambda: any(s["generating"] for s in front.sessions()))
    writer.transport.abort()  # the client goes away mid-generation
    await until(lambda: not any(s["generating"] for s in front.sessions()))
    (session,) = front.sessions()
    assert session["history_length"] < len(prompt) + 900

    # The session is free again at once, and requests still work.
    reply = await front.client().chat.completions.create(model=front.model, messages=QUESTION, max_tokens=2)
    assert reply.usage.completion_tokens == 2
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as http:
        async with http.get(front.url + "/metrics") as r:
            assert (
                'kakeya_http_requests_total{code="499",endpoint="/v1/chat/completions"} 1'
                in (await r.text()).splitlines()
            )


async def test_metrics_report_requests_tokens_latency_and_memory(front):
    client = front.client()
    await client.chat.completions.create(model=front.model, messages=QUESTION, max_tokens=3, temperature=0)
    await client.completions.create(model=front.model, prompt="Hi", max_tokens=2, temperature=0)
    async with aiohttp.ClientSession() as http:
        async with http.get(front.url + "/metrics") as r:
            assert r.status == 401
        async with http.get(front.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}) as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
            text = await r.text()
    lines = text.splitlines()
    assert 'kakeya_http_requests_total{code="200",endpoint="/v1/chat/completions"} 1' in lines
    assert 'kakeya_http_requests_total{code="200",endpoint="/v1/completions"} 1' in lines
    assert 'kakeya_http_requests_total{code="401",endpoint="/metrics"} 1' in lines
    assert 'kakeya_http_tokens_total{endpoint="/v1/chat/completions",kind="completion"} 3' in lines
    assert 'kakeya_http_request_duration_seconds_count{endpoint="/v1/completions"} 1' in lines
    assert 'kakeya_http_time_to_first_token_seconds_count{endpoint="/v1/chat/completions"} 1' in lines
    assert "kakeya_http_sessions 2" in lines and "kakeya_sessions_active 2" in lines
    assert any(line.startswith('kakeya_memory_bytes{kind="kv"} ') for line in lines)
    assert "# TYPE kakeya_rejections_total counter" in lines
    for line in lines:
        assert line.startswith("#") or len(line.rsplit(" ", 1)) == 2


async def test_serves_on_a_unix_socket(endless):
    directory = Path(tempfile.mkdtemp(prefix="kk-", dir="/tmp"))
    path = directory / "http.sock"
    try:
        async with running_front(endless, http_port=0, http_socket=str(path), http_api_keys="") as front:
            assert front.url is None and front.daemon.http.urls == [f"unix:{path}"]
            assert path.stat().st_mode & 0o777 == 0o600
            transport = httpx2.AsyncHTTPTransport(uds=str(path))
            client = openai.AsyncOpenAI(
                base_url="http://localhost/v1",
                api_key="unused",
                max_retries=0,
                http_client=httpx2.AsyncClient(transport=transport),
            )
            reply = await client.chat.completions.create(model=front.model, messages=QUESTION, max_tokens=3)
            assert reply.usage.completion_tokens == 3
            await client.close()
        assert not path.exists()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
