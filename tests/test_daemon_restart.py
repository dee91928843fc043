"""The real daemon process and its session store: SIGTERM and a new start, SIGKILL mid-write, a full disk."""

import asyncio
import os
import resource
import signal
import subprocess
import sys
import textwrap
import threading
import time

from test_daemon import HANG_GUARD_S, RawClient, sock_dir  # noqa: F401  (fixture)
from test_daemon_faults import REPO, process_args, start_process, wait_serving
from test_daemon_store import AFTER, BEFORE, run, states


def store_args(qwen3_dir, sock_dir, store, *extra: str) -> list[str]:
    return [*process_args(qwen3_dir, sock_dir), "--store-dir", str(store), *extra]


async def stop(proc: subprocess.Popen, client: RawClient) -> None:
    proc.send_signal(signal.SIGTERM)
    assert await client.at_eof()
    assert await asyncio.to_thread(proc.wait, HANG_GUARD_S) == 0


async def test_sessions_outlive_a_sigterm_and_continue_exactly_after_the_next_start(qwen3_dir, sock_dir, tmp_path):
    store, sock = tmp_path / "store", sock_dir / "kakeya.sock"
    first_log = tmp_path / "first.log"
    proc = start_process(store_args(qwen3_dir, sock_dir, store), first_log)
    try:
        client = await wait_serving(proc, sock, first_log)
        kept = (await client.result("create_session"))["session_id"]
        moved = (await client.result("create_session"))["session_id"]
        assert (await run(client, kept, BEFORE, 50))[0] == (await run(client, moved, BEFORE, 50))[0]
        expected, _ = await run(client, kept, AFTER, 50 + len(BEFORE))  # the same session, never out of memory
        evicted = (await client.result("session_info", session_id=moved))["evicted_tokens"]
        await stop(proc, client)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = first_log.read_text()
    assert "saving 2 session(s)" in log and "saved 2 session(s)" in log
    assert sorted(p.name for p in store.iterdir() if p.suffix == ".session") == sorted(
        [f"{kept}.session", f"{moved}.session"]
    )
    second_log = tmp_path / "second.log"
    proc = start_process(store_args(qwen3_dir, sock_dir, store), second_log)
    try:
        client = await wait_serving(proc, sock, second_log)
        assert await states(client) == {kept: "stored", moved: "stored"}  # the same ids, valid again
        after, replies = await run(client, moved, AFTER, 50 + len(BEFORE))
        assert "restored" in replies[0]
        assert after == expected
        assert (await client.result("session_info", session_id=moved))["evicted_tokens"] > evicted
        await stop(proc, client)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "the session store" in second_log.read_text() and "holds 2 session(s) from before" in second_log.read_text()


# The daemon, with the store's own writes stopping half way once the file named by
# KAKEYA_TEST_BLOCK_WRITES exists, so that a SIGKILL lands in the middle of one.
_BLOCKING_DAEMON = textwrap.dedent(
    """
    import os, sys, threading, types
    from kakeya_mlx import store
    flag, real_write = os.environ["KAKEYA_TEST_BLOCK_WRITES"], os.write

    def write(fd, data):
        if os.path.exists(flag):
            real_write(fd, bytes(data[: max(1, len(data) // 2)]))
            print("blocked", flush=True)
            threading.Event().wait()  # until SIGKILL
        return real_write(fd, data)

    patched = types.ModuleType("os")
    patched.__dict__.update(os.__dict__)
    patched.write = write
    store.os = patched  # the store's writes only
    from kakeya_daemon.server import main
    sys.exit(main(sys.argv[1:]))
    """
)


async def test_sigkill_in_the_middle_of_a_spill_leaves_no_file_that_loads(qwen3_dir, sock_dir, tmp_path):
    store, sock, flag = tmp_path / "store", sock_dir / "kakeya.sock", tmp_path / "block"
    args = store_args(qwen3_dir, sock_dir, store, "--idle-ttl-s", "1", "--idle-sweep-interval-s", "0.1")
    env = dict(os.environ, KAKEYA_TEST_BLOCK_WRITES=str(flag), PYTHONPATH=str(REPO))
    first_log = tmp_path / "first.log"
    with open(first_log, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", _BLOCKING_DAEMON, *args], stdout=subprocess.PIPE, stderr=log, env=env, cwd=REPO
        )
    try:
        client = await wait_serving(proc, sock, first_log)
        sid = (await client.result("create_session"))["session_id"]
        await run(client, sid, BEFORE, 60)
        await client.result("save_session", session_id=sid, name="keep")  # written whole
        expected, _ = await run(client, sid, AFTER, 60 + len(BEFORE))
        flag.write_text("")
        # Idle for idle_ttl_s, the session is spilled: its write stops half way.
        assert await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), HANG_GUARD_S) == b"blocked\n"
        proc.kill()
        assert await asyncio.to_thread(proc.wait, HANG_GUARD_S) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    left = [p.name for p in store.iterdir() if p.name.endswith(".tmp")]
    assert len(left) == 1 and sid in left[0]  # the half-written file is there, under a temporary name
    second_log = tmp_path / "second.log"
    proc = start_process(store_args(qwen3_dir, sock_dir, store), second_log)
    try:
        client = await wait_serving(proc, sock, second_log)
        assert not [p for p in store.iterdir() if p.name.endswith(".tmp")]  # removed at the start
        listing = await client.result("list_sessions")
        assert listing["sessions"] == [] and [s["name"] for s in listing["saved"]] == ["keep"]
        gone = await client.call("session_info", session_id=sid)
        assert gone["error"]["code"] == "not_found"
        fork = (await client.result("restore_session", name="keep"))["session_id"]
        after, _ = await run(client, fork, AFTER, 60 + len(BEFORE))
        assert after == expected  # the other file of the store is whole, and exact
        await stop(proc, client)
    finally:
        if proc.poll() is None:
            proc.kill()


def _full_disk() -> None:
    """In the daemon's process: files may not grow past 2000 bytes (RLIMIT_FSIZE binds root too), as on a full disk."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (2000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


async def test_on_a_full_disk_an_idle_session_stays_in_memory_and_works(qwen3_dir, sock_dir, tmp_path):
    store, sock = tmp_path / "store", sock_dir / "kakeya.sock"
    args = store_args(qwen3_dir, sock_dir, store, "--idle-ttl-s", "0.2", "--idle-sweep-interval-s", "0.05")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(  # the log through a pipe: a file would be bound by the limit too
        [sys.executable, "-m", "kakeya_daemon", *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=REPO, preexec_fn=_full_disk,
    )
    lines: list[bytes] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        (tmp_path / "pipe.log").write_text("(the log goes through a pipe)")
        client = await wait_serving(proc, sock, tmp_path / "pipe.log")
        sid = (await client.result("create_session"))["session_id"]
        twin = (await client.result("create_session"))["session_id"]
        for session in (sid, twin):
            await run(client, session, BEFORE, 70)
        deadline = time.monotonic() + HANG_GUARD_S
        while (await client.result("stats"))["store"]["spill_failures"] < 2:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert await states(client) == {sid: "resident", twin: "resident"}
        after, _ = await run(client, sid, AFTER, 70 + len(BEFORE))
        assert after == (await run(client, twin, AFTER, 70 + len(BEFORE)))[0]
        await stop(proc, client)
    finally:
        if proc.poll() is None:
            proc.kill()
        reader.join(HANG_GUARD_S)
    log = b"".join(lines).decode()
    assert f"session {sid} stays in memory" in log and "no space left" in log
    assert not [p for p in store.iterdir() if p.suffix == ".session"]
