"""The session store: sessions written to disk exactly, in a private directory with a size cap.

File format (one file per stored session, `<name>.session`)::

    magic    16 bytes   b"KAKEYA SESSION\\x00" + format version byte (1)
    body     a safetensors file: u64le header length, JSON header, tensor data
    digest   32 bytes   SHA-256 of magic + body

The body's safetensors metadata holds one key, "kakeya", a JSON object:
    format       "kakeya-session"
    name         the name the file is stored under (a file renamed by hand is refused)
    saved_at     seconds since the epoch
    fingerprint  everything the cache depends on (see `model_fingerprint`): "layout"
                 (cache.LAYOUT_VERSION), "config", "tokenizer", "weights" (digests of the
                 model files), "dtype", "kv_dtype", "sink", "window", "block"
    session      Session.state() metadata: id, created_at, last_used_at, speculative,
                 num_draft_tokens, chat_reply_start, and "groups": {group name:
                 SinkWindowCache.state() bookkeeping (layout, sink, window, block,
                 layers, committed, evicted, tail_pieces)}
    extra        free-form JSON the caller stores with the session (the daemon's own)
Tensors: "history" (uint32), and per cache group ("main" now; a drafter's later)
"<group>/token_ids" (uint32), "<group>/logits" (the logits after the processed
history, so a restored session continues without a forward pass; absent when the
session holds none), "<group>/boundary_logits" (those after the last committed
token, when kept) and "<group>/layers.<i>.keys" (float32) / ".values" (the
model's dtype), each (1, kv_heads, cached tokens, head_dim).

Why this shape: safetensors is a plain, non-executable tensor format that MLX
reads and writes natively (bfloat16 included) and that `mx.load` validates, so
no pickle and no hand-written tensor codec; the envelope adds what safetensors
lacks, a checksum over every byte, so a truncated or corrupted file is refused
before anything is parsed. Writes are atomic: a temporary file in the store
directory, fsync, rename, fsync of the directory.

The format and the directory are one module (over 400 lines) because they make
one promise together: a name either loads exactly what was saved or is refused.

Over 400 lines because the file format, its checks (digest, fingerprint, names) and
the store (atomic writes, size cap, LRU) are one contract, documented here once.
"""

import errno
import hashlib
import io
import json
import os
import re
import secrets
import stat
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import mlx.core as mx

from . import platform
from .private_dir import private_dir_problem
from .errors import (
    CorruptSessionError,
    InvalidArgumentError,
    NotFoundError,
    StoreDirectoryError,
    StoreError,
    StoreWriteError,
)

FORMAT_VERSION = 1
MAGIC = b"KAKEYA SESSION\x00" + bytes([FORMAT_VERSION])
_MAGIC_PREFIX = MAGIC[:-1]
DIGEST_SIZE = hashlib.sha256().digest_size
SUFFIX = ".session"
DEFAULT_MAX_BYTES = 4 << 30
# Names become file names: no separators, no leading dot (temporary files start with one).
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]+\.tmp$")
_WRITE_CHUNK = 8 << 20
# Largest safetensors header `describe` reads: the tensor table and the session's metadata.
_MAX_HEADER = 16 << 20
# Bytes of each tensor's data read for the weights digest, from its start and its end.
_SAMPLE = 4096
_NO_SPACE = {"ENOSPC", "EDQUOT", "EFBIG"}
_NO_ACCESS = {"EACCES", "EPERM", "EROFS"}


def default_store_dir() -> Path:
    """The store's default directory, beside converted models (KAKEYA_HOME moves both)."""
    return platform.default_cache_dir() / "sessions"


def check_name(name: str) -> None:
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise InvalidArgumentError(
            f"session name {name!r} is not valid: 1-128 letters, digits, '_', '-' or '.', not starting with '.'"
        )


# ---- fingerprint -------------------------------------------------------------


def model_fingerprint(path: Path) -> dict:
    """Digests of what a model's cache depends on in its folder: config, tokenizer, weights.

    config: config.json. tokenizer: every other small file the loader takes
    (tokenizer and generation files). weights: for each *.safetensors file, its
    size, its header (every tensor's name, dtype, shape and offsets) and the first
    and last 4 KiB of every tensor's data. That reads a few KiB per tensor however
    large the model is, survives copying the folder (no mtimes), and catches any
    change of architecture, dtype or quantization (headers) and any retrained,
    fine-tuned or merged weights (which change every element of the tensors they
    touch). Only an edit that spares both ends of every tensor it touches would
    pass unseen.
    """
    try:
        return _model_fingerprint(Path(path))
    except (OSError, KeyError, TypeError, ValueError) as exc:
        raise StoreError(f"cannot fingerprint the model files in {path}: {exc}") from None


