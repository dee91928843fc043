"""Sessions that leave memory and come back, through a real daemon on a real socket.

Spilled by idle_ttl_s and by the memory budget, saved at a stop and adopted at the
next start, saved and restored by name; and the faults: damaged files, files made
for another model, an unwritable store, other users. Every continuation is compared
with the same requests run on a session that never left memory, and crosses the
window before and after (window 24, block 8, sink 4 from make_config).
"""

import asyncio
import logging
import os
import random
import shutil
import stat
import subprocess
import sys
import time

import aiohttp
import pytest

from kakeya_daemon.server import running_daemon
from kakeya_mlx.loader import load_model
from test_daemon import HANG_GUARD_S, RawClient, done_of, endless, make_config, sock_dir  # noqa: F401 (fixtures)
from test_daemon_http import free_port

SPAN = 4 + 24  # sink + window
# Requests that build a history crossing the window several times (the last append is left unprocessed),
# and those that continue it, crossing it again.
BEFORE = [("append", 4 * SPAN + 3), ("generate", 30), ("append", 9)]
AFTER = [("append", 40), ("generate", 30), ("append", 5), ("generate", 20)]


def ids(n: int, seed: int, vocab: int = 640) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, vocab) for _ in range(n)]


async def run(client: RawClient, sid: str, steps: list, seed: int) -> tuple[list[list[int]], list[dict]]:
    """Run `steps` on a session: (each generate's tokens, every reply and done event in order)."""
    streams, replies = [], []
    for i, (what, n) in enumerate(steps):
        if what == "append":
            replies.append(await client.result("append", session_id=sid, tokens=ids(n, seed + i)))
        else:
            frames = await client.generate(session_id=sid, max_tokens=n, temperature=0)  # greedy: exactness
            streams.append([t for f in frames if f.get("event") == "tokens" for t in f["data"]["tokens"]])
            replies.append(done_of(frames))
    return streams, replies


async def reference(loaded, sock_dir, steps: list[tuple[list, int]], **settings) -> list[list[list[int]]]:
    """What each (steps, seed) gives on a session of a daemon that keeps everything in memory."""
    config = make_config("unused", sock_dir / "reference", idle_ttl_s=0.0, eviction="destroy", **settings)
    async with running_daemon(config, loaded=loaded) as d:
        client = await RawClient.connect(d.socket_path)
        out = []
        for session_steps, seed in steps:
            sid = (await client.result("create_session"))["session_id"]
            out.append((await run(client, sid, session_steps, seed))[0])
        await client.close()
    return out


async def states(client: RawClient) -> dict[str, str]:
    return {s["session_id"]: s["state"] for s in (await client.result("list_sessions"))["sessions"]}


async def wait_state(client: RawClient, sid: str, state: str) -> None:
    """Until list_sessions shows `sid` in `state` (the sweeper acts on its own time)."""
    deadline = time.monotonic() + HANG_GUARD_S
    while (await states(client)).get(sid) != state:
        assert time.monotonic() < deadline, f"session {sid} never became {state}"
        await asyncio.sleep(0.02)


def store_files(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".session"))


# The working margin is measured again at each start and spreads by ~15 KB from run to run on
# the test model: half a session's cache must exceed that, so budget tests use a larger window.
BUDGET_SETTINGS = dict(window=120)
# Long enough that no stall between two requests of a test spills a session it is using.
IDLE = dict(idle_ttl_s=1.0, idle_sweep_interval_s=0.05)


async def budget_for_one_session(loaded, sock_dir) -> int:
    """A memory budget with room for one full session cache and a half (see test_daemon's budget test)."""
    config = make_config("unused", sock_dir / "measure", memory_budget_bytes=1 << 30, **BUDGET_SETTINGS)
    async with running_daemon(config, loaded=loaded) as d:
        memory = d.core.stats()["memory"]
        info = d.engine.model_info()
    full = info["kv_bytes_per_token"] * (info["sink"] + info["window"] + info["block"])
    return memory["weights_bytes"] + memory["margin_bytes"] + full + full // 2


