"""Seeded request fuzzing of a real daemon over its socket: plausible requests with broken
values mixed in, on several connections at once, some closed with work in flight.

What SPEC.md promises for every such request: exactly one reply (a generate: events
ending with `done`), an error code from section 8 with a one-line message, never
`internal`, never an id-nil error for a well-framed map with a readable id, and the
connection stays open; afterwards the daemon still serves.
"""

import asyncio
import contextlib
import random
from collections import Counter

import msgpack
import pytest

from kakeya_daemon.server import running_daemon
from kakeya_protocol import FrameDecoder, encode_frame, parse_server_message

from test_daemon import HANG_GUARD_S, config, sock_dir  # noqa: F401 (fixtures)

CODES = {"not_found", "invalid_argument", "busy", "resource_exhausted", "protocol_error"}
METHODS = [
    "hello", "create_session", "append", "generate", "cancel", "session_info", "close_session",
    "list_sessions", "save_session", "restore_session", "delete_saved", "tokenize", "detokenize", "stats",
]  # fmt: skip
MAX_NEW_TOKENS = 24


def weird(rng: random.Random, depth: int = 0):
    """A value of any protocol type (and a few that are none), often out of range."""
    kind = rng.randrange(14)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, -1, 2**31, 2**53 + 1, 2**63 - 1, -(2**63), 2**64 - 1])
    if kind == 3:
        return rng.choice([-0.0, 1.5, float("nan"), float("inf"), 1e308])
    if kind == 4:
        return "".join(chr(rng.randrange(0x20, 0x3000)) for _ in range(rng.randrange(20)))
    if kind == 5:
        return "x" * rng.choice([0, 65, 5000])
    if kind == 6:
        return b"\x00\xff"
    if kind == 7:
        return msgpack.ExtType(rng.randrange(100), b"abc")
    if kind == 8 and depth < 3:
        return [weird(rng, depth + 1) for _ in range(rng.randrange(4))]
    if kind == 9 and depth < 3:
        return {str(rng.randrange(5)): weird(rng, depth + 1) for _ in range(rng.randrange(3))}
    if kind == 10:
        nested: list = []
        for _ in range(rng.choice([10, 400])):
            nested = [nested]
        return nested
    if kind == 11:
        return [rng.randrange(300) for _ in range(rng.randrange(1, 10))]
    if kind == 12:
        return rng.randrange(-5, 50)
    return "hello there"


