"""The daemon over a real Unix socket: a real tiny model, real msgpack frames, raw sockets."""

import asyncio
import dataclasses
import os
import re
import shutil
import socket
import stat
import tempfile
from pathlib import Path

import pytest

from kakeya_client import AsyncClient, ResourceExhausted
from kakeya_daemon.config import DaemonConfig
from kakeya_daemon.lifecycle import StartError
from kakeya_daemon.dispatch import event_frames
from kakeya_daemon.server import Daemon, running_daemon
from kakeya_mlx import platform
from kakeya_mlx.events import DoneEvent, TokenEvent, TruncatedEvent
from kakeya_protocol import FrameDecoder, encode_frame, parse_server_message

PROMPT = "The quick brown fox jumps over the lazy dog."
PROMPTS = [PROMPT, "Once upon a time", "1 2 3 4 5 6 7", "Hello, world! How are you today?"]
# Long enough that a generation is still running whenever a test acts on it; tests cancel it.
LONG = 20000
# Guards a read against a daemon that never answers; not a performance threshold.
HANG_GUARD_S = 120.0


@pytest.fixture(scope="module")
def endless(loaded_qwen3):
    """The test model with no end-of-sequence token: generations run to max_tokens."""
    return dataclasses.replace(loaded_qwen3, eos_token_ids=[])