# ---- spill instead of destroy ---------------------------------------------------


async def test_an_idle_session_is_spilled_and_its_next_generate_restores_it_exactly(endless, sock_dir):
    steps_after = [("generate", 30), ("append", 40), ("generate", 20)]  # a generate first: its done says
    [expected] = await reference(endless, sock_dir, [(BEFORE + steps_after, 1)])
    config = make_config("unused", sock_dir, **IDLE)
    async with running_daemon(config, loaded=endless) as d:
        client = await RawClient.connect(d.socket_path)
        sid = (await client.result("create_session"))["session_id"]
        before, _ = await run(client, sid, BEFORE, 1)
        info = await client.result("session_info", session_id=sid)
        assert info["state"] == "resident" and info["evicted_tokens"] >= 3 * SPAN and info["pending_tokens"] == 9
        await wait_state(client, sid, "stored")
        [listed] = [s for s in (await client.result("list_sessions"))["sessions"] if s["session_id"] == sid]
        assert listed["history_length"] == info["history_length"] and listed["stored_bytes"] > 0
        directory = d.core.stored.store.directory
        assert store_files(directory) == [f"{sid}.session"]
        assert d.engine.memory()["kv_bytes"] == 0  # its memory is free
        after, replies = await run(client, sid, steps_after, 1 + len(BEFORE))
        restored = replies[0]["restored"]  # the generate's done event
        assert restored["restore_s"] >= 0 and restored["stored_bytes"] == listed["stored_bytes"]
        assert all("restored" not in r for r in replies[1:])
        assert before + after == expected
        assert (await client.result("session_info", session_id=sid))["evicted_tokens"] > info["evicted_tokens"]
        assert store_files(directory) == []  # memory holds the only copy again
        stats = (await client.result("stats"))["store"]
        assert (stats["spilled"], stats["restored"], stats["eviction"]) == (1, 1, "spill")
        await client.close()


async def test_a_restoring_generate_streams_its_log_probabilities_and_says_it_restored(endless, sock_dir):
    [[*_, expected]] = await reference(endless, sock_dir, [(BEFORE + [("generate", 12)], 4)])
    config = make_config("unused", sock_dir, **IDLE)
    async with running_daemon(config, loaded=endless) as d:
        client = await RawClient.connect(d.socket_path)
        sid = (await client.result("create_session"))["session_id"]
        await run(client, sid, BEFORE, 4)
        await wait_state(client, sid, "stored")
        frames = await client.generate(session_id=sid, max_tokens=12, logprobs=True, top_logprobs=2, temperature=0)
        data = [f["data"] for f in frames if f.get("event") == "tokens"]
        assert [t for x in data for t in x["tokens"]] == expected
        assert all(len(x["logprobs"]) == len(x["top_logprobs"]) == len(x["tokens"]) for x in data)
        assert done_of(frames)["restored"]["stored_bytes"] > 0
        await client.close()


async def test_memory_pressure_spills_the_least_recently_used_and_each_comes_back_exactly(endless, sock_dir):
    expected = await reference(endless, sock_dir, [(BEFORE + AFTER, 1), (BEFORE + AFTER, 2)], **BUDGET_SETTINGS)
    budget = await budget_for_one_session(endless, sock_dir)
    config = make_config("unused", sock_dir, memory_budget_bytes=budget, **BUDGET_SETTINGS)
    async with running_daemon(config, loaded=endless) as d:
        client = await RawClient.connect(d.socket_path)
        a = (await client.result("create_session"))["session_id"]
        a_before, _ = await run(client, a, BEFORE, 1)
        b = (await client.result("create_session"))["session_id"]
        b_before, _ = await run(client, b, BEFORE, 2)  # its turn needs a full cache: a leaves for the store
        assert (await states(client)) == {a: "stored", b: "resident"}
        a_after, replies = await run(client, a, AFTER, 1 + len(BEFORE))  # a comes back; b leaves
        assert "restored" in replies[0]
        b_after, replies = await run(client, b, AFTER, 2 + len(BEFORE))
        assert "restored" in replies[0]
        assert [a_before + a_after, b_before + b_after] == expected
        stats = await client.result("stats")
        assert stats["sessions"]["evicted_lru"] >= 3 and stats["store"]["restored"] >= 2
        assert stats["memory"]["held_bytes"] <= budget and stats["rejections"] == {}
        await client.close()


