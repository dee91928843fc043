"""The `kakeya` command against a real daemon process on a real socket."""

import json
import os
import pty
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

# Guards a command against a daemon that never answers; not a performance threshold.
HANG_GUARD_S = 120


def kakeya(*args, input=None, env=None):
    return subprocess.run(
        [sys.executable, "-m", "kakeya_client", *args],
        input=input, capture_output=True, text=True, timeout=HANG_GUARD_S, env=env,
    )


@pytest.fixture(scope="module")
def daemon(make_model):
    folder = Path(tempfile.mkdtemp(prefix="kk-cli-", dir="/tmp"))
    sock = folder / "kakeya.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "kakeya_daemon", "--model", str(make_model("qwen3")), "--socket", str(sock),
         "--sink", "4", "--window", "24", "--block", "8", "--log-level", "warning"],
        stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + HANG_GUARD_S
    while kakeya("status", "--socket", str(sock)).returncode != 0:
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "the daemon did not come up"
        time.sleep(0.2)
    yield proc, str(sock)
    if proc.poll() is None:
        proc.terminate()
        proc.wait(timeout=HANG_GUARD_S)
    shutil.rmtree(folder, ignore_errors=True)


def test_status_reports_the_model_and_limits(daemon):
    _, sock = daemon
    out = kakeya("status", "--json", "--socket", sock)
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    text = json.dumps(status)
    assert "qwen3" in text and "max_sessions" in text
    human = kakeya("status", "--socket", sock)
    assert human.returncode == 0 and human.stdout.strip()
    assert "store:" in human.stdout and "spill" in human.stdout


def test_generate_streams_what_json_reports(daemon):
    _, sock = daemon
    greedy = ("--temperature", "0")  # the same text twice
    streamed = kakeya("generate", "--socket", sock, "--max-tokens", "12", *greedy, "The quick brown fox")
    as_json = kakeya("generate", "--socket", sock, "--max-tokens", "12", *greedy, "--json", "The quick brown fox")
    assert streamed.returncode == 0 and as_json.returncode == 0, streamed.stderr + as_json.stderr
    result = json.loads(as_json.stdout)
    assert result["done"]["stop_reason"] in ("max_tokens", "eos")
    assert 1 <= result["done"]["generated_tokens"] <= 12
    assert streamed.stdout.rstrip("\n") == result["text"].rstrip("\n")


def test_generate_reads_the_prompt_from_stdin_and_speaks_chat(daemon):
    _, sock = daemon
    out = kakeya("generate", "--socket", sock, "--max-tokens", "5", "--chat", "--json", input="Hello there\n")
    assert out.returncode == 0, out.stderr
    done = json.loads(out.stdout)["done"]
    assert done["prompt_tokens"] > 3 and done["generated_tokens"] >= 1


def test_generate_with_a_json_schema_file_prints_json_that_validates(daemon, tmp_path):
    _, sock = daemon
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["ok", "n"],
        "additionalProperties": False,
    }
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    out = kakeya("generate", "--socket", sock, "--max-tokens", "60", "--chat", "--json-schema",
                 str(tmp_path / "schema.json"), "--frequency-penalty", "0.5", "Reply in JSON.")
    assert out.returncode == 0, out.stderr
    reply = json.loads(out.stdout)
    assert isinstance(reply["ok"], bool) and 0 <= reply["n"] <= 9 and set(reply) == {"ok", "n"}
    missing = kakeya("generate", "--socket", sock, "--json-schema", str(tmp_path / "nope.json"), "hi")
    assert missing.returncode == 2 and "--json-schema" in missing.stderr
    (tmp_path / "bad.json").write_text('{"type": "objekt"}')
    bad = kakeya("generate", "--socket", sock, "--json-schema", str(tmp_path / "bad.json"), "hi")
    assert bad.returncode == 1 and "constraint.schema" in bad.stderr


def test_bad_arguments_fail_with_one_clear_line(daemon):
    _, sock = daemon
    out = kakeya("generate", "--socket", sock, "--max-tokens", "0", "hi")
    assert out.returncode in (1, 2)
    assert len(out.stderr.strip().splitlines()) == 1 and "max_tokens" in out.stderr
    nobody = kakeya("status", "--socket", sock + ".missing")
    assert nobody.returncode == 3 and "no kakeya daemon" in nobody.stderr


def test_chat_session_commands(daemon):
    _, sock = daemon
    out = kakeya("chat", "--socket", sock, "--max-tokens", "4", input="Hello\n/info\n/reset\nAgain\n/quit\n")
    assert out.returncode == 0, out.stderr
    # Replies go to stdout; /info and /reset speak on stderr, out of the transcript's way.
    assert out.stdout.count(">>> ") >= 3
    assert "tokens of history" in out.stderr and "new conversation" in out.stderr
    sessions = kakeya("sessions", "--json", "--socket", sock)
    assert sessions.returncode == 0
    assert isinstance(json.loads(sessions.stdout), (list, dict))


