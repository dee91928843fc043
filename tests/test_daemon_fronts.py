"""Both fronts over one core: shared limits, leases across fronts, the HTTP front's errors, logs and socket.

A real daemon with its Unix socket and its HTTP front, spoken to with raw frames,
raw HTTP and the official `openai` client.
"""

import asyncio
import json
import logging
import os
import shutil
import stat
import sys
import tempfile
from pathlib import Path

import aiohttp
import openai
import pytest

from kakeya_daemon.lifecycle import StartError
from kakeya_daemon.server import Daemon, running_daemon
from test_daemon import RawClient, done_of, endless, make_config, new_session, sock_dir  # noqa: F401
from test_daemon_http import free_port

KEY = "k"
CHAT = [{"role": "user", "content": "Tell me about the sea."}]


def http_config(qwen3_dir, sock_dir, **overrides):
    settings = dict(http_port=free_port(), http_api_keys=KEY, max_new_tokens=1000)
    settings.update(overrides)
    return make_config(qwen3_dir, sock_dir, **settings)


def url_of(daemon: Daemon) -> str:
    return next(u for u in daemon.http.urls if u.startswith("http://"))


def openai_client(daemon: Daemon) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url_of(daemon) + "/v1", api_key=KEY, max_retries=0)


async def sse_events(response: aiohttp.ClientResponse):
    """The data lines of a server-sent-events response, as they arrive."""
    async for line in response.content:
        if line.startswith(b"data: "):
            yield line[6:].strip()


async def until(predicate) -> None:
    while not predicate():
        await asyncio.sleep(0.01)


