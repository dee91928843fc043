"""The client and the CLI with no daemon running.

Where a test needs the other end of the socket to misbehave (stall, send garbage,
answer out of order), a scripted peer speaks the protocol with the real codec over a
real Unix socket. Behaviour against a real daemon is tested with the daemon.
"""

import asyncio
import io
import json
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from kakeya_client import (
    AsyncClient,
    Busy,
    Client,
    ConnectionFailed,
    DoneEvent,
    Internal,
    InvalidArgument,
    KakeyaError,
    NotFound,
    ProtocolError,
    ResourceExhausted,
    Timeout,
    TokensEvent,
    TruncatedEvent,
)
from kakeya_client.cli import main
from kakeya_protocol import FrameDecoder, encode_frame, make_error, make_event, make_result

HELLO = {
    "protocol": 1,
    "server": "kakeya-mlx/test",
    "model": {"name": "m", "has_chat_template": True, "sink": 4, "window": 24, "block": 8},
    "limits": {"max_frame_bytes": 16777216},
}
SID = "s1"
TIMINGS = {"ttft_s": 0.0, "prefill_tokens_per_s": 0.0, "decode_tokens_per_s": 0.0, "total_s": 0.0}
# Guards a wait that only a bug would make long; not a performance threshold.
HANG_GUARD_S = 30.0


def done(stop_reason: str = "max_tokens", generated: int = 2, **extra) -> dict:
    return {"stop_reason": stop_reason, "prompt_tokens": 1, "generated_tokens": generated, "cached_tokens": 0, "timings": TIMINGS, **extra}