def _model_fingerprint(path: Path) -> dict:
    small = hashlib.sha256()
    for file in sorted(path.iterdir()):
        if file.name == "config.json" or not file.is_file() or not _is_model_file(file.name):
            continue
        small.update(_framed(file.name.encode()) + _framed(file.read_bytes()))
    weights = hashlib.sha256()
    for file in sorted(path.glob("*.safetensors")):
        weights.update(_framed(file.name.encode()))
        _digest_safetensors(file, weights)
    return {
        "config": "sha256:" + hashlib.sha256((path / "config.json").read_bytes()).hexdigest(),
        "tokenizer": "sha256:" + small.hexdigest(),
        "weights": "sha256:" + weights.hexdigest(),
    }


def _is_model_file(name: str) -> bool:
    if name.endswith(".safetensors") or name.endswith(".safetensors.index.json"):
        return False
    return name.endswith((".json", ".txt", ".jinja", ".tiktoken")) or name == "tokenizer.model"


def _framed(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + data


def _digest_safetensors(file: Path, digest) -> None:
    with open(file, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise StoreError(f"cannot fingerprint {file}: not a safetensors file")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise StoreError(f"cannot fingerprint {file}: its header runs past the end of the file")
        header = f.read(header_len)
        digest.update(_framed(struct.pack("<Q", size)) + _framed(header))
        try:
            tensors = json.loads(header)
        except ValueError as exc:
            raise StoreError(f"cannot fingerprint {file}: unreadable header ({exc})") from None
        base = 8 + header_len
        for name in sorted(k for k in tensors if k != "__metadata__"):
            begin, end = tensors[name]["data_offsets"]
            for start in sorted({begin, max(begin, end - _SAMPLE)}):
                digest.update(_framed(os.pread(f.fileno(), min(_SAMPLE, end - start), base + start)))


def fingerprint_differences(stored: dict, current: dict) -> dict:
    """{part: (stored value, current value)} for every part of two fingerprints that differs."""
    stored = stored if isinstance(stored, dict) else {}
    return {k: (stored.get(k), current[k]) for k in current if stored.get(k) != current[k]}


# ---- file contents -----------------------------------------------------------


@dataclass
class StoredState:
    """What a session file holds, parsed (its arrays live in memory)."""

    name: str
    saved_at: float
    fingerprint: dict
    session: dict
    arrays: dict
    extra: dict


def pack(name: str, fingerprint: dict, session: dict, arrays: dict, extra: dict) -> memoryview:
    """A session file's bytes. Evaluates the arrays: call it where MLX work runs."""
    header = {
        "format": "kakeya-session",
        "name": name,
        "saved_at": time.time(),
        "fingerprint": fingerprint,
        "session": session,
        "extra": extra,
    }
    buf = io.BytesIO()
    buf.write(MAGIC)
    mx.save_safetensors(buf, arrays, metadata={"kakeya": json.dumps(header, allow_nan=False)})
    view = buf.getbuffer()
    digest = hashlib.sha256(view).digest()
    del view  # a BytesIO cannot grow while its buffer is exported
    buf.write(digest)
    return buf.getbuffer()


def unpack(name: str, body: bytes) -> StoredState:
    """Parse a verified body (see `SessionStore.read`). Makes MLX arrays: call it where MLX work runs."""
    try:
        arrays, metadata = mx.load(io.BytesIO(body), format="safetensors", return_metadata=True)
        header = json.loads(metadata["kakeya"])
    except Exception as exc:  # MLX raises RuntimeError/ValueError for malformed files
        raise CorruptSessionError(f"stored session {name!r} cannot be read: {exc}") from None
    if not isinstance(header, dict) or header.get("format") != "kakeya-session":
        raise CorruptSessionError(f"stored session {name!r} is not a kakeya session")
    if header.get("name") != name:
        raise CorruptSessionError(
            f"the file of stored session {name!r} holds session {header.get('name')!r}: it was renamed or replaced"
        )
    parts = ("saved_at", "fingerprint", "session", "extra")
    if not all(k in header for k in parts) or not all(isinstance(header[k], dict) for k in parts[1:]):
        raise CorruptSessionError(f"stored session {name!r} lacks part of its header")
    return StoredState(name, header["saved_at"], header["fingerprint"], header["session"], arrays, header["extra"])


# ---- the store directory -----------------------------------------------------


@dataclass(frozen=True)
class StoredSession:
    """A session file in the store."""

    name: str
    nbytes: int
    last_used_at: float  # seconds since the epoch: the last write or read


@dataclass(frozen=True)
class SavedSession:
    """A completed write, and the least recently used sessions removed to stay under the cap."""

    name: str
    nbytes: int
    evicted: tuple


class SessionStore:
    """Session files in one private directory (0700, files 0600), at most `max_bytes` in all.

    When a write would pass the cap, the least recently used other sessions are
    removed first (`SavedSession.evicted` names them); a session larger than the
    cap on its own is refused (StoreWriteError) and nothing is removed. Last use
    is the file's mtime, set by every write and read.
    """

    def __init__(
        self, directory: Optional[Path] = None, max_bytes: int = DEFAULT_MAX_BYTES, cap_name: str = "max_bytes"
    ):
        """`cap_name` is what messages call the cap (a daemon names its own setting)."""
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
            raise InvalidArgumentError(
                f"{cap_name}={max_bytes!r}: the store's size cap must be a positive number of bytes"
            )
        self.directory = Path(directory) if directory is not None else default_store_dir()
        self.max_bytes = max_bytes
        self.cap_name = cap_name
        self._lock = threading.Lock()
        # Stricter than the socket's directory: stored sessions are conversations, and their
        # names are session ids, so other users may not even list the directory.
        problem = private_dir_problem(
            self.directory, "session store directory", "store directory", others_may_read=False
        )
        if problem is not None:
            raise StoreDirectoryError(problem)
        self._remove_abandoned_temporaries()

    def path(self, name: str) -> Path:
        check_name(name)
        return self.directory / (name + SUFFIX)

    def sessions(self) -> list[StoredSession]:
        """Every stored session, most recently used first."""
        out = []
        for entry in os.scandir(self.directory):
            name = entry.name.removesuffix(SUFFIX)
            if entry.name.endswith(SUFFIX) and NAME_PATTERN.match(name):
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # deleted meanwhile
                if stat.S_ISREG(st.st_mode):
                    out.append(StoredSession(name, st.st_size, st.st_mtime))
        return sorted(out, key=lambda s: (-s.last_used_at, s.name))

    def __contains__(self, name: str) -> bool:
        return self.path(name).is_file()

    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self.sessions())

    def delete(self, name: str) -> None:
        with self._lock:
            try:
                self.path(name).unlink()
            except FileNotFoundError:
                raise NotFoundError(f"no stored session {name!r} in {self.directory}") from None
        self._sync_directory()

    def write(self, name: str, data) -> SavedSession:
        """Store `data` (a session file from `pack`) under `name`, replacing any earlier one, atomically.

        StoreWriteError if the disk is full, the directory unwritable, or the file
        alone exceeds the cap; then the store is as it was.
        """
        final = self.path(name)
        size = len(data)
        if size > self.max_bytes:
            raise StoreWriteError(
                f"session {name!r} takes {size} bytes, more than the session store's cap "
                f"{self.cap_name}={self.max_bytes}; it was not written"
            )
        temp = self.directory / f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                os.fchmod(fd, 0o600)
                view = memoryview(data)
                while view:
                    written = os.write(fd, view[:_WRITE_CHUNK])
                    view = view[written:]
                platform.sync_file(fd)
            finally:
                os.close(fd)
            # Make room only once the data is safely on disk: a failed write removes nothing.
            with self._lock:
                evicted = self._make_room(name, size)
                os.replace(temp, final)
        except OSError as exc:
            _unlink_quietly(temp)
            raise StoreWriteError(_write_failure(name, self.directory, exc)) from None
        self._sync_directory()
        return SavedSession(name, size, tuple(evicted))

    def read(self, name: str) -> bytes:
        """The verified body of a stored session's file (see the module docstring).

        NotFoundError if there is none; CorruptSessionError, naming the session, if
        the file is truncated, corrupted or not a session file.
        """
        path = self.path(name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFoundError(f"no stored session {name!r} in {self.directory}") from None
        except OSError as exc:
            raise StoreError(f"cannot read stored session {name!r} ({path}): {exc.strerror}") from None
        with os.fdopen(fd, "rb") as f:
            data = f.read()
        if len(data) < len(MAGIC) + 8 + DIGEST_SIZE or not data.startswith(_MAGIC_PREFIX):
            raise CorruptSessionError(f"stored session {name!r} ({path}) is not a session file or is truncated")
        if data[len(_MAGIC_PREFIX)] != FORMAT_VERSION:
            raise CorruptSessionError(
                f"stored session {name!r} is in format version {data[len(_MAGIC_PREFIX)]}; "
                f"this version reads format {FORMAT_VERSION}"
            )
        if hashlib.sha256(memoryview(data)[:-DIGEST_SIZE]).digest() != data[-DIGEST_SIZE:]:
            raise CorruptSessionError(
                f"stored session {name!r} ({path}) fails its checksum: the file is truncated or corrupted"
            )
        try:
            os.utime(path)
        except OSError:
            pass  # last use is a hint for the LRU; reading succeeded
        return data[len(MAGIC) : -DIGEST_SIZE]

    def describe(self, name: str) -> dict:
        """The header of a stored session's file (name, saved_at, fingerprint, session, extra), for listing.

        Reads only the file's start and does not verify its checksum: what it says
        may be wrong for a damaged file, which `read` refuses. CorruptSessionError
        when the header itself cannot be parsed.
        """
        path = self.path(name)
        try:
            with open(path, "rb") as f:
                head = f.read(len(MAGIC) + 8)
                if len(head) < len(MAGIC) + 8 or not head.startswith(_MAGIC_PREFIX):
                    raise CorruptSessionError(f"stored session {name!r} ({path}) is not a session file or is truncated")
                (length,) = struct.unpack("<Q", head[len(MAGIC) :])
                if length > _MAX_HEADER:
                    raise CorruptSessionError(f"stored session {name!r} ({path}) has a {length}-byte header: damaged")
                tensors = json.loads(f.read(length))
            header = json.loads(tensors["__metadata__"]["kakeya"])
        except FileNotFoundError:
            raise NotFoundError(f"no stored session {name!r} in {self.directory}") from None
        except OSError as exc:
            raise StoreError(f"cannot read stored session {name!r} ({path}): {exc.strerror}") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptSessionError(f"stored session {name!r} ({path}) has an unreadable header: {exc}") from None
        if not isinstance(header, dict):
            raise CorruptSessionError(f"stored session {name!r} ({path}) has an unreadable header")
        history = tensors.get("history")
        if isinstance(history, dict) and isinstance(history.get("shape"), list) and history["shape"]:
            header["history_length"] = history["shape"][0]
        return header

    def _make_room(self, name: str, size: int) -> list[str]:
        others = [s for s in self.sessions() if s.name != name]
        total = sum(s.nbytes for s in others)
        evicted = []
        for oldest in sorted(others, key=lambda s: (s.last_used_at, s.name)):
            if total + size <= self.max_bytes:
                break
            _unlink_quietly(self.directory / (oldest.name + SUFFIX))
            total -= oldest.nbytes
            evicted.append(oldest.name)
        return evicted

    def _sync_directory(self) -> None:
        """Make renames and removals durable."""
        try:
            fd = os.open(self.directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except OSError:
            return
        try:
            platform.sync_file(fd)
        except OSError:
            pass  # some file systems cannot sync a directory; the rename itself is atomic
        finally:
            os.close(fd)

    def _remove_abandoned_temporaries(self) -> None:
        """Remove temporary files of writers that died mid-write (they never load; they take space)."""
        for entry in os.scandir(self.directory):
            match = _TEMP.match(entry.name)
            if match and int(match["pid"]) != os.getpid() and not _alive(int(match["pid"])):
                _unlink_quietly(Path(entry.path))


def _write_failure(name: str, directory: Path, exc: OSError) -> str:
    code = errno.errorcode.get(exc.errno, "")
    if code in _NO_SPACE:
        why = f"no space left ({exc.strerror})"
    elif code in _NO_ACCESS:
        why = f"the directory is not writable ({exc.strerror})"
    else:
        why = exc.strerror or str(exc)
    return f"cannot write session {name!r} to the session store {directory}: {why}; nothing was changed"


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