def chat(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Conversation number {i}, about the sea."}]


# ---- one rule for limits: every session counts; pooled idle HTTP sessions go first ----------


@pytest.mark.parametrize("eviction", ["destroy", "spill"])
async def test_http_sessions_count_in_max_sessions_and_make_room_for_socket_ones(
    qwen3_dir, sock_dir, loaded_qwen3, eviction
):
    config = http_config(qwen3_dir, sock_dir, max_sessions=2, eviction=eviction)
    async with running_daemon(config, loaded=loaded_qwen3) as d:
        client = openai_client(d)
        for i in range(4):
            await client.chat.completions.create(model=loaded_qwen3.name, messages=chat(i), max_tokens=2)
        raw = await RawClient.connect(d.socket_path)
        stats = await raw.result("stats")
        assert stats["sessions"]["active"] == 2 and stats["sessions"]["pooled"] == 2
        assert stats["sessions"]["evicted_pooled"] == 2
        # A socket session is made room for by closing the least recently used pooled one.
        first = await new_session(raw)
        second = await new_session(raw)
        stats = await raw.result("stats")
        assert stats["sessions"]["active"] == 2 and stats["sessions"]["pooled"] == 0
        if eviction == "destroy":
            # Socket sessions are never closed to make room: now the HTTP front is refused, naming the limit.
            with pytest.raises(openai.RateLimitError, match="max_sessions=2"):
                await client.chat.completions.create(model=loaded_qwen3.name, messages=chat(9), max_tokens=2)
        else:
            # The least recently used socket session moves to the session store to make room...
            await client.chat.completions.create(model=loaded_qwen3.name, messages=chat(9), max_tokens=2)
            states = {s["session_id"]: s["state"] for s in (await raw.result("list_sessions"))["sessions"]}
            assert (states[first], states[second]) == ("stored", "resident")
            # ...and comes back on its next request, the pooled one closed for it.
            assert "restored" in await raw.result("session_info", session_id=first)
            stats = await raw.result("stats")
            assert stats["sessions"]["pooled"] == 0 and stats["sessions"]["evicted_pooled"] == 5
        for sid in (first, second):
            assert (await raw.result("session_info", session_id=sid))["state"] == "resident"
        await raw.close()
        await client.close()


async def test_a_session_checked_out_by_an_http_request_is_never_evicted(qwen3_dir, sock_dir, endless):
    config = http_config(qwen3_dir, sock_dir, max_sessions=2, eviction="destroy")
    async with running_daemon(config, loaded=endless) as d:
        client = openai_client(d)
        await client.chat.completions.create(model=endless.name, messages=chat(1), max_tokens=2)  # one pooled, idle
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as http:
            body = {"messages": chat(2), "max_tokens": 300, "stream": True}
            async with http.post(url_of(d) + "/v1/chat/completions", json=body) as response:
                events = sse_events(response)
                await events.__anext__()  # the stream runs: its session is leased
                raw = await RawClient.connect(d.socket_path)
                await raw.result("create_session")  # closes the idle pooled session, not the leased one
                refused = await raw.call("create_session")
                assert refused["error"]["code"] == "resource_exhausted" and "max_sessions=2" in refused["error"]["message"]
                rest = [e async for e in events]
        finals = [json.loads(e) for e in rest[:-1] if json.loads(e)["choices"]]
        assert rest[-1] == b"[DONE]" and finals[-1]["choices"][0]["finish_reason"] == "length"
        stats = await raw.result("stats")
        assert stats["sessions"]["evicted_pooled"] == 1 and stats["rejections"]["max_sessions"] == 1
        await raw.close()
        await client.close()


async def test_a_socket_append_into_a_pooled_http_session(qwen3_dir, sock_dir, loaded_qwen3):
    config = http_config(qwen3_dir, sock_dir)
    async with running_daemon(config, loaded=loaded_qwen3) as d:
        client = openai_client(d)
        raw = await RawClient.connect(d.socket_path)
        prompt = (await raw.result("tokenize", text="Once upon a time"))["tokens"]
        first = await client.completions.create(model=loaded_qwen3.name, prompt=prompt, max_tokens=4, temperature=0)
        (pooled,) = (await raw.result("list_sessions"))["sessions"]
        sid = pooled["session_id"]
        # Idle in the pool, the session is anyone's: a socket client appends to it.
        appended = await raw.result("append", session_id=sid, tokens=[5, 6, 7])
        history_length = appended["history_length"]
        assert history_length == len(prompt) + first.usage.completion_tokens + 3
        # The pool matches the session by what its history now is, and reuses all of it.
        history = prompt + (await raw.result("tokenize", text=first.choices[0].text))["tokens"]
        if len(history) == len(prompt) + first.usage.completion_tokens:  # the reply re-tokenizes the same way
            extended = history + [5, 6, 7, 9]
            again = await client.completions.create(model=loaded_qwen3.name, prompt=extended, max_tokens=2)
            assert again.usage.prompt_tokens_details.cached_tokens == history_length
        # By its old text, the session no longer matches: the socket's tokens are not in that text.
        text = await client.completions.create(
            model=loaded_qwen3.name, prompt="Once upon a time" + first.choices[0].text + " and", max_tokens=2
        )
        assert text.usage.prompt_tokens_details.cached_tokens < history_length
        await raw.close()
        await client.close()


async def test_a_socket_request_on_a_session_an_http_turn_holds_is_busy(qwen3_dir, sock_dir, endless):
    async with running_daemon(http_config(qwen3_dir, sock_dir), loaded=endless) as d:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as http:
            # Long enough to be running still when cancelled (the cap, max_new_tokens); it never gets there.
            body = {"prompt": "Once upon a time", "max_tokens": 1000, "stream": True}
            async with http.post(url_of(d) + "/v1/completions", json=body) as response:
                events = sse_events(response)
                await events.__anext__()
                raw = await RawClient.connect(d.socket_path)
                (held,) = (await raw.result("list_sessions"))["sessions"]
                for method, params in (("append", {"tokens": [1]}), ("generate", {}), ("close_session", {})):
                    reply = await raw.call(method, session_id=held["session_id"], **params)
                    assert reply["error"]["code"] == "busy" and "/v1/completions" in reply["error"]["message"]
                # Cancel, though, reaches any generation: the HTTP stream ends with an error event and [DONE].
                assert await raw.result("cancel", session_id=held["session_id"]) == {"cancelled": True}
                rest = [e async for e in events]
        assert rest[-1] == b"[DONE]" and json.loads(rest[-2])["error"]["code"] == "cancelled"
        await raw.close()


# ---- the HTTP front: errors in the OpenAI shape, its logs, its socket, its limits ------------


async def raw_http(url: str, data: bytes) -> tuple[int, dict]:
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(data)
    await writer.drain()
    response = await reader.read()
    writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    return status, json.loads(body)


def request_bytes(path: str, body: bytes, auth: bytes = b"Bearer " + KEY.encode()) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n".encode()
        + b"Authorization: " + auth + b"\r\nConnection: close\r\n\r\n" + body
    )


