"""The kakeya-client distribution installed alone into a fresh virtual environment, driving a real daemon.

The wheel is built from clients/python (its own pyproject.toml, with the protocol
package) and installed with pip into a venv that has nothing else: msgpack comes from
the wheel ./setup.sh --dev fetched into .venv/wheelhouse, and no index is asked. That
venv cannot import MLX at all; its `kakeya` command and its library talk to a daemon
started from this repository's environment.
"""

import json
import shutil
import subprocess
import sys
import textwrap
import venv
from pathlib import Path

import pytest

from test_cli import daemon  # noqa: F401  (fixture: a daemon process serving the tiny model)

REPO = Path(__file__).resolve().parents[1]
WHEELHOUSE = Path(sys.prefix) / "wheelhouse"
# Guards a process that never ends; not a performance threshold.
HANG_GUARD_S = 300


def run(*cmd) -> subprocess.CompletedProcess:
    # Outside the repository: Python puts the working directory on sys.path, and its folders are packages.
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=HANG_GUARD_S, cwd="/")


@pytest.fixture(scope="module")
def alone(tmp_path_factory) -> Path:
    """A fresh venv holding kakeya-client and msgpack only; returns its bin folder."""
    assert list(WHEELHOUSE.glob("msgpack-*.whl")), f"no msgpack wheel in {WHEELHOUSE}: run ./setup.sh --dev"
    work = tmp_path_factory.mktemp("client-alone")
    # The client's source as its pyproject sees it: clients/python beside protocol/.
    skip = shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
    shutil.copytree(REPO / "clients" / "python", work / "src" / "clients" / "python", ignore=skip)
    shutil.copytree(REPO / "protocol", work / "src" / "protocol", ignore=skip)
    built = run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                "-w", work / "wheels", work / "src" / "clients" / "python")
    assert built.returncode == 0, built.stderr
    venv.create(work / "venv", with_pip=False)
    python = work / "venv" / "bin" / "python"
    installed = run(sys.executable, "-m", "pip", "--python", python, "install", "--no-index",
                    "--find-links", work / "wheels", "--find-links", WHEELHOUSE, "kakeya-client")
    assert installed.returncode == 0, installed.stderr
    return work / "venv" / "bin"


def test_the_venv_holds_the_client_and_msgpack_only(alone):
    listed = run(sys.executable, "-m", "pip", "--python", alone / "python", "list", "--format", "json")
    names = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert names == {"kakeya-client", "msgpack"}, names
    absent = ("mlx", "numpy", "aiohttp", "kakeya_mlx", "kakeya_daemon")
    code = f"import importlib.util as u; print([m for m in {absent!r} if u.find_spec(m)])"
    assert run(alone / "python", "-c", code).stdout.strip() == "[]"


def test_importing_it_imports_neither_mlx_nor_numpy_nor_aiohttp(alone):
    code = (
        "import sys, kakeya_client, kakeya_client.cli, kakeya_client.service, kakeya_protocol; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mlx', 'numpy', 'aiohttp', 'mlx_lm')))"
    )
    out = run(alone / "python", "-c", code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    # The same holds in the full environment, where MLX is installed and importable.
    assert run(sys.executable, "-c", code).stdout.strip() == "[]"


def test_its_command_and_library_drive_a_real_daemon(alone, daemon):
    _, sock = daemon
    status = run(alone / "kakeya", "status", "--socket", sock)
    assert status.returncode == 0, status.stderr
    assert "qwen3" in status.stdout and "sampling:" in status.stdout
    generated = run(alone / "kakeya", "generate", "--socket", sock, "--max-tokens", "4", "--temperature", "0",
                    "--json", "Once upon a time")
    assert generated.returncode == 0, generated.stderr
    assert json.loads(generated.stdout)["done"]["generated_tokens"] >= 1
    ran = run(alone / "kakeya", "run", "--socket", sock, "--max-tokens", "3", "Hello")
    assert ran.returncode == 0 and "using the daemon at" in ran.stderr
    script = textwrap.dedent(
        f"""
        import asyncio
        from kakeya_client import AsyncClient, Client

        with Client({sock!r}) as client:
            session = client.create_session()
            session.append(text="The quick brown fox")
            text, done = session.complete(max_tokens=3, temperature=0)
            assert done.generated_tokens >= 1

        async def main():
            async with await AsyncClient.connect({sock!r}) as client:
                return (await client.stats())["generations"]["total"]

        print(asyncio.run(main()))
        """
    )
    out = run(alone / "python", "-c", script)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip()) >= 3


def test_what_needs_the_daemon_says_it_is_not_installed(alone, tmp_path):
    missing = tmp_path / "nobody.sock"
    ran = run(alone / "kakeya", "run", "--socket", missing, "Hello")
    assert ran.returncode == 3 and "the daemon (kakeya-mlx) is not installed" in ran.stderr
    served = run(alone / "kakeya", "serve")
    assert served.returncode == 2 and "the daemon (kakeya-mlx) is not installed" in served.stderr


def test_the_daemons_distribution_depends_on_the_client():
    from importlib.metadata import requires

    assert any(r.replace(" ", "").startswith("kakeya-client") for r in requires("kakeya-mlx"))
