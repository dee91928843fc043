"""The socket front's bounds and its answers to hostile input, against a real daemon on a real socket.

Each test here stands for a fault a client could cause: a pipelining client that
never reads, stalled half-frames, too many connections, values nested a thousand
deep, numbers outside what the sampler computes, and the corners of the wire
format the SPEC pins down.
"""

import asyncio
import logging
import struct

import msgpack
import pytest

from kakeya_daemon.server import running_daemon
from kakeya_protocol import encode_frame
from test_daemon import (  # noqa: F401  (fixtures)
    HANG_GUARD_S,
    LONG,
    PROMPT,
    RawClient,
    config,
    daemon,
    done_of,
    endless,
    new_session,
    sock_dir,
    tokens_of,
)


def frame_of(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def raw_map(*pairs: tuple[str, bytes]) -> bytes:
    """A msgpack map whose values are given as raw msgpack bytes (for values msgpack would refuse to pack)."""
    assert len(pairs) < 16
    return bytes([0x80 | len(pairs)]) + b"".join(msgpack.packb(k) + v for k, v in pairs)


def nested(depth: int) -> bytes:
    """The msgpack bytes of [[[...[1]...]]], `depth` arrays deep."""
    return b"\x91" * depth + b"\x01"


async def stays_open(client: RawClient) -> None:
    assert "uptime_s" in await client.result("stats")


# ---- a client that pipelines without reading (issue: RSS grew, others starved, stop took minutes) ----


@pytest.mark.parametrize(
    "limit, setting",
    [(dict(max_requests_per_connection=4), "max_requests_per_connection=4"),
     (dict(max_connection_buffer_bytes=256 << 10), "max_connection_buffer_bytes=262144")],
    ids=["requests", "bytes"],
)
async def test_a_client_that_never_reads_is_read_no_faster_than_it_is_answered(config, loaded_qwen3, caplog,
                                                                               limit, setting):
    caplog.set_level(logging.INFO, logger="kakeya")
    sent = 60
    async with running_daemon(config(**limit), loaded=loaded_qwen3) as d:
        greedy = await RawClient.connect(d.socket_path)
        text = "many words " * 10000  # ~110 KB a request; each reply is some 10k token ids
        frames = [greedy.request("tokenize", text=text) for _ in range(sent)]
        greedy.writer.write(b"".join(encode_frame(f) for f in frames))  # not drained: it never waits
        # Its replies fill the socket, its requests stay in flight, and the daemon stops reading it.
        deadline = asyncio.get_running_loop().time() + HANG_GUARD_S
        while "reading paused" not in caplog.text:
            assert asyncio.get_running_loop().time() < deadline, "reading was never paused"
            await asyncio.sleep(0.01)
        assert setting in caplog.text
        # Another client is served while the greedy one's requests wait (it never reads a reply).
        other = await RawClient.connect(d.socket_path)
        assert (await other.result("tokenize", text="hello"))["tokens"]
        handled = (await other.result("stats"))["requests"]
        # The daemon took only what it could answer; the rest waits in the greedy client's socket.
        assert handled < sent // 2
        await other.close()
        greedy.writer.transport.abort()
        while d.core.counters.connections:
            await asyncio.sleep(0.01)


async def test_a_closed_connection_takes_its_queued_work_with_it(config, endless):
    async with running_daemon(config(max_concurrent_generations=1, max_queue_wait_s=600), loaded=endless) as d:
        client = await RawClient.connect(d.socket_path)
        a, b = await new_session(client), await new_session(client)
        running = client.request("generate", session_id=a, max_tokens=LONG)
        queued = client.request("generate", session_id=b, max_tokens=LONG)
        await client.send(running, queued)
        await client.next_frame(running["id"])
        assert (await client.result("stats"))["generations"] == {"active": 1, "total": 0, "queued": 1}
        await client.close()
        watcher = await RawClient.connect(d.socket_path)
        while True:  # both the running and the queued generate ended with their connection
            stats = await watcher.result("stats")
            if stats["generations"]["active"] == stats["generations"]["queued"] == 0:
                break
            await asyncio.sleep(0.01)
        assert d.core.registry.leases_held() == 0
        for sid in (a, b):
            assert not (await watcher.result("session_info", session_id=sid))["generating"]
        await watcher.close()


# ---- stalled peers and too many of them --------------------------------------------------


async def test_a_frame_left_half_sent_is_closed_after_frame_timeout_s(config, loaded_qwen3, caplog):
    caplog.set_level(logging.INFO, logger="kakeya")
    async with running_daemon(config(frame_timeout_s=0.2), loaded=loaded_qwen3) as d:
        client = await RawClient.connect(d.socket_path)
        await client.send_bytes(struct.pack(">I", 1000) + b"\x83" + b"x" * 9)
        reply = await client.next_frame()
        assert reply["id"] is None and reply["error"]["code"] == "protocol_error"
        assert "frame_timeout_s=0.2" in reply["error"]["message"]
        assert await client.at_eof()
        await client.close()
        assert "frame_timeout_s=0.2" in caplog.text
        # A client that takes its time between whole frames is not cut off.
        patient = await RawClient.connect(d.socket_path)
        await asyncio.sleep(0.3)
        await stays_open(patient)
        await patient.close()


async def test_connections_beyond_max_connections_are_refused(config, loaded_qwen3):
    async with running_daemon(config(max_connections=2), loaded=loaded_qwen3) as d:
        first, second = await RawClient.connect(d.socket_path), await RawClient.connect(d.socket_path)
        third = await RawClient.connect(d.socket_path, hello=False)
        await third.send(third.request("hello", protocol=1))  # answered with the refusal, not a reset
        refused = await third.next_frame()
        assert refused["id"] is None and "max_connections=2" in refused["error"]["message"]
        assert await third.at_eof()
        await first.close()
        while d.core.counters.connections > 1:
            await asyncio.sleep(0.01)
        fourth = await RawClient.connect(d.socket_path)
        assert (await fourth.result("stats"))["rejections"] == {"max_connections": 1}
        for client in (second, third, fourth):
            await client.close()


# ---- hostile values: one error reply each, the connection stays open ----------------------


@pytest.mark.parametrize(
    "body, code, reply_id",
    [
        (raw_map(("id", nested(1000)), ("method", msgpack.packb("stats"))), "protocol_error", None),
        (raw_map(("id", b"\x07"), ("method", msgpack.packb("append")),
                 ("params", raw_map(("session_id", msgpack.packb("s")), ("tokens", b"\x92\x01" + nested(1000))))),
         "invalid_argument", 7),
        (raw_map(("id", b"\x07"), ("method", msgpack.packb("generate")),
                 ("params", raw_map(("session_id", msgpack.packb("s")), ("stop", b"\x91" + nested(1000))))),
         "invalid_argument", 7),
        (raw_map(("id", b"\x07"), ("method", msgpack.packb("append")),
                 ("params", raw_map(("session_id", msgpack.packb("s")),
                                    ("messages", b"\x91" + raw_map(("role", nested(1000)), ("content", b"\xa0")))))),
         "invalid_argument", 7),
    ],
    ids=["id", "tokens", "stop", "messages"],
)
async def test_values_nested_a_thousand_deep_get_one_error_reply(daemon, body, code, reply_id):
    client = await RawClient.connect(daemon.socket_path)
    await client.send_bytes(frame_of(body))
    reply = await client.next_frame()
    assert (reply["id"], reply["error"]["code"]) == (reply_id, code)
    assert len(reply["error"]["message"]) < 400
    await stays_open(client)
    await client.close()


async def test_a_huge_session_id_is_not_echoed(daemon, caplog):
    caplog.set_level(logging.INFO, logger="kakeya")
    client = await RawClient.connect(daemon.socket_path)
    huge = "s" * (8 << 20)
    reply = await client.call("session_info", session_id=huge)
    assert reply["error"]["code"] == "not_found" and len(reply["error"]["message"]) < 400
    assert "8388608 characters" in reply["error"]["message"]
    assert max(len(r.getMessage()) for r in caplog.records) < 1000
    await client.close()


# ---- numbers: refused naming the field and range, or computed correctly ---------------------


@pytest.mark.parametrize(
    "name, value, named",
    [("temperature", 2**63, "[0, 2]"), ("repetition_penalty", 2**63, "[0.01, 100]"), ("temperature", 1e300, "[0, 2]"),
     ("top_k", 2**64 - 1, "top_k"), ("repetition_penalty", 1e-300, "[0.01, 100]")],
)
async def test_absurd_numbers_are_refused_naming_the_field_and_range(daemon, name, value, named):
    client = await RawClient.connect(daemon.socket_path)
    sid = await new_session(client)
    reply = await client.call("generate", session_id=sid, max_tokens=2, **{name: value})
    assert reply["error"]["code"] == "invalid_argument"
    assert name in reply["error"]["message"] and named in reply["error"]["message"]
    await client.close()


@pytest.mark.parametrize("temperature", [1e-38, 1e-300, 5e-324, 9e-6])
async def test_a_tiny_temperature_decodes_greedily(daemon, temperature):
    client = await RawClient.connect(daemon.socket_path)
    greedy = tokens_of(await client.generate(session_id=await new_session(client), max_tokens=12, temperature=0))
    tiny = await client.generate(session_id=await new_session(client), max_tokens=12, temperature=temperature, seed=3)
    assert tokens_of(tiny) == greedy
    assert done_of(tiny)["stop_reason"] in ("max_tokens", "eos")
    await client.close()


# ---- the wire's corners, as the SPEC writes them down ----------------------------------------


async def test_before_hello_every_other_request_is_a_protocol_error_with_its_id(daemon):
    client = await RawClient.connect(daemon.socket_path, hello=False)
    for message in ({"id": 3, "method": "stats"}, {"id": 4, "method": "generate", "params": {"bogus": 1}},
                    {"id": 5, "method": "no_such_method"}):
        await client.send(message)
        reply = await client.next_frame(message["id"])
        assert reply["error"]["code"] == "protocol_error" and "'hello'" in reply["error"]["message"]
    first = await client.result("hello", protocol=1, client="a")
    # A second hello is answered like the first and changes nothing; a bad one leaves the connection as it was.
    assert await client.result("hello", protocol=1, client="b") == first
    assert (await client.call("hello", protocol=7))["error"]["code"] == "invalid_argument"
    await stays_open(client)
    await client.close()


@pytest.mark.parametrize(
    "body, named",
    [
        (raw_map(("id", b"\x02"), ("method", msgpack.packb("stats")), ("params", b"\x81\xc4\x01k\x01")), "bin"),
        (b"\x83\xa2id\x02\xa6method\xa8tokenize\xa6params\x82\xa4text\xa1a\xa4text\xa1b", "appears twice"),
    ],
    ids=["nested bin key", "duplicate key"],
)
async def test_map_key_faults_at_any_depth_are_framing_errors(daemon, body, named):
    client = await RawClient.connect(daemon.socket_path)
    await client.send_bytes(frame_of(body))
    reply = await client.next_frame()
    assert reply["id"] is None and reply["error"]["code"] == "protocol_error" and named in reply["error"]["message"]
    assert await client.at_eof()
    await client.close()


async def test_an_ext_value_is_a_wrong_type(daemon):
    client = await RawClient.connect(daemon.socket_path)
    sid = await new_session(client)
    body = raw_map(("id", b"\x09"), ("method", msgpack.packb("generate")),
                   ("params", raw_map(("session_id", msgpack.packb(sid)), ("temperature", b"\xd4\x05\x00"))))
    await client.send_bytes(frame_of(body))
    reply = await client.next_frame(9)
    assert reply["error"]["code"] == "invalid_argument" and "ext" in reply["error"]["message"]
    await stays_open(client)
    await client.close()


async def test_append_returns_the_token_ids_it_appended(daemon):
    client = await RawClient.connect(daemon.socket_path)
    sid = (await client.result("create_session"))["session_id"]
    info = await client.result("session_info", session_id=sid)
    assert info["cache_length"] == 0 and info["positions"]["first"] == 0 and info["positions"]["last"] == -1
    first = await client.result("append", session_id=sid, text=PROMPT)
    assert first["tokens"] == (await client.result("tokenize", text=PROMPT))["tokens"]
    ids = await client.result("append", session_id=sid, tokens=[5, 6, 7])
    assert ids == {"appended": 3, "history_length": len(first["tokens"]) + 3, "tokens": [5, 6, 7]}
    chat = await client.result("append", session_id=sid, messages=[{"role": "user", "content": "Hi"}])
    assert len(chat["tokens"]) == chat["appended"] and chat["history_length"] == ids["history_length"] + chat["appended"]
    # The cached-token count of a session is `cache_length`; `cached_tokens` belongs to a done event.
    frames = await client.generate(session_id=sid, max_tokens=3)
    info = await client.result("session_info", session_id=sid)
    assert "cached_tokens" not in info and "cached_tokens" in done_of(frames)
    assert info["cache_length"] == info["positions"]["last"] + 1
    await client.close()
