"""Starting the daemon: mistakes reported before anything heavy is imported, and only what a start needs imported.

Real `python -m kakeya_daemon` processes. "Before anything heavy" is observed, not
timed: `-X importtime` lists every module a process imported, so the error must come
from a process that never imported MLX, transformers or aiohttp. How fast that is
lives in tools/bench_startup.py.
"""

import json
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

# Guards a process that never ends; not a performance threshold.
HANG_GUARD_S = 300
HEAVY = ("mlx", "numpy", "transformers", "aiohttp", "mlx_lm")


@pytest.fixture
def sock_dir():
    path = Path(tempfile.mkdtemp(prefix="kk-start-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def start(*args: str, env=None) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run the daemon until it exits; (the process, the top-level packages it imported)."""
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "kakeya_daemon", *args],
        capture_output=True, text=True, timeout=HANG_GUARD_S, env=env,
    )
    lines = out.stderr.splitlines()
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in lines if line.startswith("import time:")}
    out.stderr = "\n".join(line for line in lines if not line.startswith("import time:"))
    return out, imported


def test_a_model_that_is_not_there_is_reported_before_anything_heavy_is_imported(sock_dir):
    out, imported = start("--socket", str(sock_dir / "s.sock"), "--model", str(sock_dir / "no-such-model"))
    assert out.returncode == 1
    assert out.stderr.count("\n") == 0 and "no model folder or GGUF file at" in out.stderr
    assert not imported & set(HEAVY), imported & set(HEAVY)
    assert not (sock_dir / "s.sock").exists() and not (sock_dir / "s.sock.lock").exists()


def test_a_misspelt_default_model_gets_a_suggestion(sock_dir):
    out, imported = start("--socket", str(sock_dir / "s.sock"), "--model", "smolm2")
    assert out.returncode == 1 and "(did you mean smollm2?)" in out.stderr
    assert not imported & set(HEAVY)


def test_a_misspelt_folder_gets_its_sibling_suggested(sock_dir, qwen3_dir):
    models = sock_dir / "models"
    shutil.copytree(qwen3_dir, models / "tiny-qwen3")
    out, _ = start("--socket", str(sock_dir / "s.sock"), "--model", str(models / "tiny-qwen"))
    assert out.returncode == 1 and f"(did you mean {models / 'tiny-qwen3'}?)" in out.stderr


def test_a_busy_http_port_is_reported_before_the_model_loads(sock_dir, qwen3_dir):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out, imported = start("--socket", str(sock_dir / "s.sock"), "--model", str(qwen3_dir), "--http-port", str(port))
    assert out.returncode == 1
    assert f"cannot serve the HTTP front on 127.0.0.1:{port}: Address already in use" in out.stderr
    assert "loading" not in out.stderr
    assert not imported & set(HEAVY), imported & set(HEAVY)
    assert not (sock_dir / "s.sock").exists() and not (sock_dir / "s.sock.lock").exists()


def test_a_socket_another_daemon_serves_is_reported_before_the_model_loads(sock_dir, qwen3_dir):
    sock = sock_dir / "s.sock"
    first = subprocess.Popen(
        [sys.executable, "-m", "kakeya_daemon", "--socket", str(sock), "--model", str(qwen3_dir), "--block", "8"],
        stderr=subprocess.PIPE, text=True,
    )
    try:
        for line in first.stderr:  # wait for the first one to serve
            if "serving" in line:
                break
        out, imported = start("--socket", str(sock), "--model", str(qwen3_dir))
        assert out.returncode == 1 and "another kakeya daemon is already serving" in out.stderr
        assert not imported & set(HEAVY)
    finally:
        first.terminate()
        first.wait(timeout=HANG_GUARD_S)


def test_a_file_that_is_not_a_model_and_a_gguf_of_another_architecture_are_refused(sock_dir):
    text = sock_dir / "notes.txt"
    text.write_text("hello")
    out, _ = start("--socket", str(sock_dir / "s.sock"), "--model", str(text))
    assert out.returncode == 1 and "is a file but not a GGUF model" in out.stderr

    gguf = sock_dir / "other.gguf"
    key, value = b"general.architecture", b"mamba"
    header = b"GGUF" + struct.pack("<IQQ", 3, 0, 1)
    gguf.write_bytes(header + struct.pack("<Q", len(key)) + key + struct.pack("<IQ", 8, len(value)) + value)
    out, imported = start("--socket", str(sock_dir / "s.sock"), "--model", str(gguf))
    assert out.returncode == 1 and "holds a 'mamba' model; only llama-architecture GGUF files" in out.stderr
    assert not imported & set(HEAVY)


def _served_imports(model: Path, sock: Path, http: bool) -> dict:
    script = textwrap.dedent(
        f"""
        import asyncio, json, sys
        from kakeya_daemon.config import DaemonConfig
        from kakeya_daemon.server import running_daemon

        async def main():
            http_socket = {str(sock) + ".http" if http else ""!r}
            config = DaemonConfig(model={str(model)!r}, socket={str(sock)!r}, block=8, http_socket=http_socket)
            async with running_daemon(config) as daemon:
                return sorted(m for m in {HEAVY!r} if m in sys.modules), daemon.http is not None

        print(json.dumps(asyncio.run(main())))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert out.returncode == 0, out.stderr
    imported, http_on = json.loads(out.stdout.strip().splitlines()[-1])
    return {"imported": set(imported), "http": http_on}


def test_a_serving_daemon_imports_aiohttp_only_with_the_http_front_and_never_transformers(sock_dir, qwen3_dir):
    plain = _served_imports(qwen3_dir, sock_dir / "a.sock", http=False)
    assert not plain["http"] and "aiohttp" not in plain["imported"] and "transformers" not in plain["imported"]
    assert {"mlx", "mlx_lm"} <= plain["imported"]
    with_http = _served_imports(qwen3_dir, sock_dir / "b.sock", http=True)
    assert with_http["http"] and "aiohttp" in with_http["imported"] and "transformers" not in with_http["imported"]


def test_an_exposed_http_front_without_api_keys_starts_with_a_warning(sock_dir, qwen3_dir):
    with socket.socket() as probe:
        probe.bind(("0.0.0.0", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "kakeya_daemon", "--socket", str(sock_dir / "s.sock"), "--model", str(qwen3_dir),
         "--block", "8", "--http-host", "0.0.0.0", "--http-port", str(port)],
        stderr=subprocess.PIPE, text=True,
    )
    lines = []
    try:
        for line in proc.stderr:
            lines.append(line)
            if "serving" in line:
                break
    finally:
        proc.terminate()
        proc.wait(timeout=HANG_GUARD_S)
    said = "".join(lines)
    assert f"WARNING the HTTP front will listen on http://0.0.0.0:{port} without API keys" in said
    assert said.index("without API keys") < said.index("loading")