async def test_close_and_cancel_of_a_stored_session_read_nothing_back(endless, sock_dir):
    config = make_config("unused", sock_dir, **IDLE)
    async with running_daemon(config, loaded=endless) as d:
        client = await RawClient.connect(d.socket_path)
        sid = (await client.result("create_session"))["session_id"]
        await run(client, sid, BEFORE, 3)
        await wait_state(client, sid, "stored")
        assert (await client.result("cancel", session_id=sid)) == {"cancelled": False}
        assert (await states(client))[sid] == "stored"
        assert await client.result("close_session", session_id=sid) == {"closed": True}
        assert store_files(d.core.stored.store.directory) == []
        assert (await client.call("session_info", session_id=sid))["error"]["code"] == "not_found"
        assert d.core.counters.store["restored"] == 0
        await client.close()


# ---- a stop saves, the next start restores on first use --------------------------


async def test_a_stop_saves_live_sessions_not_pooled_ones_and_the_next_start_restores_them(endless, sock_dir, caplog):
    caplog.set_level(logging.INFO, logger="kakeya")
    [expected] = await reference(endless, sock_dir, [(BEFORE + AFTER, 4)])
    port = free_port()
    config = make_config("unused", sock_dir, http_port=port)
    async with running_daemon(config, loaded=endless) as d:
        client = await RawClient.connect(d.socket_path)
        sid = (await client.result("create_session"))["session_id"]
        before, _ = await run(client, sid, BEFORE, 4)
        async with aiohttp.ClientSession() as http:  # leaves one pooled HTTP session
            body = {"prompt": "Once upon a time", "max_tokens": 2}
            async with http.post(f"http://127.0.0.1:{port}/v1/completions", json=body) as response:
                assert response.status == 200
        assert d.core.stats()["sessions"]["pooled"] == 1
        await client.close()
        directory = d.core.stored.store.directory
    assert store_files(directory) == [f"{sid}.session"]  # the pooled session was not saved
    assert "saving 1 session(s)" in caplog.text and "saved 1 session(s)" in caplog.text
    async with running_daemon(config, loaded=endless) as d:
        client = await RawClient.connect(d.socket_path)
        assert (await states(client)) == {sid: "stored"}
        after, replies = await run(client, sid, AFTER, 4 + len(BEFORE))
        assert "restored" in replies[0]
        assert before + after == expected
        await client.close()


async def test_with_stop_save_s_0_sessions_end_with_the_daemon(endless, sock_dir, caplog):
    caplog.set_level(logging.INFO, logger="kakeya")
    config = make_config("unused", sock_dir, stop_save_s=0.0)
    async with running_daemon(config, loaded=endless) as d:
        client = await RawClient.connect(d.socket_path)
        await run(client, (await client.result("create_session"))["session_id"], BEFORE, 5)
        await client.close()
        directory = d.core.stored.store.directory
    assert store_files(directory) == []
    assert "1 session(s) end with the daemon (stop_save_s=0)" in caplog.text


# ---- named saves -----------------------------------------------------------------