class Connection:
    """One raw connection: sends requests, checks every frame that comes back against SPEC."""

    def __init__(self, rng: random.Random, sessions: list, saves: list, problems: list, seen: Counter):
        self.rng, self.sessions, self.saves, self.problems, self.seen = rng, sessions, saves, problems, seen
        self.next_id = 1
        self.pending: dict[int, str] = {}
        self.closing = False

    async def open(self, path: str) -> None:
        self.reader, self.writer = await asyncio.open_unix_connection(path)
        self.reading = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        decoder = FrameDecoder()
        try:
            while data := await self.reader.read(1 << 16):
                for frame in decoder.feed(data):
                    parse_server_message(frame)  # a frame of a valid shape
                    self._check(frame)
        except ConnectionResetError:
            pass
        except Exception as exc:  # a frame the codec refuses
            self.problems.append(f"unreadable frame: {exc!r}")
            return
        if not self.closing:
            self.problems.append(f"connection closed with {sorted(self.pending.values())} in flight")

    def _check(self, frame: dict) -> None:
        rid = frame.get("id")
        if rid not in self.pending:
            self.problems.append(f"a frame for id {rid!r}, which is not in flight: {str(frame)[:300]}")
            return
        method = self.pending[rid]
        if "error" in frame:
            error = frame["error"]
            message = error.get("message", "")
            if error.get("code") not in CODES or "\n" in message or len(message) > 600:
                self.problems.append(f"{method}: {str(error)[:300]}")
            self.seen[error.get("code")] += 1
            del self.pending[rid]
        elif "event" in frame:
            if frame["event"] == "done":
                if frame["data"]["stop_reason"] == "error":
                    self.problems.append(f"generate failed: {frame['data']}")
                self.seen[frame["data"]["stop_reason"]] += 1
                del self.pending[rid]
        else:
            result = frame["result"]
            if method in ("create_session", "restore_session"):
                self.sessions.append(result["session_id"])
            elif method == "save_session":
                self.saves.append(result["name"])
            self.seen["result"] += 1
            del self.pending[rid]

    async def settled(self) -> None:
        """Wait until every request sent has had its answer."""
        async with asyncio.timeout(HANG_GUARD_S):
            while self.pending and not self.reading.done():
                await asyncio.sleep(0.01)

    async def close(self) -> None:
        self.closing = True
        self.writer.close()
        self.reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.reading

    def send(self, method: str, params) -> None:
        rid, self.next_id = self.next_id, self.next_id + 1
        self.pending[rid] = method
        self.writer.write(encode_frame({"id": rid, "method": method, "params": params}))

    def plausible(self) -> tuple[str, object]:
        """A request that is often valid; one value in several is broken."""
        rng = self.rng
        method = rng.choice(METHODS + ["append", "generate", "generate", "create_session", "no_such_method"])
        sid = rng.choice(self.sessions) if self.sessions and rng.random() < 0.9 else weird(rng)
        params: dict = {}
        if method == "hello":
            params = {"protocol": rng.choice([1, 1, 2])}
        elif method == "append":
            kind = rng.choice(["tokens", "text", "messages"])
            content = {
                "tokens": [rng.randrange(200) for _ in range(rng.randrange(1, 40))],
                "text": "Some words " * rng.randrange(1, 20),
                "messages": [{"role": rng.choice(["user", "assistant", "system"]), "content": "hi " * rng.randrange(5)}],
            }[kind]
            params = {"session_id": sid, kind: content}
        elif method == "generate":
            params = {"session_id": sid, "max_tokens": rng.choice([1, 3, 8, MAX_NEW_TOKENS])}
            options = {
                "temperature": lambda: rng.choice([0, 0.7, 2.0]),
                "seed": lambda: rng.randrange(100),
                "stop": lambda: [rng.choice(["a", "the", "\n", "é"])],
                "speculative": lambda: rng.choice(["off", "auto", "prompt_lookup"]),
                "logprobs": lambda: True,
                "constraint": lambda: rng.choice([{"type": "json_object"}, {"type": "regex", "pattern": "[a-c]{1,5}"}]),
                "repetition_penalty": lambda: 1.3,
            }
            for name, value in options.items():
                if rng.random() < 0.2:
                    params[name] = value()
        elif method == "cancel":
            params = {"request_id": rng.choice(list(self.pending))} if self.pending and rng.random() < 0.5 else {"session_id": sid}
        elif method in ("session_info", "close_session"):
            params = {"session_id": sid}
        elif method == "save_session":
            params = {"session_id": sid, "name": rng.choice(["s1", "s2", "bad name"])}
        elif method in ("restore_session", "delete_saved"):
            params = {"name": rng.choice(self.saves + ["nope", "s1"])}
        elif method == "tokenize":
            params = {"text": rng.choice(["hi", "", "é" * 50])}
        elif method == "detokenize":
            params = {"tokens": [rng.randrange(400) for _ in range(rng.randrange(10))]}
        if params and rng.random() < 0.2:
            params[rng.choice(list(params))] = weird(rng)
        if rng.random() < 0.05:
            params["unknown_key"] = 1
        if rng.random() < 0.03:
            params = weird(rng)
        return method, params


async def _client(path: str, seed: int, sessions: list, saves: list, problems: list, seen: Counter) -> None:
    rng = random.Random(seed)
    for _ in range(3):  # connections one after another
        conn = Connection(rng, sessions, saves, problems, seen)
        await conn.open(path)
        conn.send("hello", {"protocol": 1})
        for _ in range(rng.randrange(20, 60)):
            conn.send(*conn.plausible())
            await asyncio.sleep(rng.choice([0, 0, 0.001, 0.01]))
        if rng.random() > 0.3:  # else gone with work in flight: the daemon drops it
            await conn.settled()
        await conn.close()


@pytest.mark.parametrize("seed", [1, 2])
async def test_every_fuzzed_request_gets_one_answer_of_the_specified_shape(config, loaded_qwen3, seed):
    cfg = config(max_new_tokens=MAX_NEW_TOKENS, max_requests_per_connection=64)
    async with running_daemon(cfg, loaded=loaded_qwen3) as d:
        sessions: list = []
        saves: list = []
        problems: list = []
        seen: Counter = Counter()
        clients = (_client(d.socket_path, 100 * seed + i, sessions, saves, problems, seen) for i in range(4))
        await asyncio.gather(*clients)
        assert problems == []
        assert seen["result"] and seen["invalid_argument"]  # valid and broken requests both came
        # Afterwards the daemon still serves: a new session generates.
        check = Connection(random.Random(0), [], [], problems, Counter())
        await check.open(d.socket_path)
        check.send("hello", {"protocol": 1})
        check.send("create_session", {})
        await check.settled()
        check.send("append", {"session_id": check.sessions[0], "text": "Once upon a time"})
        await check.settled()  # a generate sees an append once its reply has come
        check.send("generate", {"session_id": check.sessions[0], "max_tokens": 3, "temperature": 0})
        await check.settled()
        await check.close()
        assert problems == [] and check.seen["max_tokens"] + check.seen["eos"] == 1