@pytest.fixture
def sock_dir():
    # Short and private: Unix socket paths are limited to ~104 bytes.
    path = Path(tempfile.mkdtemp(prefix="kc-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Peer:
    """The far end of one connection, run by a script in a thread: it reads requests and writes frames."""

    def __init__(self, path: Path, script):
        self.path = path
        self.script = script
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(1)
        self.received: list[dict] = []
        self.error: BaseException | None = None
        self._pending: list[dict] = []
        self._decoder = FrameDecoder()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            self.conn, _ = self.listener.accept()
            self.conn.settimeout(HANG_GUARD_S)
            with self.conn:
                self.script(self)
        except BaseException as exc:  # reported by finish()
            self.error = exc
        finally:
            self.listener.close()

    def recv(self) -> dict:
        while not self._pending:
            data = self.conn.recv(1 << 16)
            if not data:
                raise EOFError("the client closed the connection")
            self._pending.extend(self._decoder.feed(data))
        message = self._pending.pop(0)
        self.received.append(message)
        return message

    def expect(self, method: str) -> dict:
        message = self.recv()
        assert message["method"] == method, message
        return message

    def send(self, message: dict) -> None:
        self.conn.sendall(encode_frame(message))

    def hello(self, result: dict = HELLO) -> None:
        request = self.expect("hello")
        assert request["params"]["protocol"] == 1 and request["params"]["client"].startswith("kakeya-python/")
        self.send(make_result(request["id"], result))

    def wait_for_close(self) -> None:
        """Read until the client hangs up (so the client, not the peer, ends the connection)."""
        try:
            while True:
                self.recv()
        except (EOFError, ConnectionError):
            pass

    def finish(self) -> None:
        self.thread.join(HANG_GUARD_S)
        assert not self.thread.is_alive(), "the peer script did not finish"
        if self.error is not None:
            raise self.error


@pytest.fixture
def peer(sock_dir):
    """`peer(script) -> Peer` listening on sock_dir/kakeya.sock; scripts are checked at teardown."""
    peers = []

    def start(script) -> Peer:
        p = Peer(sock_dir / "kakeya.sock", script)
        peers.append(p)
        return p

    yield start
    for p in peers:
        p.finish()


# ---- no daemon --------------------------------------------------------------------------------


def test_no_daemon_is_connection_failed_naming_the_path(sock_dir):
    missing = sock_dir / "nothing-here.sock"
    with pytest.raises(ConnectionFailed) as caught:
        Client(missing)
    assert str(missing) in caught.value.message and "kakeya serve" in caught.value.message
    assert caught.value.code == "connection_failed" and isinstance(caught.value, KakeyaError)


def test_stale_socket_file_is_connection_failed(sock_dir):
    stale = sock_dir / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()  # the file stays, nothing listens
    with pytest.raises(ConnectionFailed, match="no kakeya daemon at .*stale.sock"):
        Client(stale)


async def test_async_no_daemon_is_connection_failed(sock_dir):
    missing = sock_dir / "nothing-here.sock"
    with pytest.raises(ConnectionFailed, match="kakeya serve") as caught:
        await AsyncClient.connect(missing)
    assert str(missing) in caught.value.message


def test_default_path_follows_kakeya_socket(monkeypatch, sock_dir):
    monkeypatch.setenv("KAKEYA_SOCKET", str(sock_dir / "env.sock"))
    with pytest.raises(ConnectionFailed, match="env.sock"):
        Client()


# ---- the sync client against a scripted peer --------------------------------------------------


def test_hello_then_calls_map_to_results_and_typed_errors(peer):
    def script(p):
        p.hello()
        for method, reply in [
            ("create_session", {"session_id": SID}),
            ("append", {"appended": 3, "history_length": 3}),
            ("session_info", ("not_found", "no session 's1'")),
            ("append", ("invalid_argument", "append: tokens[0]=-1: must be a non-negative integer token id")),
            ("cancel", ("busy", "b")),
            ("create_session", ("resource_exhausted", "session limit reached (max_sessions=1)")),
            ("stats", ("internal", "boom")),
            ("stats", ("protocol_error", "p")),
            ("stats", ("quota", "a code from a newer daemon")),
            ("tokenize", {"tokens": [1, 2]}),
            ("detokenize", {"text": "ab"}),
            ("list_sessions", {"sessions": []}),
            ("shutdown", {"ok": True}),
        ]:
            request = p.expect(method)
            if isinstance(reply, tuple):  # written out: make_error accepts only this version's codes
                p.send({"id": request["id"], "error": {"code": reply[0], "message": reply[1]}})
            else:
                p.send(make_result(request["id"], reply))
        p.wait_for_close()

    p = peer(script)
    with Client(p.path, timeout=HANG_GUARD_S) as client:
        assert client.server_info == HELLO
        session = client.create_session()
        assert session.id == SID
        assert session.append(text="abc") == {"appended": 3, "history_length": 3}
        with pytest.raises(NotFound, match="no session"):
            session.info()
        with pytest.raises(InvalidArgument, match=r"tokens\[0\]"):
            session.append(tokens=[-1])
        with pytest.raises(Busy):
            session.cancel()
        with pytest.raises(ResourceExhausted, match="max_sessions"):
            client.create_session()
        with pytest.raises(Internal, match="boom"):
            client.stats()
        with pytest.raises(ProtocolError):
            client.stats()
        with pytest.raises(KakeyaError) as unknown:
            client.stats()
        assert unknown.value.code == "quota" and type(unknown.value) is KakeyaError
        assert client.tokenize("ab") == [1, 2]
        assert client.detokenize([1, 2]) == "ab"
        assert client.list_sessions() == []
        client.shutdown()
    sent = p.received
    assert [m["id"] for m in sent] == list(range(1, len(sent) + 1))
    assert sent[2]["params"] == {"session_id": SID, "text": "abc"}
    assert sent[4]["params"] == {"session_id": SID, "tokens": [-1]}
    assert sent[5]["params"] == {"session_id": SID}


def test_generate_streams_typed_events_and_skips_unknown_ones(peer):
    def script(p):
        p.hello()
        gen = p.expect("generate")
        assert gen["params"] == {"session_id": SID, "max_tokens": 3, "temperature": 0.5, "stop": ["\n"]}
        rid = gen["id"]
        p.send(make_event(rid, "tokens", {"tokens": [5], "text": "Hi"}))
        p.send({"id": rid, "event": "progress", "data": {"x": 1}})  # a newer daemon's event
        p.send(make_event(rid, "truncated", {"evicted": 8, "total_evicted": 16}))
        p.send(make_event(rid, "tokens", {"tokens": [6, 7], "text": " there"}))
        p.send(make_event(rid, "done", done("stop_sequence", 3)))
        p.wait_for_close()

    p = peer(script)
    with Client(p.path, timeout=HANG_GUARD_S) as client:
        stream = client.session(SID).generate(max_tokens=3, temperature=0.5, seed=None, stop="\n")
        events = list(stream)
    assert events == [
        TokensEvent([5], "Hi"),
        TruncatedEvent(8, 16),
        TokensEvent([6, 7], " there"),
        DoneEvent("stop_sequence", 1, 3, 0, TIMINGS, None),
    ]
    assert stream.done == events[-1]


def test_replies_are_routed_by_id_while_a_generate_streams(peer):
    """A call made in the middle of a generate gets its own reply even though events keep coming."""

    def script(p):
        p.hello()
        gen = p.expect("generate")["id"]
        p.send(make_event(gen, "tokens", {"tokens": [1], "text": "a"}))
        info = p.expect("session_info")["id"]
        p.send(make_event(gen, "tokens", {"tokens": [2], "text": "b"}))
        p.send(make_result(info, {"session_id": SID, "generating": True}))
        p.send(make_event(gen, "tokens", {"tokens": [3], "text": "c"}))
        p.send(make_event(gen, "done", done(generated=3)))
        p.wait_for_close()

    p = peer(script)
    with Client(p.path, timeout=HANG_GUARD_S) as client:
        session = client.session(SID)
        stream = session.generate()
        first = next(stream)
        assert session.info() == {"session_id": SID, "generating": True}
        rest = list(stream)
    assert [e.text for e in [first, *rest] if isinstance(e, TokensEvent)] == ["a", "b", "c"]
    assert isinstance(rest[-1], DoneEvent)


def test_leaving_a_generate_early_sends_cancel_and_drains_to_done(peer):
    def script(p):
        p.hello()
        gen = p.expect("generate")["id"]
        p.send(make_event(gen, "tokens", {"tokens": [1], "text": "a"}))
        cancel = p.expect("cancel")
        assert cancel["params"] == {"request_id": gen}
        p.send(make_event(gen, "tokens", {"tokens": [2], "text": "b"}))
        p.send(make_result(cancel["id"], {"cancelled": True}))
        p.send(make_event(gen, "done", done("cancelled")))
        # The session is free again: the next request is answered normally.
        info = p.expect("session_info")
        p.send(make_result(info["id"], {"generating": False}))
        p.wait_for_close()

    p = peer(script)
    with Client(p.path, timeout=HANG_GUARD_S) as client:
        session = client.session(SID)
        for event in session.generate(max_tokens=100):
            assert event == TokensEvent([1], "a")
            break
        assert session.info() == {"generating": False}


def test_stream_cancel_keeps_the_stream_until_done(peer):
    def script(p):
        p.hello()
        gen = p.expect("generate")["id"]
        p.send(make_event(gen, "tokens", {"tokens": [1], "text": "a"}))
        cancel = p.expect("cancel")
        p.send(make_result(cancel["id"], {"cancelled": True}))
        p.send(make_event(gen, "done", done("cancelled", 1)))
        p.wait_for_close()

    p = peer(script)
    with Client(p.path, timeout=HANG_GUARD_S) as client:
        stream = client.session(SID).generate()
        next(stream)
        assert stream.cancel() is True
        assert [type(e) for e in stream] == [DoneEvent]
        assert stream.done.stop_reason == "cancelled"
        assert stream.cancel() is False  # finished: nothing left to cancel


def test_generate_rejected_before_it_starts_raises_the_error(peer):
    def script(p):
        p.hello()
        gen = p.expect("generate")
        p.send(make_error(gen["id"], "busy", f"session {SID!r} is already generating"))
        p.wait_for_close()

    p = peer(script)
    with Client(p.path, timeout=HANG_GUARD_S) as client:
        with pytest.raises(Busy, match="already generating"):
            list(client.session(SID).generate())


def test_stream_text_and_complete_raise_a_failed_generation(peer):
    def script(p):
        p.hello()
        for _ in range(2):
            gen = p.expect("generate")["id"]
            p.send(make_event(gen, "tokens", {"tokens": [1], "text": "par"}))
            p.send(make_event(gen, "tokens", {"tokens": [2], "text": ""}))
            p.send(make_event(gen, "done", done("error", error={"code": "internal", "message": "out of memory"})))
        gen = p.expect("generate")["id"]
        p.send(make_event(gen, "tokens", {"tokens": [1, 2], "text": "ok"}))
        p.send(make_event(gen, "done", done("eos")))
        p.wait_for_close()

    p = peer(script)
    with Client(p.path, timeout=HANG_GUARD_S) as client:
        session = client.session(SID)
        chunks = []
        with pytest.raises(Internal, match="out of memory"):
            for text in session.stream_text():
                chunks.append(text)
        assert chunks == ["par"]
        with pytest.raises(Internal, match="out of memory"):
            session.complete()
        text, final = session.complete()
        assert (text, final.stop_reason, final.error) == ("ok", "eos", None)


def test_timeout_when_the_daemon_does_not_answer(peer):
    stalled = threading.Event()

    def script(p):
        p.hello()
        p.expect("stats")  # never answered
        stalled.wait(HANG_GUARD_S)
        late = p.expect("tokenize")
        p.send(make_result(1, {"late": "reply for an id nobody waits for"}))
        p.send(make_result(late["id"], {"tokens": [4]}))
        p.wait_for_close()

    p = peer(script)
    with Client(p.path, timeout=HANG_GUARD_S) as client:  # the hello is answered, however slowly
        client.timeout = 0.2
        with pytest.raises(Timeout, match="stats: no answer"):
            client.stats()
        stalled.set()
        client.timeout = HANG_GUARD_S
        assert client.tokenize("x") == [4]  # the connection still works


def test_daemon_closing_the_connection_fails_pending_and_later_calls(peer):
    def script(p):
        p.hello()
        p.expect("stats")  # and hang up without answering

    p = peer(script)
    with Client(p.path, timeout=HANG_GUARD_S) as client:
        with pytest.raises(ConnectionFailed, match="lost the connection .* closed the connection"):
            client.stats()
        with pytest.raises(ConnectionFailed):
            client.create_session()


def test_bad_frame_from_the_daemon_fails_the_connection(peer):
    def script(p):
        p.hello()
        p.expect("stats")
        p.conn.sendall(struct.pack(">I", 0))
        p.wait_for_close()

    p = peer(script)
    with Client(p.path, timeout=HANG_GUARD_S) as client:
        with pytest.raises(ConnectionFailed, match="bad frame: frame length is 0"):
            client.stats()


def test_connection_level_error_reaches_every_waiting_call(peer):
    def script(p):
        p.expect("hello")
        p.send(make_error(None, "protocol_error", "this daemon serves uid 0 only; connection from uid 1 refused"))

    p = peer(script)
    with pytest.raises(ProtocolError, match="refused"):
        Client(p.path, timeout=HANG_GUARD_S)


def test_request_larger_than_the_announced_frame_limit_is_refused_before_sending(peer):
    def script(p):
        p.hello({**HELLO, "limits": {"max_frame_bytes": 1024}})
        request = p.expect("append")
        assert len(request["params"]["text"]) == 10
        p.send(make_result(request["id"], {"appended": 1, "history_length": 1}))
        p.wait_for_close()

    p = peer(script)
    with Client(p.path, timeout=HANG_GUARD_S) as client:
        with pytest.raises(InvalidArgument, match="max_frame_bytes=1024"):
            client.session(SID).append(text="x" * 2000)
        assert client.session(SID).append(text="x" * 10)["appended"] == 1


def test_tokens_are_sent_as_plain_ints(peer):
    class TokenId:  # e.g. a numpy integer: usable as an index, not packable by msgpack
        def __init__(self, value):
            self.value = value

        def __index__(self):
            return self.value

    def script(p):
        p.hello()
        request = p.expect("append")
        assert request["params"] == {"session_id": SID, "tokens": [3, 4]}
        p.send(make_result(request["id"], {"appended": 2, "history_length": 2}))
        p.wait_for_close()

    p = peer(script)
    with Client(p.path, timeout=HANG_GUARD_S) as client:
        client.session(SID).append(tokens=(TokenId(3), TokenId(4)))
        with pytest.raises(InvalidArgument, match="token ids"):
            client.session(SID).append(tokens=[1.5])


def test_messages_are_sent_with_the_generation_prompt_flag(peer):
    def script(p):
        p.hello()
        request = p.expect("append")
        assert request["params"] == {
            "session_id": SID,
            "messages": [{"role": "user", "content": "hi"}],
            "add_generation_prompt": False,
        }
        p.send(make_result(request["id"], {"appended": 5, "history_length": 5}))
        p.wait_for_close()

    p = peer(script)
    with Client(p.path, timeout=HANG_GUARD_S) as client:
        client.session(SID).append(messages=[{"role": "user", "content": "hi"}], add_generation_prompt=False)


# ---- the async client against a scripted peer -------------------------------------------------


async def test_async_concurrent_requests_are_answered_out_of_order(peer):
    def script(p):
        p.hello()
        first, second = p.expect("tokenize"), p.expect("tokenize")
        p.send(make_result(second["id"], {"tokens": [2]}))
        p.send(make_result(first["id"], {"tokens": [1]}))
        p.wait_for_close()

    p = peer(script)
    async with AsyncClient(p.path, timeout=HANG_GUARD_S) as client:
        assert client.server_info == HELLO
        first = asyncio.create_task(client.tokenize("one"))
        await asyncio.sleep(0)  # send "one" first
        second = asyncio.create_task(client.tokenize("two"))
        assert await asyncio.gather(first, second) == [[1], [2]]


async def test_async_generate_and_break_cancels_then_next_generate_waits_for_done(peer):
    def script(p):
        p.hello()
        gen = p.expect("generate")["id"]
        p.send(make_event(gen, "tokens", {"tokens": [1], "text": "a"}))
        cancel = p.expect("cancel")
        assert cancel["params"] == {"request_id": gen}
        p.send(make_event(gen, "tokens", {"tokens": [2], "text": "b"}))
        p.send(make_event(gen, "done", done("cancelled")))
        # Only after that done does the next generate on the session arrive.
        nxt = p.expect("generate")["id"]
        p.send(make_event(nxt, "tokens", {"tokens": [9], "text": "z"}))
        p.send(make_event(nxt, "done", done("eos", 1)))
        p.wait_for_close()

    p = peer(script)
    async with AsyncClient(p.path, timeout=HANG_GUARD_S) as client:
        session = client.session(SID)
        async for event in session.generate(max_tokens=100):
            assert event == TokensEvent([1], "a")
            break
        text, final = await session.complete()
        assert (text, final.stop_reason) == ("z", "eos")


async def test_async_stream_text_and_errors(peer):
    def script(p):
        p.hello()
        gen = p.expect("generate")["id"]
        for i, piece in enumerate(["Hel", "", "lo"]):
            p.send(make_event(gen, "tokens", {"tokens": [i], "text": piece}))
        p.send(make_event(gen, "done", done("max_tokens", 3)))
        bad = p.expect("generate")
        p.send(make_error(bad["id"], "invalid_argument", "generate: max_tokens=0: must be >= 1"))
        info = p.expect("session_info")
        p.send(make_error(info["id"], "not_found", "gone"))
        p.wait_for_close()

    p = peer(script)
    async with AsyncClient(p.path, timeout=HANG_GUARD_S) as client:
        session = client.session(SID)
        stream = session.stream_text(max_tokens=3)
        assert [t async for t in stream] == ["Hel", "lo"]
        assert stream.done.generated_tokens == 3
        with pytest.raises(InvalidArgument, match="max_tokens"):
            await session.complete(max_tokens=0)
        with pytest.raises(NotFound):
            await session.info()


async def test_async_timeout_and_lost_connection(peer):
    def script(p):
        p.hello()
        p.expect("stats")  # not answered
        p.expect("list_sessions")  # then hang up

    p = peer(script)
    client = await AsyncClient.connect(p.path, timeout=HANG_GUARD_S)  # the hello is answered, however slowly
    try:
        client.timeout = 0.2
        with pytest.raises(Timeout):
            await client.stats()
        client.timeout = HANG_GUARD_S
        with pytest.raises(ConnectionFailed, match="closed the connection"):
            await client.list_sessions()
        assert client.closed
    finally:
        await client.close()


# ---- the CLI ------------------------------------------------------------------------------------


def test_cli_status_without_a_daemon_exits_3_with_one_line(capsys, sock_dir):
    missing = sock_dir / "none.sock"
    assert main(["status", "--socket", str(missing)]) == 3
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and str(missing) in err and "kakeya serve" in err


@pytest.mark.parametrize("command", [["sessions"], ["stop"], ["generate", "hello"], ["chat"]])
def test_cli_client_commands_without_a_daemon_exit_3(capsys, command, monkeypatch, sock_dir):
    monkeypatch.setenv("KAKEYA_SOCKET", str(sock_dir / "env.sock"))
    assert main(command) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "env.sock" in err


def test_cli_help_and_version(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("serve", "run", "chat", "generate", "status", "sessions", "stop", "service"):
        assert command in out
    assert main(["generate", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--max-tokens", "--temperature", "--top-p", "--stop", "--chat", "--json", "--socket", "stdin"):
        assert flag in out
    assert main(["chat", "--help"]) == 0 and "/reset" in capsys.readouterr().out
    assert main(["run", "--help"]) == 0 and "--model" in capsys.readouterr().out
    assert main(["--version"]) == 0 and capsys.readouterr().out.startswith("kakeya ")


@pytest.mark.parametrize(
    "argv",
    [[], ["generate", "--bogus"], ["status", "extra"], ["generate", "--max-tokens", "many", "x"], ["nonsense"]],
)
def test_cli_usage_errors_exit_2(capsys, argv):
    assert main(argv) == 2
    assert "usage:" in capsys.readouterr().err


def test_cli_empty_prompt_is_a_usage_error(capsys, monkeypatch, sock_dir):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert main(["generate", "--socket", str(sock_dir / "x.sock")]) == 2
    assert "prompt is empty" in capsys.readouterr().err


def test_cli_generate_json_against_a_scripted_peer(capsys, peer):
    def script(p):
        p.hello()
        p.send(make_result(p.expect("create_session")["id"], {"session_id": SID}))
        append = p.expect("append")
        assert append["params"] == {
            "session_id": SID,
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
            "add_generation_prompt": True,
        }
        p.send(make_result(append["id"], {"appended": 9, "history_length": 9}))
        gen = p.expect("generate")
        assert gen["params"] == {"session_id": SID, "max_tokens": 4, "top_k": 5, "stop": ["a", "b"]}
        p.send(make_event(gen["id"], "tokens", {"tokens": [1, 2], "text": "Hello"}))
        p.send(make_event(gen["id"], "done", done("eos")))
        close = p.expect("close_session")
        p.send(make_result(close["id"], {"closed": True}))
        p.wait_for_close()

    p = peer(script)
    argv = ["generate", "--socket", str(p.path), "--system", "Be brief.", "--max-tokens", "4", "--top-k", "5"]
    assert main(argv + ["--stop", "a", "--stop", "b", "--json", "Hi"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["text"] == "Hello" and result["tokens"] == [1, 2]
    assert result["done"]["stop_reason"] == "eos" and "error" not in result["done"]


def test_cli_reports_daemon_errors_with_exit_1(capsys, peer):
    def script(p):
        p.hello()
        p.send(make_error(p.expect("create_session")["id"], "resource_exhausted", "session limit reached (max_sessions=1)"))
        p.wait_for_close()

    p = peer(script)
    assert main(["generate", "--socket", str(p.path), "hi"]) == 1
    err = capsys.readouterr().err
    assert err == "kakeya: session limit reached (max_sessions=1)\n"


def test_cli_does_not_import_mlx():
    code = (
        "import sys, kakeya_client.cli\n"
        "kakeya_client.cli.build_parser()\n"
        "bad = [m for m in ('mlx', 'kakeya_mlx', 'kakeya_daemon') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_kakeya_serve_help_is_the_daemons_help():
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from kakeya_client.cli import main; sys.exit(main(sys.argv[1:]))", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "usage: kakeya serve" in proc.stdout and "--max-sessions" in proc.stdout