async def test_save_under_a_name_restore_as_a_fork_and_delete(endless, sock_dir):
    [expected] = await reference(endless, sock_dir, [(BEFORE + AFTER, 6)])
    async with running_daemon(make_config("unused", sock_dir), loaded=endless) as d:
        client = await RawClient.connect(d.socket_path)
        sid = (await client.result("create_session"))["session_id"]
        before, _ = await run(client, sid, BEFORE, 6)
        saved = await client.result("save_session", session_id=sid, name="trip.v1")
        assert saved["name"] == "trip.v1" and saved["stored_bytes"] > 0 and saved["save_s"] >= 0
        original, _ = await run(client, sid, AFTER, 6 + len(BEFORE))  # the original goes on
        listing = await client.result("list_sessions")
        [named] = listing["saved"]
        assert named["name"] == "trip.v1" and named["from_session"] == sid
        assert named["history_length"] == (await client.result("session_info", session_id=sid))["history_length"] - (
            sum(n for what, n in AFTER if what == "append") + sum(len(s) for s in original)
        )
        forks = []
        for _ in range(2):  # each restore is a new session holding the saved conversation
            fork = await client.result("restore_session", name="trip.v1")
            assert fork["session_id"] not in (sid, *forks) and fork["restored"]["stored_bytes"] == saved["stored_bytes"]
            forks.append(fork["session_id"])
            after, _ = await run(client, fork["session_id"], AFTER, 6 + len(BEFORE))
            assert before + after == expected
        assert before + original == expected
        assert await client.result("delete_saved", name="trip.v1") == {"deleted": True}
        for method in ("restore_session", "delete_saved"):
            gone = await client.call(method, name="trip.v1")
            assert gone["error"]["code"] == "not_found" and "'trip.v1'" in gone["error"]["message"]
        bad = await client.call("save_session", session_id=sid, name="../x")
        assert bad["error"]["code"] == "invalid_argument" and "name=" in bad["error"]["message"]
        unknown = await client.call("save_session", session_id="0123456789abcdef", name="x")
        assert unknown["error"]["code"] == "not_found"
        await client.close()


async def test_a_daemon_whose_store_cannot_be_opened_keeps_sessions_in_memory_and_says_why(endless, sock_dir, caplog):
    caplog.set_level(logging.INFO, logger="kakeya")
    blocker = sock_dir / "not-a-directory"
    blocker.write_text("")
    config = make_config("unused", sock_dir, store_dir=str(blocker), **IDLE)
    async with running_daemon(config, loaded=endless) as d:
        client = await RawClient.connect(d.socket_path)
        hello = await client.call("hello", protocol=1)
        assert hello["result"]["limits"]["eviction"] == "destroy"
        sid = (await client.result("create_session"))["session_id"]
        refused = await client.call("save_session", session_id=sid, name="x")
        assert refused["error"]["code"] == "invalid_argument" and str(blocker) in refused["error"]["message"]
        gone = await client.call("session_info", session_id=sid)
        while "result" in gone:
            await asyncio.sleep(0.02)
            gone = await client.call("session_info", session_id=sid)
        assert "idle_ttl_s=1 " in gone["error"]["message"]  # destroyed, as eviction=destroy would
        await client.close()
    assert "no session store" in caplog.text and str(blocker) in caplog.text


# ---- faults --------------------------------------------------------------------------