@pytest.fixture
def sock_dir():
    # Short, private (mkdtemp makes it 0700): Unix socket paths are limited to ~104 bytes.
    path = Path(tempfile.mkdtemp(prefix="kk-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def make_config(model_dir, sock_dir, **overrides) -> DaemonConfig:
    settings = dict(
        model=str(model_dir),
        socket=str(sock_dir / "kakeya.sock"),
        sink=4,
        window=24,
        block=8,
        max_append_tokens=256,
        max_new_tokens=20000,
        idle_ttl_s=0.0,
        memory_budget_bytes=-1,
        store_dir=str(Path(sock_dir) / "store"),
    )
    settings.update(overrides)
    return DaemonConfig(**settings)


@pytest.fixture
def config(qwen3_dir, sock_dir):
    return lambda **overrides: make_config(qwen3_dir, sock_dir, **overrides)


@pytest.fixture
async def daemon(config, loaded_qwen3):
    async with running_daemon(config(), loaded=loaded_qwen3) as d:
        yield d


class RawClient:
    """A protocol client made of a socket, the codec and nothing else."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer
        self.decoder = FrameDecoder()
        self.frames: list[dict] = []  # received, not yet consumed
        self.read_lock = asyncio.Lock()
        self.next_id = 1

    @classmethod
    async def connect(cls, path, hello: bool = True) -> "RawClient":
        reader, writer = await asyncio.open_unix_connection(os.fspath(path))
        client = cls(reader, writer)
        if hello:
            reply = await client.call("hello", protocol=1, client="test")
            assert "result" in reply, reply
        return client

    def request(self, method: str, **params) -> dict:
        msg = {"id": self.next_id, "method": method, "params": params}
        self.next_id += 1
        return msg

    async def send(self, *messages: dict) -> None:
        self.writer.write(b"".join(encode_frame(m) for m in messages))
        await self.writer.drain()

    async def send_bytes(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def _read_more(self) -> bool:
        data = await asyncio.wait_for(self.reader.read(1 << 16), HANG_GUARD_S)
        if not data:
            return False
        frames = self.decoder.feed(data)
        for frame in frames:
            parse_server_message(frame)  # every frame the daemon sends has a valid shape
        self.frames.extend(frames)
        return True

    async def next_frame(self, request_id=...) -> dict:
        """The next frame (for request_id, if given); several readers may wait at once."""
        while True:
            async with self.read_lock:
                for i, frame in enumerate(self.frames):
                    if request_id is ... or frame.get("id") == request_id:
                        return self.frames.pop(i)
                if not await self._read_more():
                    raise ConnectionError("the daemon closed the connection")

    async def call(self, method: str, **params) -> dict:
        """Send one request; return its reply frame (result or error)."""
        msg = self.request(method, **params)
        await self.send(msg)
        return await self.next_frame(msg["id"])

    async def result(self, method: str, **params) -> dict:
        reply = await self.call(method, **params)
        assert "result" in reply, reply
        return reply["result"]

    async def events(self, request_id: int) -> list[dict]:
        """Every frame for a generate, through its done event (or its error reply)."""
        frames = []
        while True:
            frame = await self.next_frame(request_id)
            frames.append(frame)
            if "error" in frame or frame.get("event") == "done":
                return frames

    async def generate(self, **params) -> list[dict]:
        msg = self.request("generate", **params)
        await self.send(msg)
        return await self.events(msg["id"])

    async def at_eof(self) -> bool:
        """Whether the daemon closed this connection (after any frames it sent)."""
        while await self._read_more():
            pass
        return True

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass


def tokens_of(frames: list[dict]) -> list[int]:
    return [t for f in frames if f.get("event") == "tokens" for t in f["data"]["tokens"]]


def done_of(frames: list[dict]) -> dict:
    assert frames[-1].get("event") == "done", frames[-1]
    return frames[-1]["data"]


async def new_session(client: RawClient, text: str = PROMPT) -> str:
    sid = (await client.result("create_session"))["session_id"]
    await client.result("append", session_id=sid, text=text)
    return sid


# ---- handshake and the session flow -----------------------------------------


async def test_hello_must_come_first_and_announces_model_and_limits(daemon, loaded_qwen3):
    client = await RawClient.connect(daemon.socket_path, hello=False)
    early = await client.call("create_session")
    assert early["error"]["code"] == "protocol_error" and "hello" in early["error"]["message"]

    wrong = await client.call("hello", protocol=99)
    assert wrong["error"]["code"] == "invalid_argument" and "1" in wrong["error"]["message"]

    hello = await client.result("hello", protocol=1, client="test")
    assert hello["protocol"] == 1 and hello["server"].startswith("kakeya-mlx/")
    assert hello["model"]["vocab_size"] == loaded_qwen3.vocab_size
    assert (hello["model"]["sink"], hello["model"]["window"], hello["model"]["block"]) == (4, 24, 8)
    assert hello["limits"] == {
        "max_frame_bytes": daemon.config.max_frame_bytes,
        "max_sessions": daemon.config.max_sessions,
        "max_concurrent_generations": daemon.config.max_concurrent_generations,
        "max_append_tokens": 256,
        "max_new_tokens": 20000,
        "idle_ttl_s": 0.0,
        "max_requests_per_connection": daemon.config.max_requests_per_connection,
        "frame_timeout_s": daemon.config.frame_timeout_s,
        "eviction": "spill",
        "store_max_bytes": daemon.config.store_max_bytes,
        "stop_save_s": daemon.config.stop_save_s,
    }
    # The same connection, still open, now serves requests.
    assert "session_id" in await client.result("create_session")
    await client.close()


async def test_full_session_flow(daemon, loaded_qwen3):
    client = await RawClient.connect(daemon.socket_path)
    sid = (await client.result("create_session"))["session_id"]
    appended = await client.result("append", session_id=sid, text=PROMPT)
    prompt_ids = await client.result("tokenize", text=PROMPT)
    n = len(prompt_ids["tokens"])
    assert appended == {"appended": n, "history_length": n, "tokens": prompt_ids["tokens"]}

    frames = await client.generate(session_id=sid, max_tokens=8)
    done = done_of(frames)
    generated = tokens_of(frames)
    assert done["stop_reason"] in ("max_tokens", "eos")
    assert done["generated_tokens"] == len(generated) >= 1
    assert done["prompt_tokens"] == appended["history_length"] and done["cached_tokens"] == 0
    assert set(done["timings"]) == {"ttft_s", "prefill_tokens_per_s", "decode_tokens_per_s", "total_s"}
    text = "".join(f["data"]["text"] for f in frames if f.get("event") == "tokens")
    visible = [t for t in generated if t not in loaded_qwen3.eos_token_ids]
    assert text == (await client.result("detokenize", tokens=visible))["text"]

    info = await client.result("session_info", session_id=sid)
    assert info["session_id"] == sid and info["history_length"] == appended["history_length"] + len(generated)
    assert not info["generating"]
    listed = (await client.result("list_sessions"))["sessions"]
    assert [s["session_id"] for s in listed] == [sid]

    # A second turn costs only its new tokens.
    await client.result("append", session_id=sid, tokens=[int(t) for t in prompt_ids["tokens"][:3]])
    again = done_of(await client.generate(session_id=sid, max_tokens=2))
    assert again["cached_tokens"] == info["history_length"] and again["prompt_tokens"] == 3

    stats = await client.result("stats")
    assert stats["sessions"]["active"] == 1 and stats["sessions"]["max"] == daemon.config.max_sessions
    assert stats["generations"] == {"active": 0, "total": 2, "queued": 0}
    assert stats["tokens"]["out"] == len(generated) + again["generated_tokens"]
    assert stats["tokens"]["in"] == appended["history_length"] + 3
    assert stats["connections"] == 1 and stats["requests"] >= 10
    assert stats["memory"]["active_bytes"] > 0 and stats["memory"]["budget_bytes"] == 0
    assert stats["rejections"] == {}

    assert await client.result("close_session", session_id=sid) == {"closed": True}
    gone = await client.call("session_info", session_id=sid)
    assert gone["error"]["code"] == "not_found"
    assert (await client.result("list_sessions"))["sessions"] == []
    await client.close()


async def test_messages_append_uses_the_chat_template(daemon):
    client = await RawClient.connect(daemon.socket_path)
    sid = (await client.result("create_session"))["session_id"]
    reply = await client.call("append", session_id=sid, messages=[{"role": "user", "content": "Hi"}])
    if daemon.engine.model_info()["has_chat_template"]:
        assert reply["result"]["appended"] > 1
        assert done_of(await client.generate(session_id=sid, max_tokens=3))["generated_tokens"] >= 1
    else:
        assert reply["error"]["code"] == "invalid_argument"
    await client.close()


async def test_a_session_outlives_its_connection(daemon):
    first = await RawClient.connect(daemon.socket_path)
    sid = await new_session(first)
    await first.close()
    second = await RawClient.connect(daemon.socket_path)
    assert done_of(await second.generate(session_id=sid, max_tokens=3))["generated_tokens"] >= 1
    await second.close()


async def test_concurrent_clients_get_exactly_their_solo_tokens(config, loaded_qwen3):
    # Batched rows are bit-exact on the CPU backend; elsewhere exactness is decode_batch_size=1 (docs/daemon.md).
    exact = {} if platform.backend() == "cpu" else {"decode_batch_size": 1}
    async with running_daemon(config(max_concurrent_generations=len(PROMPTS), **exact), loaded=loaded_qwen3) as d:
        solo = []
        client = await RawClient.connect(d.socket_path)
        for prompt in PROMPTS:
            sid = await new_session(client, prompt)
            solo.append(tokens_of(await client.generate(session_id=sid, max_tokens=12, temperature=0)))
        await client.close()

        async def one(prompt):
            c = await RawClient.connect(d.socket_path)
            sid = await new_session(c, prompt)
            frames = await c.generate(session_id=sid, max_tokens=12, temperature=0)
            await c.close()
            return tokens_of(frames)

        together = await asyncio.gather(*(one(p) for p in PROMPTS))
        assert together == solo


def test_tokens_that_pile_up_are_sent_as_one_frame_in_order():
    # What a client reading slowly receives: each run of ready tokens merged, other events kept in place.
    batch = [
        TokenEvent(5, "a"),
        TokenEvent(6, "b"),
        TruncatedEvent(evicted=8, total_evicted=16),
        TokenEvent(7, "c"),
        DoneEvent(stop_reason="max_tokens", generated_tokens=3),
    ]
    frames = event_frames(9, batch)
    assert [(f["event"], f["data"].get("tokens"), f["data"].get("text")) for f in frames] == [
        ("tokens", [5, 6], "ab"),
        ("truncated", None, None),
        ("tokens", [7], "c"),
        ("done", None, None),
    ]
    for frame in frames:
        parse_server_message(frame)


async def test_requests_on_one_connection_are_multiplexed(config, endless):
    async with running_daemon(config(), loaded=endless) as d:
        client = await RawClient.connect(d.socket_path)
        a, b = await new_session(client), await new_session(client, "Once upon a time")
        gen_a = client.request("generate", session_id=a, max_tokens=40)
        gen_b = client.request("generate", session_id=b, max_tokens=40)
        stats = client.request("stats")
        await client.send(gen_a, gen_b, stats)
        # The stats reply does not wait behind the streams.
        reply = await client.next_frame(stats["id"])
        assert reply["result"]["generations"]["active"] == 2
        frames_a, frames_b = await asyncio.gather(client.events(gen_a["id"]), client.events(gen_b["id"]))
        assert done_of(frames_a)["generated_tokens"] == done_of(frames_b)["generated_tokens"] == 40
        await client.close()


async def test_the_python_client_gets_what_the_raw_protocol_gets(config, loaded_qwen3):
    async with running_daemon(config(max_sessions=2, eviction="destroy"), loaded=loaded_qwen3) as d:
        raw = await RawClient.connect(d.socket_path)
        sid = await new_session(raw)
        frames = await raw.generate(session_id=sid, max_tokens=8, temperature=0)
        async with AsyncClient(d.socket_path) as client:
            session = await client.create_session()
            await session.append(text=PROMPT)
            text, done = await session.complete(max_tokens=8, temperature=0)
            assert text == "".join(f["data"]["text"] for f in frames if f.get("event") == "tokens")
            assert done.generated_tokens == done_of(frames)["generated_tokens"]
            with pytest.raises(ResourceExhausted, match="max_sessions=2"):
                await client.create_session()
        await raw.close()


# ---- busy, cancel, disconnect -------------------------------------------------


async def test_second_generate_on_a_generating_session_is_busy(config, endless):
    async with running_daemon(config(), loaded=endless) as d:
        client = await RawClient.connect(d.socket_path)
        sid = await new_session(client)
        first = client.request("generate", session_id=sid, max_tokens=LONG)
        second = client.request("generate", session_id=sid, max_tokens=5)
        await client.send(first, second)
        busy = await client.next_frame(second["id"])
        assert busy["error"]["code"] == "busy" and sid in busy["error"]["message"]
        assert (await client.result("cancel", request_id=first["id"])) == {"cancelled": True}
        done = done_of(await client.events(first["id"]))
        assert done["stop_reason"] == "cancelled" and done["generated_tokens"] < LONG
        assert (await client.result("stats"))["rejections"] == {"busy": 1}
        await client.close()


async def test_cancel_by_session_id_from_another_connection(config, endless):
    async with running_daemon(config(), loaded=endless) as d:
        owner = await RawClient.connect(d.socket_path)
        sid = await new_session(owner)
        gen = owner.request("generate", session_id=sid, max_tokens=LONG)
        await owner.send(gen)
        first = await owner.next_frame(gen["id"])
        assert first["event"] in ("tokens", "truncated")
        other = await RawClient.connect(d.socket_path)
        assert await other.result("cancel", session_id=sid) == {"cancelled": True}
        assert done_of(await owner.events(gen["id"]))["stop_reason"] == "cancelled"
        assert await other.result("cancel", session_id=sid) == {"cancelled": False}
        assert (await other.call("cancel", session_id="nope"))["error"]["code"] == "not_found"
        await owner.close()
        await other.close()


async def test_disconnect_mid_stream_frees_the_session_at_once(config, endless):
    async with running_daemon(config(), loaded=endless) as d:
        client = await RawClient.connect(d.socket_path)
        sid = await new_session(client)
        gen = client.request("generate", session_id=sid, max_tokens=LONG)
        await client.send(gen)
        assert (await client.next_frame(gen["id"]))["event"] in ("tokens", "truncated")
        await client.close()

        again = await RawClient.connect(d.socket_path)
        frames = await again.generate(session_id=sid, max_tokens=4)
        assert done_of(frames)["stop_reason"] == "max_tokens"
        info = await again.result("session_info", session_id=sid)
        assert not info["generating"]
        await again.close()


# ---- admission ------------------------------------------------------------------


async def test_max_sessions_rejects_with_the_limit_named(config, loaded_qwen3):
    # Where sessions are destroyed, not spilled, a client's session is never closed to make room.
    async with running_daemon(config(max_sessions=2, eviction="destroy"), loaded=loaded_qwen3) as d:
        client = await RawClient.connect(d.socket_path)
        first = (await client.result("create_session"))["session_id"]
        await client.result("create_session")
        third = await client.call("create_session")
        assert third["error"]["code"] == "resource_exhausted"
        assert "max_sessions=2" in third["error"]["message"]
        await client.result("close_session", session_id=first)
        await client.result("create_session")
        assert (await client.result("stats"))["rejections"] == {"max_sessions": 1}
        await client.close()


async def test_generation_slots_reject_when_the_policy_is_reject(config, endless):
    async with running_daemon(config(max_concurrent_generations=1, queue_policy="reject"), loaded=endless) as d:
        client = await RawClient.connect(d.socket_path)
        a, b = await new_session(client), await new_session(client)
        long = client.request("generate", session_id=a, max_tokens=LONG)
        short = client.request("generate", session_id=b, max_tokens=3)
        await client.send(long, short)
        rejected = await client.next_frame(short["id"])
        assert rejected["error"]["code"] == "resource_exhausted"
        assert "max_concurrent_generations=1" in rejected["error"]["message"]
        await client.result("cancel", request_id=long["id"])
        assert done_of(await client.events(long["id"]))["stop_reason"] == "cancelled"
        assert (await client.result("stats"))["rejections"] == {"max_concurrent_generations": 1}
        await client.close()


async def test_queued_generate_runs_when_a_slot_frees(config, endless):
    async with running_daemon(config(max_concurrent_generations=1, max_queue_wait_s=600), loaded=endless) as d:
        client = await RawClient.connect(d.socket_path)
        a, b = await new_session(client), await new_session(client)
        first = client.request("generate", session_id=a, max_tokens=30)
        second = client.request("generate", session_id=b, max_tokens=5)
        stats = client.request("stats")
        await client.send(first, second, stats)
        assert (await client.next_frame(stats["id"]))["result"]["generations"]["queued"] == 1
        frames = []
        while sum(f.get("event") == "done" for f in frames) < 2:
            frames.append(await client.next_frame())
        done_ids = [f["id"] for f in frames if f.get("event") == "done"]
        assert done_ids == [first["id"], second["id"]]
        # The queued one starts only after the first one has ended.
        first_done = next(i for i, f in enumerate(frames) if f.get("event") == "done")
        second_frames = [f for f in frames if f["id"] == second["id"]]
        assert all(frames.index(f) > first_done for f in second_frames)
        assert done_of(second_frames)["generated_tokens"] == 5
        await client.close()


async def test_queued_generate_gives_up_after_max_queue_wait(config, endless):
    async with running_daemon(config(max_concurrent_generations=1, max_queue_wait_s=0.2), loaded=endless) as d:
        client = await RawClient.connect(d.socket_path)
        a, b = await new_session(client), await new_session(client)
        long = client.request("generate", session_id=a, max_tokens=LONG)
        await client.send(long)
        await client.next_frame(long["id"])  # running
        waited = await client.call("generate", session_id=b, max_tokens=3)
        assert waited["error"]["code"] == "resource_exhausted"
        assert "max_queue_wait_s=0.2" in waited["error"]["message"]
        await client.result("cancel", request_id=long["id"])
        await client.events(long["id"])
        assert (await client.result("stats"))["rejections"] == {"max_queue_wait_s": 1}
        await client.close()


async def test_cancelling_a_queued_generate_ends_it_with_done_cancelled(config, endless):
    async with running_daemon(config(max_concurrent_generations=1, max_queue_wait_s=600), loaded=endless) as d:
        client = await RawClient.connect(d.socket_path)
        a, b = await new_session(client), await new_session(client)
        long = client.request("generate", session_id=a, max_tokens=LONG)
        queued = client.request("generate", session_id=b, max_tokens=3)
        await client.send(long, queued)
        await client.next_frame(long["id"])
        assert await client.result("cancel", request_id=queued["id"]) == {"cancelled": True}
        done = done_of(await client.events(queued["id"]))
        assert done["stop_reason"] == "cancelled" and done["generated_tokens"] == 0
        await client.result("cancel", request_id=long["id"])
        await client.events(long["id"])
        await client.close()


async def test_idle_sessions_are_closed_after_the_ttl(config, loaded_qwen3):
    cfg = config(idle_ttl_s=1.0, idle_sweep_interval_s=0.05, eviction="destroy")
    async with running_daemon(cfg, loaded=loaded_qwen3) as d:
        client = await RawClient.connect(d.socket_path)
        sid = await new_session(client)
        while True:
            reply = await client.call("session_info", session_id=sid)
            if "error" in reply:
                break
            await asyncio.sleep(0.05)
        assert reply["error"]["code"] == "not_found" and "idle_ttl_s=1 " in reply["error"]["message"]
        stats = await client.result("stats")
        assert stats["sessions"]["evicted_idle"] == 1 and stats["sessions"]["active"] == 0
        await client.close()


async def fill(client: RawClient, model: dict) -> str:
    """A new session whose cache holds its bound: more history than sink + window + block, all run."""
    sid = (await client.result("create_session"))["session_id"]
    bound = model["sink"] + model["window"] + model["block"]
    await client.result("append", session_id=sid, tokens=[(7 * i) % model["vocab_size"] for i in range(bound + 4)])
    assert done_of(await client.generate(session_id=sid, max_tokens=2))["stop_reason"] != "error"
    return sid


async def test_a_memory_budget_sized_for_n_sessions_keeps_n(config, loaded_qwen3):
    # Measure what the budget counts: the weights, the working margin and one full cache. The
    # margin is measured again at each start; half a session of slack covers its run-to-run spread.
    settings = dict(window=120, max_append_tokens=256)
    async with running_daemon(config(memory_budget_bytes=1 << 30, **settings), loaded=loaded_qwen3) as d:
        client = await RawClient.connect(d.socket_path)
        memory = (await client.result("stats"))["memory"]
        model = d.engine.model_info()
        await client.close()
    full = model["kv_bytes_per_token"] * (model["sink"] + model["window"] + model["block"])
    n = 3
    budget = memory["weights_bytes"] + memory["margin_bytes"] + n * full + full // 2
    cfg = config(memory_budget_bytes=budget, eviction="destroy", **settings)
    async with running_daemon(cfg, loaded=loaded_qwen3) as d:
        client = await RawClient.connect(d.socket_path)
        sessions = [await fill(client, model) for _ in range(n + 2)]
        for sid in sessions[:2]:  # the least recently used went, saying why
            evicted = await client.call("session_info", session_id=sid)
            assert evicted["error"]["code"] == "not_found"
            assert f"memory_budget_bytes={budget}" in evicted["error"]["message"]
        for sid in sessions[2:]:
            assert (await client.result("session_info", session_id=sid))["kv_bytes"] == full
        stats = await client.result("stats")
        assert stats["sessions"]["active"] == n and stats["sessions"]["evicted_lru"] == 2
        assert stats["memory"]["held_bytes"] <= budget and stats["rejections"] == {}
        await client.close()


async def test_over_the_memory_budget_new_work_is_rejected(config, loaded_qwen3):
    async with running_daemon(config(memory_budget_bytes=1024), loaded=loaded_qwen3) as d:
        client = await RawClient.connect(d.socket_path)
        reply = await client.call("create_session")
        assert reply["error"]["code"] == "resource_exhausted"
        assert "memory_budget_bytes=1024" in reply["error"]["message"]
        stats = await client.result("stats")
        assert stats["rejections"] == {"memory_budget_bytes": 1}
        assert stats["memory"]["budget_bytes"] == 1024
        await client.close()


# ---- lifecycle -------------------------------------------------------------------


async def test_socket_is_0600_in_a_0700_directory_it_creates(qwen3_dir, sock_dir, loaded_qwen3):
    cfg = make_config(qwen3_dir, sock_dir / "run" / "kakeya", socket=str(sock_dir / "run" / "kakeya" / "k.sock"))
    async with running_daemon(cfg, loaded=loaded_qwen3) as d:
        assert stat.S_IMODE(os.stat(d.socket_path).st_mode) == 0o600
        assert stat.S_ISSOCK(os.stat(d.socket_path).st_mode)
        assert stat.S_IMODE(os.stat(d.socket_path.parent).st_mode) == 0o700
    assert not d.socket_path.exists()
    assert not Path(str(d.socket_path) + ".lock").exists()


async def test_a_group_or_world_writable_socket_directory_is_refused(qwen3_dir, sock_dir, loaded_qwen3):
    shared = sock_dir / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    cfg = make_config(qwen3_dir, shared)
    with pytest.raises(StartError, match="world-writable"):
        await Daemon(cfg, loaded=loaded_qwen3).start()
    assert list(shared.iterdir()) == []


async def test_a_second_daemon_on_the_same_socket_is_refused(daemon, config, loaded_qwen3):
    refusal = f"another kakeya daemon is already serving {daemon.socket_path} (pid {os.getpid()})"
    with pytest.raises(StartError, match=re.escape(refusal)):
        await Daemon(config(), loaded=loaded_qwen3).start()
    # The first one still serves.
    client = await RawClient.connect(daemon.socket_path)
    await client.result("stats")
    await client.close()


async def test_a_stale_socket_is_taken_over(config, loaded_qwen3, sock_dir):
    path = sock_dir / "kakeya.sock"
    crashed = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    crashed.bind(os.fspath(path))  # bound, never listening, then gone: what a crash leaves
    crashed.close()
    assert path.exists()
    async with running_daemon(config(), loaded=loaded_qwen3) as d:
        client = await RawClient.connect(d.socket_path)
        await client.result("stats")
        await client.close()


async def test_shutdown_request_ends_streams_as_cancelled_and_removes_the_socket(config, endless):
    async with running_daemon(config(), loaded=endless) as d:
        streamer = await RawClient.connect(d.socket_path)
        sid = await new_session(streamer)
        gen = streamer.request("generate", session_id=sid, max_tokens=LONG)
        await streamer.send(gen)
        await streamer.next_frame(gen["id"])
        admin = await RawClient.connect(d.socket_path)
        assert await admin.result("shutdown") == {"ok": True}
        assert done_of(await streamer.events(gen["id"]))["stop_reason"] == "cancelled"
        await d.wait_stopped()
        assert not d.socket_path.exists()
        assert await streamer.at_eof()
        await streamer.close()
        await admin.close()

