"""The daemon exits cleanly every time.

MLX's compile cache is thread-local and its entries hold Python objects. The
compute thread's C++ thread-locals are destroyed after Python's join() returns;
if the cache still held entries then and the interpreter was already finalizing,
taking the GIL unwound the thread inside a destructor and the process aborted
("terminate called without an active exception", exit -6) about once in twenty
exits. Each cycle here starts a real daemon process, generates (which fills the
compute thread's compile cache), stops it and checks it exited with 0.

The race is tightest in a script that stops an engine and exits at once; without
the fix about one such run in 30 aborted, so its 40 runs catch a regression three
times in four, and never fail while the fix holds.
"""

import asyncio
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from test_daemon_faults import HANG_GUARD_S, process_args, start_process, wait_serving

CYCLES = 50
ENGINE_RUNS = 40
AT_ONCE = 4


async def _cycle(model_dir: Path, index: int) -> tuple[int, str]:
    with tempfile.TemporaryDirectory(prefix="kk-", dir="/tmp") as tmp:
        sock_dir, log_path = Path(tmp), Path(tmp) / "daemon.log"
        proc = start_process(process_args(model_dir, sock_dir), log_path)
        try:
            client = await wait_serving(proc, sock_dir / "kakeya.sock", log_path)
            sid = (await client.result("create_session"))["session_id"]
            await client.result("append", session_id=sid, text="The quick brown fox")
            frames = await client.generate(session_id=sid, max_tokens=8, temperature=0)
            assert frames[-1]["event"] == "done", frames[-1]
            if index % 2:
                proc.send_signal(signal.SIGTERM)
            else:
                await client.call("shutdown")
            client.writer.close()
            code = await asyncio.to_thread(proc.wait, HANG_GUARD_S)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        return code, log_path.read_text()


async def test_fifty_start_stop_cycles_all_exit_0(qwen3_dir):
    gate = asyncio.Semaphore(AT_ONCE)

    async def one(i: int):
        async with gate:
            return await _cycle(qwen3_dir, i)

    results = await asyncio.gather(*(one(i) for i in range(CYCLES)))
    failed = [(i, code, log[-600:]) for i, (code, log) in enumerate(results) if code != 0]
    assert not failed, failed
    assert not any("terminate called" in log for _, log in results)


ENGINE_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    from kakeya_mlx.engine import Engine, EngineConfig
    from kakeya_mlx.loader import load_model

    async def main():
        engine = Engine(load_model(sys.argv[1]), EngineConfig(block=8))
        await engine.start()
        sid = await engine.create_session()
        await engine.append(sid, text="hello")
        events = [e async for e in engine.generate(sid, max_tokens=3)]
        await engine.stop()
        return events[-1]

    assert asyncio.run(main()).generated_tokens >= 1
    """
)


async def test_engine_processes_that_stop_and_exit_at_once_all_exit_0(qwen3_dir):
    gate = asyncio.Semaphore(AT_ONCE)

    async def one():
        async with gate:
            return await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-c", ENGINE_SCRIPT, str(qwen3_dir)],
                capture_output=True,
                text=True,
                timeout=HANG_GUARD_S,
            )

    runs = await asyncio.gather(*(one() for _ in range(ENGINE_RUNS)))
    failed = [(r.returncode, r.stderr[-400:]) for r in runs if r.returncode != 0]
    assert not failed, failed
