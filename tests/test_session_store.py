"""The session store on disk: faults refused clearly, writes atomic, the directory private, the cap kept.

Stored sessions are real ones, saved by an engine on a tiny seeded model.
"""

import json
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from kakeya_mlx import store as session_store
from kakeya_mlx.engine import Engine, EngineConfig
from kakeya_mlx.errors import (
    CorruptSessionError,
    FingerprintMismatchError,
    InvalidArgumentError,
    NotFoundError,
    StoreDirectoryError,
    StoreWriteError,
)
from kakeya_mlx.loader import load_model
from kakeya_mlx.store import SessionStore

CONFIG = EngineConfig(sink=4, window=20, block=8)
REPO = Path(__file__).resolve().parents[1]
NOBODY = 65534


@pytest.fixture
async def engine(loaded_qwen3, tmp_path):
    engine = Engine(loaded_qwen3, CONFIG, store=SessionStore(tmp_path / "store"))
    await engine.start()
    yield engine
    await engine.stop()


async def _stored(engine: Engine, name: str, text: str = "Once upon a time, there was a little town by the sea.") -> str:
    sid = await engine.create_session()
    await engine.append(sid, text=text * 3)
    [e async for e in engine.generate(sid, max_tokens=6)]
    await engine.save_session(sid, name=name, extra={"name": name})
    return sid


async def _greedy(engine: Engine, sid: str) -> list[int]:
    await engine.append(sid, text=" And then?")
    return [e async for e in engine.generate(sid, max_tokens=12)][-1].token_ids


