"""A seeded, bounded storm of generate, cancel, disconnect and close on both fronts at once.

At the end nothing may be left behind: no lease held, no generation slot taken or
queued, no session the engine holds that the registry does not (or the reverse),
every turn the core opened ended, and every stream a client saw ended exactly once.
"""

import asyncio
import json
import random

import aiohttp
import pytest

from kakeya_daemon.server import running_daemon
from test_daemon import RawClient, endless, make_config, sock_dir  # noqa: F401  (fixtures)
from test_daemon_http import free_port

SEED = 20240611
WORKERS = 3  # of each front
ACTIONS = 12  # per worker
PROMPTS = ["Once upon a time", "The sea was calm", "1 2 3 4 5", "Hello there"]
OK_ERRORS = {"busy", "not_found", "resource_exhausted"}


class Tally:
    """What the clients saw: each stream's terminal frames, counted."""

    def __init__(self):
        self.socket_endings: list[int] = []  # per finished socket generate: done events + error replies
        self.http_endings: list[tuple[int, int]] = []  # per finished HTTP stream: (finish or error events, [DONE]s)
        self.errors: list[str] = []


async def socket_worker(path, rng: random.Random, tally: Tally) -> None:
    client = await RawClient.connect(path)
    sid = None
    for _ in range(ACTIONS):
        action = rng.choice(["generate", "generate", "cancel_other", "close"])
        if sid is None or action == "close":
            if sid is not None:
                reply = await client.call("close_session", session_id=sid)
                if "error" in reply:
                    tally.errors.append(reply["error"]["code"])
            created = await client.call("create_session")
            if "error" in created:
                tally.errors.append(created["error"]["code"])
                sid = None
                continue
            sid = created["result"]["session_id"]
        if action == "cancel_other":
            sessions = (await client.result("list_sessions"))["sessions"]
            if sessions:
                reply = await client.call("cancel", session_id=rng.choice(sessions)["session_id"])
                if "error" in reply:
                    tally.errors.append(reply["error"]["code"])
            continue
        appended = await client.call("append", session_id=sid, tokens=[rng.randrange(3, 600) for _ in range(5)])
        if "error" in appended:
            tally.errors.append(appended["error"]["code"])
            sid = None if appended["error"]["code"] == "not_found" else sid
            continue
        gen = client.request("generate", session_id=sid, max_tokens=rng.randrange(1, 40))
        await client.send(gen)
        ending = rng.choice(["read", "cancel", "disconnect"])
        first = await client.next_frame(gen["id"])
        frames = [first]
        if "error" not in first and first.get("event") != "done":
            if ending == "disconnect":
                await client.close()
                client = await RawClient.connect(path)
                continue  # the daemon ends it; no client sees its end
            if ending == "cancel":
                await client.send(client.request("cancel", request_id=gen["id"]))
            frames += await client.events(gen["id"])
        endings = sum(1 for f in frames if "error" in f or f.get("event") == "done")
        tally.socket_endings.append(endings)
        for f in frames:
            if "error" in f:
                tally.errors.append(f["error"]["code"])
    if sid is not None:
        await client.call("close_session", session_id=sid)
    await client.close()


async def http_worker(url, rng: random.Random, tally: Tally) -> None:
    async with aiohttp.ClientSession() as http:
        for _ in range(ACTIONS):
            body = {"prompt": rng.choice(PROMPTS), "max_tokens": rng.randrange(1, 40), "temperature": 0}
            if rng.random() < 0.3:
                async with http.post(url + "/v1/completions", json=body) as r:
                    reply = await r.json()
                    if r.status != 200:
                        tally.errors.append(reply["error"]["code"])
                continue
            body["stream"] = True
            leave_early = rng.random() < 0.3
            async with http.post(url + "/v1/completions", json=body) as r:
                if r.status != 200:
                    tally.errors.append((await r.json())["error"]["code"])
                    continue
                finishes = dones = 0
                async for line in r.content:
                    if not line.startswith(b"data: "):
                        continue
                    data = line[6:].strip()
                    if data == b"[DONE]":
                        dones += 1
                        continue
                    event = json.loads(data)
                    if "error" in event:
                        finishes += 1
                        tally.errors.append(event["error"]["code"])
                    elif event["choices"] and event["choices"][0]["finish_reason"]:
                        finishes += 1
                    if leave_early:
                        break  # the connection goes; the daemon ends the turn
                if not leave_early:
                    tally.http_endings.append((finishes, dones))


@pytest.mark.parametrize("seed", [SEED])
async def test_a_storm_on_both_fronts_leaves_nothing_behind(qwen3_dir, sock_dir, endless, seed):
    config = make_config(
        qwen3_dir,
        sock_dir,
        max_sessions=6,
        max_concurrent_generations=2,
        max_queue_wait_s=600,
        max_new_tokens=64,
        http_port=free_port(),
        http_max_sessions=3,
    )
    rng = random.Random(seed)
    tally = Tally()
    async with running_daemon(config, loaded=endless) as d:
        url = d.http.urls[0]
        workers = [socket_worker(d.socket_path, random.Random(rng.random()), tally) for _ in range(WORKERS)]
        workers += [http_worker(url, random.Random(rng.random()), tally) for _ in range(WORKERS)]
        await asyncio.gather(*workers)
        core = d.core
        while core.turns() or core.counters.connections:  # disconnected streams end on the daemon's side
            await asyncio.sleep(0.01)
        assert core.registry.leases_held() == 0
        assert core.admission.active == 0 and core.admission.queued == 0
        assert core.counters.turns_opened == core.counters.turns_ended > 0
        engine_ids = {s["session_id"] for s in d.engine.list_sessions()}
        assert engine_ids == set(core.registry.entries)
        assert all(e.pooled for e in core.registry.entries.values())  # the socket workers closed theirs
        assert not any(s["generating"] for s in d.engine.list_sessions())
    assert tally.socket_endings and all(n == 1 for n in tally.socket_endings)
    assert tally.http_endings and all(pair == (1, 1) for pair in tally.http_endings)
    assert set(tally.errors) <= OK_ERRORS | {"cancelled"}, tally.errors
