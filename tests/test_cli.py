"""The `kakeya` command against a real daemon process on a real socket."""

import json
import os
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


def test_run_needs_nothing_running(make_model):
    env = dict(os.environ, XDG_RUNTIME_DIR=tempfile.mkdtemp(prefix="kk-run-", dir="/tmp"))
    out = kakeya("run", "--model", str(make_model("qwen3")), "--max-tokens", "5", "--json", "Once upon a time", env=env)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["done"]["generated_tokens"] >= 1


def test_stop_ends_the_daemon_cleanly(daemon):
    proc, sock = daemon
    out = kakeya("stop", "--socket", sock)
    assert out.returncode == 0, out.stderr
    assert proc.wait(timeout=HANG_GUARD_S) == 0
    assert not os.path.exists(sock)