@pytest.mark.parametrize(
    "data, status",
    [
        (request_bytes("/v1/chat/completions", b"[" * 200000 + b"]" * 200000), 400),
        (request_bytes("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800"}]}'), 400),
        (request_bytes("/v1/models", b"{}", auth=b"Bearer \xff\xfe"), 401),
        (b"GARBAGE\r\n\r\n", 400),
        (b"POST /v1/completions HTTP/1.1\r\nContent-Length: nope\r\n\r\n", 400),
    ],
    ids=["deep json", "lone surrogate", "non-utf8 authorization", "not http", "bad header"],
)
async def test_every_http_client_error_is_a_4xx_in_the_openai_shape(qwen3_dir, sock_dir, loaded_qwen3, data, status):
    async with running_daemon(http_config(qwen3_dir, sock_dir), loaded=loaded_qwen3) as d:
        got, body = await raw_http(url_of(d), data)
        assert got == status
        assert set(body["error"]) == {"message", "type", "param", "code"}
        # The daemon serves on.
        async with aiohttp.ClientSession() as http:
            async with http.get(url_of(d) + "/healthz") as r:
                assert r.status == 200


async def _stalled_request(daemon: Daemon) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection holding half a request (and nothing more)."""
    host, port = url_of(daemon).removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Le")
    await writer.drain()
    return reader, writer


async def test_a_stalled_http_request_and_too_many_connections(qwen3_dir, sock_dir, loaded_qwen3, caplog):
    caplog.set_level(logging.INFO, logger="kakeya")
    # The stalled connection must still be open when the next one comes: frame_timeout_s is left long.
    async with running_daemon(http_config(qwen3_dir, sock_dir, http_max_connections=1), loaded=loaded_qwen3) as d:
        _, writer = await _stalled_request(d)
        await until(lambda: d.core.counters.http_connections == 1)
        status, body = await raw_http(url_of(d), b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 503 and "http_max_connections=1" in body["error"]["message"]
        assert "http_max_connections=1" in caplog.text
        writer.close()
        await until(lambda: d.core.counters.http_connections == 0)
        status, _ = await raw_http(url_of(d), b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert status == 200
    async with running_daemon(http_config(qwen3_dir, sock_dir, frame_timeout_s=0.2), loaded=loaded_qwen3) as d:
        reader, writer = await _stalled_request(d)
        response = await reader.read()
        assert b" 408 " in response.split(b"\r\n")[0] and b"frame_timeout_s=0.2" in response
        writer.close()
        assert "frame_timeout_s=0.2" in caplog.text
        await until(lambda: d.core.counters.http_connections == 0)


async def test_http_requests_and_generations_are_logged(qwen3_dir, sock_dir, loaded_qwen3, caplog):
    caplog.set_level(logging.INFO, logger="kakeya")
    async with running_daemon(http_config(qwen3_dir, sock_dir), loaded=loaded_qwen3) as d:
        client = openai_client(d)
        await client.chat.completions.create(model=loaded_qwen3.name, messages=CHAT, max_tokens=3, temperature=0)
        await client.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "kakeya.http"]
    request = next(line for line in lines if "POST /v1/chat/completions 200" in line)
    assert "prompt" in request and "cached" in request and "3 generated tokens" in request and "s" in request
    generation = [r.getMessage() for r in caplog.records if "generation done" in r.getMessage()]
    assert generation and "POST /v1/chat/completions" in generation[0]


async def test_without_max_tokens_http_generates_the_same_256_as_the_socket(qwen3_dir, sock_dir, endless):
    async with running_daemon(http_config(qwen3_dir, sock_dir), loaded=endless) as d:
        client = openai_client(d)
        reply = await client.completions.create(model=endless.name, prompt="Once upon a time")
        raw = await RawClient.connect(d.socket_path)
        socket_done = done_of(await raw.generate(session_id=await new_session(raw)))
        assert reply.usage.completion_tokens == socket_done["generated_tokens"] == 256
        # A tiny temperature decodes greedily over HTTP too.
        kw = dict(model=endless.name, prompt="Once upon a time", max_tokens=8)
        greedy = await client.completions.create(temperature=0, **kw)
        tiny = await client.completions.create(temperature=1e-300, seed=5, **kw)
        assert tiny.choices[0].text == greedy.choices[0].text
        await raw.close()
        await client.close()


def private_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="kh-", dir="/tmp"))


async def test_the_http_socket_is_claimed_like_the_main_socket(qwen3_dir, sock_dir, loaded_qwen3):
    shared = private_dir()
    try:
        shared.chmod(0o777)
        config = make_config(qwen3_dir, sock_dir, http_socket=str(shared / "http.sock"))
        with pytest.raises(StartError, match="world-writable.*--http-socket"):
            await Daemon(config, loaded=loaded_qwen3).start()
        assert not config.socket_path().exists()
        shared.chmod(0o700)
        async with running_daemon(config, loaded=loaded_qwen3) as d:
            path = shared / "http.sock"
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
            # A second daemon (another main socket) cannot take the same HTTP socket.
            other = make_config(qwen3_dir, sock_dir, socket=str(sock_dir / "other.sock"), http_socket=str(path))
            with pytest.raises(StartError, match="already serving"):
                await Daemon(other, loaded=loaded_qwen3).start()
            assert d.http.urls == [f"unix:{path}"]
        assert not path.exists() and not Path(str(path) + ".lock").exists()
    finally:
        shutil.rmtree(shared, ignore_errors=True)


# ---- stopping ends every generation of both fronts properly -----------------------------------


async def test_shutdown_ends_socket_and_http_generations_with_their_endings(qwen3_dir, sock_dir, endless, caplog):
    caplog.set_level(logging.INFO, logger="kakeya")
    async with running_daemon(http_config(qwen3_dir, sock_dir), loaded=endless) as d:
        streamer = await RawClient.connect(d.socket_path)
        sid = await new_session(streamer)
        gen = streamer.request("generate", session_id=sid, max_tokens=1000)
        await streamer.send(gen)
        await streamer.next_frame(gen["id"])
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as http:
            body = {"messages": CHAT, "max_tokens": 1000, "stream": True}
            async with (
                http.post(url_of(d) + "/v1/chat/completions", json=body) as response,
                http.post(url_of(d) + "/v1/messages", json={**body, "model": "m"}) as messages,
            ):
                events, anthropic_events = sse_events(response), sse_events(messages)
                await events.__anext__()
                await anthropic_events.__anext__()
                admin = await RawClient.connect(d.socket_path)
                assert await admin.result("shutdown") == {"ok": True}
                rest = [e async for e in events]
                anthropic_rest = [json.loads(e) async for e in anthropic_events]
        assert rest[-1] == b"[DONE]" and json.loads(rest[-2])["error"]["code"] == "cancelled"
        # Anthropic's stream ends with an error event instead of message_stop.
        assert anthropic_rest[-1]["type"] == "error" and "cancelled" in anthropic_rest[-1]["error"]["message"]
        assert "message_stop" not in [e["type"] for e in anthropic_rest]
        done = done_of(await streamer.events(gen["id"]))
        assert done["stop_reason"] == "cancelled" and done["generated_tokens"] < 1000
        await d.wait_stopped()
        await streamer.close()
        await admin.close()
    assert "shutting down: 3 generation(s) in flight" in caplog.text


@pytest.mark.skipif(os.getuid() != 0, reason="connecting as another user needs root")
async def test_http_socket_peers_of_another_uid_are_refused(qwen3_dir, sock_dir, loaded_qwen3):
    directory = private_dir()
    path = directory / "http.sock"
    try:
        async with running_daemon(make_config(qwen3_dir, sock_dir, http_socket=str(path)), loaded=loaded_qwen3) as d:
            directory.chmod(0o755)  # let the kernel take the other user as far as the socket at all
            os.chmod(path, 0o666)
            probe = (
                "import os, socket\n"
                "os.setgid(65534); os.setuid(65534)\n"
                "s = socket.socket(socket.AF_UNIX); s.connect(%r)\n"
                "try:\n"
                "    s.sendall(b'GET /healthz HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n')\n"
                "except BrokenPipeError:\n"
                "    pass  # refused before the request was read\n"
                "data = b''\n"
                "while True:\n"
                "    chunk = s.recv(65536)\n"
                "    if not chunk: break\n"
                "    data += chunk\n"
                "print(data.decode())\n"
            ) % str(path)
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", probe, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
            )
            out, err = await proc.communicate()
            assert proc.returncode == 0, err.decode()[-2000:]
            head, _, body = out.decode().partition("\r\n\r\n")
            assert proc.returncode == 0 and " 403 " in head.splitlines()[0]
            assert "uid 65534 refused" in json.loads(body)["error"]["message"]
            assert d.core.counters.rejections["peer_uid"] == 1
    finally:
        shutil.rmtree(directory, ignore_errors=True)