def test_sessions_save_restore_and_delete_by_name(daemon):
    _, sock = daemon
    from kakeya_client import Client

    with Client(sock) as client:
        session = client.create_session()
        session.append(text="Once upon a time")
        session.complete(max_tokens=4)
        history = session.info()["history_length"]
    saved = kakeya("sessions", "save", session.id, "tale", "--socket", sock)
    assert saved.returncode == 0 and saved.stdout.startswith(f"saved session {session.id} as tale"), saved.stderr
    listing = kakeya("sessions", "--socket", sock)
    assert listing.returncode == 0 and "SAVED" in listing.stdout
    [row] = [line.split() for line in listing.stdout.splitlines() if line.startswith("tale ")]
    assert row[1] == str(history) and row[-1] == session.id
    restored = kakeya("sessions", "restore", "tale", "--socket", sock)
    fork = restored.stdout.strip()
    assert restored.returncode == 0 and fork and fork != session.id
    with Client(sock) as client:
        assert client.session(fork).info()["history_length"] == history
    assert kakeya("sessions", "delete", "tale", "--socket", sock).stdout.strip() == "deleted tale"
    again = kakeya("sessions", "delete", "tale", "--socket", sock)
    assert again.returncode == 1 and "no saved session 'tale'" in again.stderr
    wrong = kakeya("sessions", "save", session.id, "--socket", sock)
    assert wrong.returncode == 2 and "save SESSION NAME" in wrong.stderr


def test_run_needs_nothing_running(make_model):
    env = dict(os.environ, XDG_RUNTIME_DIR=tempfile.mkdtemp(prefix="kk-run-", dir="/tmp"))
    env.pop("KAKEYA_SOCKET", None)
    out = kakeya("run", "--model", str(make_model("qwen3")), "--max-tokens", "5", "--json", "Once upon a time", env=env)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["done"]["generated_tokens"] >= 1
    assert "kakeya run: no daemon answers at" in out.stderr and "starting a private one" in out.stderr
    # The private daemon said what it was doing while it started.
    assert "loading the engine" in out.stderr and "serving" in out.stderr


def _generations(sock: str) -> int:
    return json.loads(kakeya("status", "--json", "--socket", sock).stdout)["stats"]["generations"]["total"]


def test_run_uses_the_daemon_that_answers(daemon, make_model):
    _, sock = daemon
    before = _generations(sock)
    out = kakeya("run", "--socket", sock, "--max-tokens", "3", "--json", "Once upon a time")
    assert out.returncode == 0, out.stderr
    assert out.stderr == f"kakeya run: using the daemon at {sock} ({make_model('qwen3').name})\n"
    assert _generations(sock) == before + 1
    # The same model named by its folder is the daemon's too.
    out = kakeya("run", "--socket", sock, "--model", str(make_model("qwen3")), "--max-tokens", "3", "Hi")
    assert out.returncode == 0 and "using the daemon at" in out.stderr and _generations(sock) == before + 2


def test_run_with_another_model_starts_a_private_daemon(daemon, make_model):
    _, sock = daemon
    before = _generations(sock)
    other = make_model("llama")
    out = kakeya("run", "--socket", sock, "--model", str(other), "--max-tokens", "3", "--json", "Once upon a time")
    assert out.returncode == 0, out.stderr
    assert f"the daemon at {sock} serves {make_model('qwen3').name}, not {other}; starting a private one" in out.stderr
    assert json.loads(out.stdout)["done"]["generated_tokens"] >= 1 and _generations(sock) == before


def on_terminal(*args, input_lines=()) -> str:
    """Run `kakeya ARGS` with stdin, stdout and stderr on a pseudo-terminal; everything it wrote there."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "kakeya_client", *args], stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    for line in input_lines:
        os.write(master, line.encode())
    seen = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the process closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    os.close(master)
    assert proc.wait(timeout=HANG_GUARD_S) == 0, seen
    return seen.decode(errors="replace")


def test_a_spinner_shows_while_the_prompt_is_read_on_a_terminal_only(daemon):
    _, sock = daemon
    prompt = "The quick brown fox jumps over the lazy dog. " * 20
    ids = kakeya("generate", "--socket", sock, "--max-tokens", "3", "--temperature", "0", "--json", prompt)
    n = json.loads(ids.stdout)["done"]["prompt_tokens"]
    shown = on_terminal("generate", "--socket", sock, "--max-tokens", "3", "--temperature", "0", prompt)
    label = f"reading the prompt ({n} tokens)"
    assert label in shown
    # Erased before the reply: the spinner's line is cleared, then the text follows.
    erase = shown.rindex("\r\x1b[K")
    reply = json.loads(ids.stdout)["text"].replace("\n", "\r\n")  # the terminal turns newlines into CR LF
    assert reply and shown[erase + len("\r\x1b[K") :].startswith(reply)
    # Not on a pipe: stderr stays empty.
    piped = kakeya("generate", "--socket", sock, "--max-tokens", "3", prompt)
    assert piped.returncode == 0 and piped.stderr == ""


def test_chat_shows_the_spinner_for_each_turn_on_a_terminal(daemon):
    _, sock = daemon
    shown = on_terminal("chat", "--socket", sock, "--max-tokens", "3", input_lines=["Hello there\n", "/quit\n"])
    assert "reading the prompt (" in shown and ">>> " in shown


# Last: it stops the module's daemon.
def test_stop_ends_the_daemon_cleanly(daemon):
    proc, sock = daemon
    out = kakeya("stop", "--socket", sock)
    assert out.returncode == 0, out.stderr
    assert proc.wait(timeout=HANG_GUARD_S) == 0
    assert not os.path.exists(sock)