def _truncate(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x10
    path.write_bytes(bytes(data))


async def test_damaged_files_are_refused_naming_the_session_and_the_rest_restore_exactly(endless, sock_dir):
    expected = await reference(endless, sock_dir, [(BEFORE + AFTER, 10)])
    config = make_config("unused", sock_dir)
    async with running_daemon(config, loaded=endless) as d:
        client = await RawClient.connect(d.socket_path)
        sids = []
        for seed in (10, 11, 12, 13):
            sids.append((await client.result("create_session"))["session_id"])
            before, _ = await run(client, sids[-1], BEFORE, seed)
            if seed == 10:
                kept_before = before
        await client.close()
        directory = d.core.stored.store.directory
    kept, truncated, flipped, replaced = sids
    _truncate(directory / f"{truncated}.session")
    _flip(directory / f"{flipped}.session")
    shutil.copy(directory / f"{kept}.session", directory / f"{replaced}.session")  # checksum intact, wrong session
    async with running_daemon(config, loaded=endless) as d:
        client = await RawClient.connect(d.socket_path)
        assert set((await states(client)).values()) == {"stored"}
        for sid, why in ((truncated, "truncated"), (flipped, "checksum"), (replaced, "renamed or replaced")):
            for method in ("session_info", "append", "generate"):
                params = {"tokens": [5]} if method == "append" else {}
                reply = await client.call(method, session_id=sid, **params)
                assert reply["error"]["code"] == "not_found", reply
                message = reply["error"]["message"]
                assert f"session '{sid}' is stored but cannot be restored" in message and why in message
            assert (await states(client))[sid] == "stored"  # the file stays until removed
        after, _ = await run(client, kept, AFTER, 10 + len(BEFORE))  # nothing else is affected
        assert kept_before + after == expected[0]
        for sid in (truncated, flipped, replaced):
            assert await client.result("close_session", session_id=sid) == {"closed": True}
        assert store_files(directory) == []
        await client.close()


@pytest.mark.parametrize("change", ["model", "dtype", "window"])
async def test_a_session_stored_for_another_model_dtype_or_cache_is_refused_with_the_reason(
    endless, make_model, sock_dir, change
):
    config = make_config("unused", sock_dir)
    async with running_daemon(config, loaded=endless) as d:
        client = await RawClient.connect(d.socket_path)
        sid = (await client.result("create_session"))["session_id"]
        await run(client, sid, BEFORE, 20)
        await client.close()
    loaded, settings, part = endless, {}, change
    if change == "model":
        loaded, part = load_model(make_model("qwen3", seed=1)), "weights"
    elif change == "dtype":
        loaded = load_model(make_model("qwen3"), dtype="float16")
    else:
        settings = {"window": 32}
    async with running_daemon(make_config("unused", sock_dir, **settings), loaded=loaded) as d:
        client = await RawClient.connect(d.socket_path)
        reply = await client.call("generate", session_id=sid, max_tokens=2)
        assert reply["error"]["code"] == "invalid_argument"
        message = reply["error"]["message"]
        assert f"session '{sid}' is stored but cannot be restored by this daemon" in message and f"{part}:" in message
        assert (await states(client)) == {sid: "stored"}
        await client.close()
    async with running_daemon(config, loaded=endless) as d:  # the daemon it was made for restores it
        client = await RawClient.connect(d.socket_path)
        assert "restored" in await client.result("session_info", session_id=sid)
        await client.close()


def _break_store(directory) -> None:
    """Put a file where the store's directory was: every write fails (as root too, unlike permissions)."""
    directory.rename(directory.with_name("store.away"))
    directory.write_text("")


def _mend_store(directory) -> None:
    directory.unlink()
    directory.with_name("store.away").rename(directory)


async def test_an_idle_session_whose_spill_fails_stays_in_memory(endless, sock_dir):
    [expected] = await reference(endless, sock_dir, [(BEFORE + AFTER, 30)])
    config = make_config("unused", sock_dir, **IDLE)
    async with running_daemon(config, loaded=endless) as d:
        client = await RawClient.connect(d.socket_path)
        sid = (await client.result("create_session"))["session_id"]
        before, _ = await run(client, sid, BEFORE, 30)
        directory = d.core.stored.store.directory
        _break_store(directory)
        deadline = time.monotonic() + HANG_GUARD_S
        while (await client.result("stats"))["store"]["spill_failures"] < 2:  # tried, failed, tried again
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        assert (await states(client))[sid] == "resident"
        _mend_store(directory)
        await wait_state(client, sid, "stored")  # once the disk allows, it goes
        after, _ = await run(client, sid, AFTER, 30 + len(BEFORE))
        assert before + after == expected
        await client.close()


async def test_a_session_memory_forces_out_while_the_store_fails_is_lost_and_requests_say_so(endless, sock_dir):
    budget = await budget_for_one_session(endless, sock_dir)
    config = make_config("unused", sock_dir, memory_budget_bytes=budget, **BUDGET_SETTINGS)
    async with running_daemon(config, loaded=endless) as d:
        client = await RawClient.connect(d.socket_path)
        a = (await client.result("create_session"))["session_id"]
        await run(client, a, BEFORE, 40)
        _break_store(d.core.stored.store.directory)
        b = (await client.result("create_session"))["session_id"]
        await run(client, b, BEFORE, 41)
        reply = await client.call("append", session_id=a, tokens=[5])
        assert reply["error"]["code"] == "not_found"
        message = reply["error"]["message"]
        assert f"memory_budget_bytes={budget}" in message and "writing it to the session store failed" in message
        assert "it is lost" in message
        stats = await client.result("stats")
        assert stats["store"]["lost"] == 1 and stats["sessions"]["active"] == 1
        _mend_store(d.core.stored.store.directory)
        await client.close()


async def test_stored_sessions_are_private_and_the_http_front_never_reaches_them(endless, sock_dir):
    port = free_port()
    config = make_config("unused", sock_dir, http_port=port, **IDLE)
    async with running_daemon(config, loaded=endless) as d:
        client = await RawClient.connect(d.socket_path)
        sid = (await client.result("create_session"))["session_id"]
        prompt = "Once upon a time, in a town by the sea"
        await client.result("append", session_id=sid, text=prompt)
        await client.generate(session_id=sid, max_tokens=4)
        await wait_state(client, sid, "stored")
        directory = d.core.stored.store.directory
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        assert stat.S_IMODE((directory / f"{sid}.session").stat().st_mode) == 0o600
        async with aiohttp.ClientSession() as http:
            # The same text over HTTP is a new pooled session: the stored one is neither found nor read.
            body = {"prompt": prompt, "max_tokens": 2}
            async with http.post(f"http://127.0.0.1:{port}/v1/completions", json=body) as response:
                assert (await response.json())["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
            async with http.get(f"http://127.0.0.1:{port}/metrics") as response:
                metrics = await response.text()
            assert sid not in metrics  # counts only
            assert 'kakeya_store_sessions_total{event="spilled"} 1' in metrics and "kakeya_sessions_stored 1" in metrics
        assert (await states(client))[sid] == "stored" and d.core.counters.store["restored"] == 0
        if os.getuid() == 0:  # another user cannot even list the ids (file names) in the store
            probe = "import os, sys; os.setgid(65534); os.setuid(65534); os.listdir(sys.argv[1])"
            result = subprocess.run([sys.executable, "-c", probe, str(directory)], capture_output=True, text=True)
            assert result.returncode != 0 and "PermissionError" in result.stderr
        await client.close()


async def test_both_python_clients_save_restore_and_see_a_restore(endless, sock_dir):
    from kakeya_client import AsyncClient, Client

    config = make_config("unused", sock_dir, **IDLE)
    async with running_daemon(config, loaded=endless) as d:
        async with AsyncClient(d.socket_path) as client:
            session = await client.create_session()
            await session.append(tokens=ids(2 * SPAN, 90))
            saved = await session.save("story")
            assert saved["name"] == "story" and [s["name"] for s in await client.list_saved()] == ["story"]
            fork = await client.restore_session("story")
            assert (await fork.info())["history_length"] == 2 * SPAN
            raw = await RawClient.connect(d.socket_path)
            await wait_state(raw, session.id, "stored")
            await raw.close()
            _, done = await session.complete(max_tokens=3)
            assert done.restored is not None and done.restored["stored_bytes"] > 0

        def blocking() -> list:
            with Client(d.socket_path) as sync:
                sync.session(session.id).save("story.2")
                restored = sync.restore_session("story.2")
                sync.delete_saved("story")
                return [restored.info()["state"], [s["name"] for s in sync.list_saved()]]

        assert await asyncio.to_thread(blocking) == ["resident", ["story.2"]]