def _flip_bit(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage",
    ["empty", "magic-only", "half", "last-byte-missing", "bit-in-header", "bit-in-keys", "bit-in-digest", "appended"],
)
async def test_a_damaged_file_is_refused_naming_it_and_nothing_else_is_affected(engine, damage):
    await _stored(engine, "victim")
    other = await _stored(engine, "bystander", text="The weather today will be cloudy.")
    path = engine.store.path("victim")
    size = path.stat().st_size
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "magic-only":
        path.write_bytes(session_store.MAGIC)
    elif damage == "half":
        os.truncate(path, size // 2)
    elif damage == "last-byte-missing":
        os.truncate(path, size - 1)
    elif damage == "bit-in-header":
        _flip_bit(path, len(session_store.MAGIC) + 40)
    elif damage == "bit-in-keys":
        _flip_bit(path, size // 2)
    elif damage == "bit-in-digest":
        _flip_bit(path, size - 3)
    elif damage == "appended":
        path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(CorruptSessionError, match="'victim'"):
        await engine.restore_session("victim", fork=True)
    assert {s.name for s in engine.store.sessions()} == {"victim", "bystander"}
    expected = await _greedy(engine, other)
    await engine.close_session(other)
    restored = await engine.restore_session("bystander")
    assert restored.extra == {"name": "bystander"}
    # The bystander continues from where it was saved, as the original did.
    await engine.close_session(restored.session_id)
    again = await engine.restore_session("bystander")
    assert await _greedy(engine, again.session_id) == expected


def _repack(store: SessionStore, name: str, change) -> None:
    """Rewrite a stored file with `change` applied and a valid checksum: damage that looks valid."""
    import mlx.core as mx

    state = session_store.unpack(name, store.read(name))
    change(state, mx)
    data = session_store.pack(state.name, state.fingerprint, state.session, state.arrays, state.extra)
    store.write(name, data)


def _set_history_token(state, mx):
    history = state.arrays["history"].tolist()
    history[1] = (history[1] + 1) % 600  # a sink token: cached, so checkable
    state.arrays["history"] = mx.array(history, dtype=mx.uint32)


TAMPERINGS = {
    "history-edited": (_set_history_token, "cached tokens are not the history"),
    "layer-dropped": (lambda s, mx: s.arrays.pop("main/layers.1.values"), "layer 1"),
    "committed-edited": (lambda s, mx: s.session["groups"]["main"].update(committed=3), "INV-2|committed"),
    "logits-doubled": (
        lambda s, mx: s.arrays.update({"main/logits": mx.concatenate([s.arrays["main/logits"]] * 2)}),
        "logits of shape",
    ),
    "head-dim-cut": (
        lambda s, mx: s.arrays.update({k: v[..., :8] for k, v in s.arrays.items() if "layers." in k}),
        "heads of 8",
    ),
    "boundary-logits-cut": (
        lambda s, mx: s.arrays.update({"main/boundary_logits": s.arrays["main/logits"][:, :100]}),
        "logits over 100 tokens",
    ),
    "extra-array": (lambda s, mx: s.arrays.update({"main/secret": mx.zeros((3,))}), "unexpected arrays"),
    "unknown-group": (lambda s, mx: s.session["groups"].update(draft={}), "cache groups"),
    "values-dtype": (
        lambda s, mx: s.arrays.update({k: v.astype(mx.float16) for k, v in s.arrays.items() if k.endswith(".values")}),
        "float16",
    ),
}


@pytest.mark.parametrize("tampering", sorted(TAMPERINGS))
async def test_valid_looking_but_inconsistent_contents_are_refused(engine, tampering):
    await _stored(engine, "target")
    change, reason = TAMPERINGS[tampering]
    _repack(engine.store, "target", change)
    with pytest.raises(CorruptSessionError, match=f"'target' is inconsistent: .*({reason})"):
        await engine.restore_session("target", fork=True)


async def test_a_file_renamed_or_copied_to_another_name_is_refused(engine):
    await _stored(engine, "alice")
    await _stored(engine, "bob", text="Computers follow instructions one step at a time.")
    engine.store.path("alice").write_bytes(engine.store.path("bob").read_bytes())
    with pytest.raises(CorruptSessionError, match="'alice' holds session 'bob'"):
        await engine.restore_session("alice", fork=True)


@pytest.mark.parametrize(
    "other, parts",
    [
        ({"seed": 1}, {"weights"}),
        ({"dtype": "bfloat16"}, {"dtype", "kv_dtype"}),
        ({"sink": 2}, {"sink"}),
        ({"window": 28}, {"window"}),
        ({"block": 4}, {"block"}),
    ],
    ids=["model-seed", "dtype", "sink", "window", "block"],
)
async def test_a_fingerprint_mismatch_is_refused_with_the_part_that_differs(
    engine, make_model, qwen3_dir, tmp_path, other, parts
):
    sid = await _stored(engine, "mine")
    if "seed" in other:
        loaded, config = load_model(make_model("qwen3", seed=other["seed"])), CONFIG
    elif "dtype" in other:
        loaded, config = load_model(qwen3_dir, dtype=other["dtype"]), CONFIG
    else:
        loaded = engine.loaded
        config = EngineConfig(**{**dict(sink=4, window=20, block=8), **other})
    elsewhere = Engine(loaded, config, store=SessionStore(tmp_path / "store"))
    await elsewhere.start()
    try:
        with pytest.raises(FingerprintMismatchError) as refused:
            await elsewhere.restore_session("mine")
    finally:
        await elsewhere.stop()
    assert set(refused.value.differences) == parts
    for part in parts:
        assert part in str(refused.value) and "'mine'" in str(refused.value)
    assert not elsewhere.has_session(sid)


def test_the_weights_fingerprint_reads_headers_and_samples_not_the_whole_file(make_model, tmp_path):
    """Copying a model keeps its fingerprint (no mtimes); changing one weight's first bytes changes it."""
    original = make_model("qwen3")
    copy = Path(shutil.copytree(original, tmp_path / "copy"))
    os.utime(copy / "model.safetensors", (1, 1))
    assert session_store.model_fingerprint(copy) == session_store.model_fingerprint(original)
    (copy / "tokenizer_config.json").write_text((copy / "tokenizer_config.json").read_text() + " ")
    assert session_store.model_fingerprint(copy)["tokenizer"] != session_store.model_fingerprint(original)["tokenizer"]
    header_len = int.from_bytes((copy / "model.safetensors").read_bytes()[:8], "little")
    _flip_bit(copy / "model.safetensors", 8 + header_len + 1)
    changed = session_store.model_fingerprint(copy)
    assert changed["weights"] != session_store.model_fingerprint(original)["weights"]
    assert changed["config"] == session_store.model_fingerprint(original)["config"]


_KILL_CHILD = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from kakeya_mlx import platform, store as s

    directory, name, point = sys.argv[1:]
    store = s.SessionStore(Path(directory))
    state = s.unpack(name, store.read(name))
    data = s.pack(name, state.fingerprint, state.session, state.arrays, {"writer": "killed child"})

    def block():
        print("blocked", flush=True)
        sys.stdin.readline()  # until SIGKILL

    real_write, real_sync, syncs = os.write, platform.sync_file, []
    def write(fd, chunk):
        written = real_write(fd, chunk[: max(1, len(chunk) // 2)])
        if point == "write":
            block()
        return written
    def sync_file(fd):
        syncs.append(fd)
        if (point, len(syncs)) in (("file-sync", 1), ("dir-sync", 2)):
            block()
        real_sync(fd)
    os.write, platform.sync_file = write, sync_file
    store.write(name, data)
    print("finished", flush=True)
    """
)


@pytest.mark.parametrize(
    "point, survivor",
    [("write", "the earlier file"), ("file-sync", "the earlier file"), ("dir-sync", "the new file")],
)
async def test_sigkill_mid_write_never_leaves_a_file_that_loads(engine, point, survivor):
    sid = await _stored(engine, "s")
    expected = await _greedy(engine, sid)
    child = subprocess.Popen(
        [sys.executable, "-c", _KILL_CHILD, str(engine.store.directory), "s", point],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
    )
    try:
        line = child.stdout.readline()
        assert line == "blocked\n", child.stderr.read()
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    temporaries = [p for p in engine.store.directory.iterdir() if p.name.startswith(".")]
    assert len(temporaries) == (0 if point == "dir-sync" else 1)

    reopened = SessionStore(engine.store.directory)  # removes what the dead writer left
    assert [p.name for p in reopened.directory.iterdir()] == ["s.session"]
    await engine.close_session(sid)
    restored = await engine.restore_session("s")
    writer = {"name": "s"} if survivor == "the earlier file" else {"writer": "killed child"}
    assert restored.extra == writer
    assert await _greedy(engine, restored.session_id) == expected


async def test_a_session_larger_than_the_cap_is_refused_and_the_store_untouched(engine, tmp_path):
    await _stored(engine, "kept")
    size = engine.store.path("kept").stat().st_size
    engine.store = SessionStore(engine.store.directory, max_bytes=size // 4)
    sid = await engine.create_session()
    await engine.append(sid, text="Once upon a time, there was a little town by the sea." * 3)
    await engine.prefill(sid)
    with pytest.raises(StoreWriteError, match=r"'big' takes \d+ bytes, more than .* max_bytes=") as refused:
        await engine.save_session(sid, name="big")
    assert refused.value.code == "resource_exhausted"
    assert [s.name for s in engine.store.sessions()] == ["kept"]
    assert len(await _greedy(engine, sid)) == 12  # the session is still in memory, and works


async def test_the_cap_evicts_the_least_recently_used_sessions(engine):
    for name in ("a", "b", "c"):
        await _stored(engine, name)
    sizes = {s.name: s.nbytes for s in engine.store.sessions()}
    now = engine.store.path("a").stat().st_mtime
    for age, name in enumerate(("c", "b", "a")):  # a is the oldest, then b, then c
        os.utime(engine.store.path(name), (now - 100 * (age + 1), now - 100 * (age + 1)))
    engine.store.read("a")  # a reading is a use: now b is the oldest
    engine.store = SessionStore(engine.store.directory, max_bytes=sizes["a"] + sizes["c"] + sizes["b"] // 2)
    sid = await engine.create_session()
    await engine.append(sid, text="Once upon a time, there was a little town by the sea." * 3)
    [e async for e in engine.generate(sid, max_tokens=6)]
    saved = await engine.save_session(sid, name="d")
    assert saved.evicted == ("b", "c")
    assert sorted(s.name for s in engine.store.sessions()) == ["a", "d"]
    assert engine.store.total_bytes() <= engine.store.max_bytes


async def test_a_full_disk_is_a_typed_error_and_changes_nothing(engine):
    """RLIMIT_FSIZE makes the write fail part-way, as a full disk does (it binds root too)."""
    sid = await _stored(engine, "s")
    before = engine.store.path("s").read_bytes()
    await engine.append(sid, text=" More text to make the file differ.")
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1000, old_limit[1]))
    try:
        with pytest.raises(StoreWriteError, match="'s' .*no space left") as refused:
            await engine.save_session(sid, name="s")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    assert "nothing was changed" in str(refused.value)
    assert engine.store.path("s").read_bytes() == before
    assert [p.name for p in engine.store.directory.iterdir()] == ["s.session"]
    assert len(await _greedy(engine, sid)) == 12


_READ_ONLY_CHILD = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    import mlx.core as mx
    from kakeya_mlx import store as s
    from kakeya_mlx.errors import StoreWriteError

    if os.geteuid() == 0:  # root ignores directory permissions: write as nobody (imports are done)
        os.setgid(65534)
        os.setuid(65534)
    store = s.SessionStore(Path(sys.argv[1]))
    store.directory.chmod(0o500)
    data = s.pack("x", {}, {}, {"history": mx.zeros((4,), mx.uint32)}, {})
    try:
        store.write("x", data)
        print(json.dumps({"written": True}))
    except StoreWriteError as exc:
        print(json.dumps({"error": type(exc).__name__, "message": exc.message, "left": os.listdir(store.directory)}))
    """
)


def test_an_unwritable_directory_is_a_typed_error():
    """Root ignores directory permissions, so as root the writer turns itself into nobody."""
    parent = Path(tempfile.mkdtemp())
    as_root = os.geteuid() == 0
    try:
        if as_root:
            os.chown(parent, NOBODY, NOBODY)
        result = subprocess.run(
            [sys.executable, "-c", _READ_ONLY_CHILD, str(parent / "store")],
            capture_output=True, text=True, cwd=REPO,
        )
        assert result.returncode == 0, result.stderr
        outcome = json.loads(result.stdout)
    finally:
        if (parent / "store").exists():
            (parent / "store").chmod(0o700)
        shutil.rmtree(parent)
    assert outcome["error"] == "StoreWriteError"
    assert "'x'" in outcome["message"] and "not writable" in outcome["message"]
    assert outcome["left"] == []


async def test_files_are_0600_in_a_0700_directory_whatever_the_umask(loaded_qwen3, tmp_path):
    old = os.umask(0)
    try:
        engine = Engine(loaded_qwen3, CONFIG, store=SessionStore(tmp_path / "deep" / "store"))
        await engine.start()
        try:
            await _stored(engine, "s")
        finally:
            await engine.stop()
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "deep" / "store").stat().st_mode) == 0o700
    assert stat.S_IMODE(engine.store.path("s").stat().st_mode) == 0o600


def test_an_existing_directory_open_to_others_is_refused(tmp_path):
    for mode in (0o755, 0o770, 0o701):
        directory = tmp_path / f"store-{mode:o}"
        directory.mkdir()
        directory.chmod(mode)
        with pytest.raises(StoreDirectoryError, match=f"open to other users \\(mode {mode:o}\\).*chmod 700"):
            SessionStore(directory)
    (tmp_path / "a-file").write_text("")
    with pytest.raises(StoreDirectoryError, match="not a directory"):
        SessionStore(tmp_path / "a-file")


def test_a_directory_owned_by_someone_else_is_refused(tmp_path):
    if os.geteuid() == 0:
        directory = tmp_path / "theirs"
        directory.mkdir(mode=0o700)
        os.chown(directory, NOBODY, NOBODY)
    else:
        directory = Path("/")  # owned by root
    with pytest.raises(StoreDirectoryError, match=f"belongs to uid {directory.stat().st_uid}, not to this user"):
        SessionStore(directory)


async def test_listing_and_deleting(engine):
    await _stored(engine, "one")
    await _stored(engine, "two")
    listed = {s.name: s for s in engine.store.sessions()}
    assert set(listed) == {"one", "two"}
    for name, entry in listed.items():
        st = engine.store.path(name).stat()
        assert entry.nbytes == st.st_size and entry.last_used_at == st.st_mtime
    engine.store.delete("one")
    assert [s.name for s in engine.store.sessions()] == ["two"]
    with pytest.raises(NotFoundError, match="'one'"):
        engine.store.delete("one")
    with pytest.raises(NotFoundError, match="'one'"):
        await engine.restore_session("one")
    with pytest.raises(InvalidArgumentError, match="max_bytes"):
        SessionStore(engine.store.directory, max_bytes=0)
