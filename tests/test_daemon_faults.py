"""Bad input never takes the daemon down; signals, exit codes and start failures of the real process."""

import asyncio
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import msgpack
import pytest

from kakeya_daemon.config import DaemonConfig, load_config
from kakeya_daemon.server import main, running_daemon
from kakeya_client import service
from kakeya_mlx import locate
from test_daemon_http import free_port
from test_daemon import (  # noqa: F401  (fixtures)
    HANG_GUARD_S,
    LONG,
    PROMPT,
    RawClient,
    config,
    done_of,
    endless,
    new_session,
    sock_dir,
)

REPO = Path(__file__).resolve().parents[1]


def frame_of(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


@pytest.fixture
async def busy_daemon(config, endless):
    """A daemon with another client mid-stream, to show that faults elsewhere leave it alone."""
    async with running_daemon(config(), loaded=endless) as d:
        bystander = await RawClient.connect(d.socket_path)
        sid = await new_session(bystander)
        gen = bystander.request("generate", session_id=sid, max_tokens=LONG)
        await bystander.send(gen)
        await bystander.next_frame(gen["id"])
        yield d
        # Its stream was still running all along, and its session still works.
        assert await bystander.result("cancel", request_id=gen["id"]) == {"cancelled": True}
        assert done_of(await bystander.events(gen["id"]))["stop_reason"] == "cancelled"
        assert done_of(await bystander.generate(session_id=sid, max_tokens=3))["generated_tokens"] == 3
        await bystander.close()


# ---- framing faults close only their own connection ----------------------------


@pytest.mark.parametrize(
    "raw, why",
    [
        (frame_of(b"\xc1\xc1\xc1 not msgpack"), "garbage"),
        (frame_of(msgpack.packb([1, "hello", {}])), "not a map"),
        (struct.pack(">I", 0), "empty frame"),
        (struct.pack(">I", 2**31), "over max_frame_bytes"),
    ],
)
async def test_broken_framing_gets_protocol_error_then_close(busy_daemon, raw, why):
    client = await RawClient.connect(busy_daemon.socket_path)
    await client.send_bytes(raw)
    reply = await client.next_frame()
    assert reply["id"] is None and reply["error"]["code"] == "protocol_error", why
    assert await client.at_eof()
    await client.close()
    # Another client is served as before.
    other = await RawClient.connect(busy_daemon.socket_path)
    assert (await other.result("stats"))["connections"] == 2
    await other.close()


async def test_truncated_frame_then_disconnect(busy_daemon):
    client = await RawClient.connect(busy_daemon.socket_path)
    await client.send_bytes(struct.pack(">I", 100) + b"\x82" + b"x" * 9)
    await client.close()
    other = await RawClient.connect(busy_daemon.socket_path)
    assert "session_id" in await other.result("create_session")
    await other.close()


async def test_length_prefix_over_the_configured_limit(config, loaded_qwen3):
    async with running_daemon(config(max_frame_bytes=4096), loaded=loaded_qwen3) as d:
        client = await RawClient.connect(d.socket_path)
        assert client.next_id == 2
        request = {"id": 2, "method": "tokenize", "params": {"text": "x" * 5000}}
        await client.send_bytes(frame_of(msgpack.packb(request)))
        reply = await client.next_frame()
        assert reply["error"]["code"] == "protocol_error" and "4096" in reply["error"]["message"]
        assert await client.at_eof()
        await client.close()


# ---- request faults get an error reply; the connection stays ---------------------


async def test_bad_requests_get_error_replies_and_the_connection_stays_open(busy_daemon):
    client = await RawClient.connect(busy_daemon.socket_path)
    sid = await new_session(client)

    async def error_for(message: dict) -> dict:
        await client.send(message)
        reply = await client.next_frame(message.get("id") if isinstance(message.get("id"), int) else None)
        assert "error" in reply, (message, reply)
        return reply["error"]

    assert (await error_for({"hello": "there"}))["code"] == "protocol_error"  # a map, but not a request
    unknown = await error_for({"id": 50, "method": "no_such_method"})
    assert unknown["code"] == "invalid_argument" and "no_such_method" in unknown["message"]

    bad = [
        ({"id": 52, "method": "append", "params": {"session_id": sid, "tokens": "abc"}}, "tokens"),
        ({"id": 53, "method": "append", "params": {"session_id": 7, "tokens": [1]}}, "session_id"),
        ({"id": 54, "method": "generate", "params": {"session_id": sid, "max_tokens": True}}, "max_tokens"),
        ({"id": 55, "method": "generate", "params": {"session_id": sid, "temperature": "hot"}}, "temperature"),
        ({"id": 56, "method": "append", "params": {"session_id": sid, "tokens": [1], "colour": "red"}}, "colour"),
        ({"id": 57, "method": "append", "params": {"session_id": sid, "tokens": [-1]}}, "tokens"),
        ({"id": 58, "method": "append", "params": {"session_id": sid, "tokens": [10**9]}}, "vocabulary"),
        ({"id": 59, "method": "append", "params": {"session_id": sid, "tokens": [1] * 257}}, "max_append_tokens=256"),
        ({"id": 60, "method": "generate", "params": {"session_id": sid, "max_tokens": 20001}}, "max_new_tokens=20000"),
        ({"id": 61, "method": "append", "params": {"session_id": sid, "text": "a", "tokens": [1]}}, "exactly one"),
    ]
    for message, named in bad:
        error = await error_for(message)
        assert error["code"] == "invalid_argument", (message, error)
        assert named in error["message"], (message, error)

    missing = await error_for({"id": 62, "method": "session_info", "params": {"session_id": "nope"}})
    assert missing["code"] == "not_found"

    # The session is untouched by the failed requests, and the connection still works.
    info = await client.result("session_info", session_id=sid)
    assert info["history_length"] == len((await client.result("tokenize", text=PROMPT))["tokens"])
    assert done_of(await client.generate(session_id=sid, max_tokens=2))["generated_tokens"] == 2
    await client.close()


async def test_a_request_id_already_in_flight_is_refused(config, endless):
    async with running_daemon(config(), loaded=endless) as d:
        client = await RawClient.connect(d.socket_path)
        sid = await new_session(client)
        gen = client.request("generate", session_id=sid, max_tokens=LONG)
        await client.send(gen)
        await client.next_frame(gen["id"])
        await client.send({"id": gen["id"], "method": "stats", "params": {}})
        frame = await client.next_frame(gen["id"])
        while "error" not in frame:
            frame = await client.next_frame(gen["id"])
        assert frame["error"]["code"] == "invalid_argument" and "in flight" in frame["error"]["message"]
        await client.result("cancel", request_id=gen["id"])
        assert done_of(await client.events(gen["id"]))["stop_reason"] == "cancelled"
        await client.close()


async def test_an_unexpected_exception_is_an_internal_error_and_the_daemon_keeps_serving(
    config, loaded_qwen3, monkeypatch
):
    def broken_stats(*args, **kwargs):
        raise RuntimeError("stats exploded")

    async with running_daemon(config(), loaded=loaded_qwen3) as d:
        client = await RawClient.connect(d.socket_path)
        monkeypatch.setattr(d.core, "stats", broken_stats)
        reply = await client.call("stats")
        assert reply["error"]["code"] == "internal" and "stats exploded" in reply["error"]["message"]
        monkeypatch.undo()
        assert (await client.result("stats"))["requests"] >= 2
        await client.close()


@pytest.mark.skipif(os.getuid() != 0, reason="connecting as another user needs root")
async def test_peers_of_another_uid_are_refused(config, loaded_qwen3, sock_dir):
    async with running_daemon(config(), loaded=loaded_qwen3) as d:
        # Loosen the directory so the kernel lets the other user reach the socket at all.
        sock_dir.chmod(0o755)
        os.chmod(d.socket_path, 0o666)
        probe = (
            "import os, socket, struct, msgpack\n"
            "os.setgid(65534); os.setuid(65534)\n"
            "s = socket.socket(socket.AF_UNIX); s.connect(%r)\n"
            "hello = msgpack.packb({'id': 1, 'method': 'hello', 'params': {'protocol': 1}})\n"
            "s.sendall(struct.pack('>I', len(hello)) + hello)\n"
            "data = b''\n"
            "while True:\n"
            "    chunk = s.recv(65536)\n"
            "    if not chunk: break\n"
            "    data += chunk\n"
            "print(msgpack.unpackb(data[4:])['error']['message'])\n"
        ) % os.fspath(d.socket_path)
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", probe, stdout=subprocess.PIPE)
        out, _ = await asyncio.wait_for(proc.communicate(), HANG_GUARD_S)
        assert proc.returncode == 0 and b"uid 65534 refused" in out
        assert d.core.counters.rejections["peer_uid"] == 1
        sock_dir.chmod(0o700)


# ---- configuration ----------------------------------------------------------------


def test_precedence_flags_over_env_over_file_over_defaults(tmp_path):
    toml = tmp_path / "config.toml"
    toml.write_text('max_sessions = 3\nmax_new_tokens = 100\nqueue_policy = "reject"\nmemory_budget_bytes = "2GiB"\n')
    env = {"KAKEYA_CONFIG": str(toml), "KAKEYA_MAX_NEW_TOKENS": "200", "KAKEYA_MAX_QUEUE_WAIT_S": "1.5"}
    cfg = load_config(["--max-new-tokens", "300", "--sink", "2"], environ=env)
    assert cfg.max_new_tokens == 300  # flag
    assert cfg.max_queue_wait_s == 1.5  # env
    assert (cfg.max_sessions, cfg.queue_policy, cfg.memory_budget_bytes) == (3, "reject", 2 * 2**30)  # file
    assert cfg.sink == 2 and cfg.block == DaemonConfig().block  # flag, default


@pytest.mark.parametrize(
    "argv, env, toml, named",
    [
        ([], {}, "max_session = 3\n", "max_session"),
        ([], {}, 'max_sessions = "many"\n', "max_sessions"),
        ([], {}, "max_sessions = 0\n", "max_sessions"),
        ([], {}, "this is not toml", "not valid TOML"),
        ([], {"KAKEYA_BLOCK": "eight"}, "", "KAKEYA_BLOCK"),
        (["--queue-policy", "maybe"], {}, "", "queue_policy"),
        (["--memory-budget-bytes", "lots"], {}, "", "memory-budget-bytes"),
        (["--log-level", "chatty"], {}, "", "log_level"),
        (["--eviction", "drop"], {}, "", "eviction"),
        ([], {"KAKEYA_STOP_SAVE_S": "-1"}, "", "stop_save_s"),
        ([], {}, 'store_max_bytes = "lots"\n', "store_max_bytes"),
        ([], {}, "store_max_bytes = 0\n", "store_max_bytes"),
    ],
)
def test_bad_settings_exit_2_naming_the_setting(tmp_path, monkeypatch, capsys, argv, env, toml, named):
    path = tmp_path / "config.toml"
    path.write_text(toml)
    monkeypatch.setenv("KAKEYA_CONFIG", str(path))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert named in err and len(err.strip().splitlines()) == 1


def test_the_default_model_is_the_loaders():
    assert DaemonConfig().model == locate.DEFAULT_MODEL
    # The client spells them out (it does not depend on the engine).
    assert (service.DEFAULT_MODEL, service.DEFAULT_MODEL_NAME) == (locate.DEFAULT_MODEL, locate.DEFAULT_MODEL_NAME)


def test_help_explains_every_option_with_its_default(capsys):
    assert main(["--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    for name in ("--max-sessions", "--queue-policy", "--idle-ttl-s", "--memory-budget-bytes", "--socket", "--config"):
        assert name in out
    assert "(default: 64)" in out and "(default: 'queue')" in out and "KAKEYA_" in out


# ---- the real process: exit codes, signals ---------------------------------------


def start_process(args: list[str], log_path: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "kakeya_daemon", *args], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO
        )


async def wait_serving(proc: subprocess.Popen, path: Path, log_path: Path) -> RawClient:
    deadline = time.monotonic() + HANG_GUARD_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, log_path.read_text()
        try:
            return await RawClient.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            await asyncio.sleep(0.1)
    raise AssertionError("the daemon did not start:\n" + log_path.read_text())


def process_args(qwen3_dir, sock_dir) -> list[str]:
    return ["--model", str(qwen3_dir), "--socket", str(sock_dir / "kakeya.sock"), "--window", "24", "--block", "8",
            "--idle-ttl-s", "0", "--max-new-tokens", str(LONG)]


async def test_process_sigterm_mid_stream_cancels_removes_socket_exits_0(qwen3_dir, sock_dir, tmp_path):
    log_path = tmp_path / "daemon.log"
    proc = start_process(process_args(qwen3_dir, sock_dir), log_path)
    try:
        client = await wait_serving(proc, sock_dir / "kakeya.sock", log_path)

        # A second daemon on the same socket refuses to start, naming the first.
        second_log = tmp_path / "second.log"
        second = start_process(process_args(qwen3_dir, sock_dir), second_log)
        assert await asyncio.to_thread(second.wait, HANG_GUARD_S) == 1
        message = second_log.read_text().strip()
        assert f"another kakeya daemon is already serving {sock_dir / 'kakeya.sock'} (pid {proc.pid})" in message
        assert len(message.splitlines()) == 1

        sid = await new_session(client, "Once upon a time")
        # Greedy, this model tells this story for over 2000 tokens; sampled, it may end it at any step.
        gen = client.request("generate", session_id=sid, max_tokens=LONG, temperature=0)
        await client.send(gen)
        await client.next_frame(gen["id"])
        proc.send_signal(signal.SIGTERM)
        frames = await client.events(gen["id"])
        assert done_of(frames)["stop_reason"] == "cancelled"
        assert await client.at_eof()
        assert await asyncio.to_thread(proc.wait, HANG_GUARD_S) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (sock_dir / "kakeya.sock").exists() and not (sock_dir / "kakeya.sock.lock").exists()
    log = log_path.read_text()
    assert "received SIGTERM" in log and "generation done (cancelled)" in log


def test_process_with_a_bad_model_path_exits_1_with_one_clear_line(sock_dir, tmp_path):
    missing = tmp_path / "no-such-model"
    log_path = tmp_path / "daemon.log"
    proc = start_process(["--model", str(missing), "--socket", str(sock_dir / "kakeya.sock")], log_path)
    assert proc.wait(HANG_GUARD_S) == 1
    lines = log_path.read_text().strip().splitlines()
    errors = [line for line in lines if " ERROR " in line]
    assert len(errors) == 1 and "cannot start" in errors[0] and str(missing) in errors[0]
    assert "Traceback" not in log_path.read_text()
    assert not (sock_dir / "kakeya.sock").exists() and not (sock_dir / "kakeya.sock.lock").exists()


async def test_process_sigterm_ends_an_http_stream_with_its_ending_and_exits_0(qwen3_dir, sock_dir, tmp_path):
    log_path = tmp_path / "daemon.log"
    port = free_port()
    proc = start_process([*process_args(qwen3_dir, sock_dir), "--http-port", str(port)], log_path)
    try:
        client = await wait_serving(proc, sock_dir / "kakeya.sock", log_path)
        # Greedy, so that the story runs on until the signal (sampled, it may end at any step).
        body = {"prompt": "Once upon a time", "max_tokens": LONG, "temperature": 0, "stream": True}
        async with aiohttp.ClientSession() as http:
            async with http.post(f"http://127.0.0.1:{port}/v1/completions", json=body) as response:
                lines = response.content.__aiter__()
                assert (await lines.__anext__()).startswith(b"data: ")  # it streams
                proc.send_signal(signal.SIGTERM)
                rest = [line.strip() async for line in lines if line.strip()]
        assert rest[-1] == b"data: [DONE]"
        ending = json.loads(rest[-2][len(b"data: "):])
        assert ending["error"]["code"] == "cancelled"
        assert len(rest) < LONG // 2  # it stopped long before max_tokens
        assert await client.at_eof()
        assert await asyncio.to_thread(proc.wait, HANG_GUARD_S) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    log = log_path.read_text()
    assert "shutting down: 1 generation(s) in flight" in log and "generation done (cancelled)" in log
    assert not (sock_dir / "kakeya.sock").exists()
