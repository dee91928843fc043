"""Length-prefixed msgpack frames: a 4-byte big-endian length N, then N bytes holding one map."""

import struct
from typing import Any

import msgpack

from .quote import quote

HEADER = struct.Struct(">I")
# 16 MiB: a 32k-token append is ~200 KB, so this leaves room without letting one peer pin much memory.
MAX_FRAME_BYTES = 16 * 1024 * 1024

_MSGPACK_TYPE_NAMES = {
    dict: "map",
    list: "array",
    str: "str",
    bytes: "bin",
    int: "int",
    float: "float",
    bool: "bool",
    type(None): "nil",
}
# msgpack names Python types in its key errors ("int is not allowed for map key ...").
_PYTHON_TYPE_NAMES = {"NoneType": "nil", "tuple": "array", "list": "array", "dict": "map"}


class ProtocolError(Exception):
    """The byte stream or a message breaks the protocol; the connection cannot go on."""

    code = "protocol_error"


def msgpack_type_name(value: Any) -> str:
    """The msgpack name of a decoded value's type ("map", "array", "str", ...)."""
    return _MSGPACK_TYPE_NAMES.get(type(value), "ext")


def encode_frame(obj: dict, max_frame_bytes: int = MAX_FRAME_BYTES) -> bytes:
    """One frame holding `obj`; ProtocolError if the body would exceed `max_frame_bytes`."""
    if not isinstance(obj, dict):
        raise TypeError(f"a frame holds a map, not {type(obj).__name__}")
    body = msgpack.packb(obj, use_bin_type=True)
    if len(body) > max_frame_bytes:
        raise ProtocolError(f"frame of {len(body)} bytes exceeds max_frame_bytes={max_frame_bytes}")
    return HEADER.pack(len(body)) + body


class _BadKey(Exception):
    """A map key that breaks the framing rules, found while decoding (see _checked_map)."""


def _checked_map(pairs: list) -> dict:
    """Every map in a frame, at any depth: str keys only, each at most once."""
    out = {}
    for key, value in pairs:
        if not isinstance(key, str):
            raise _BadKey(f"map keys must be msgpack str, not {msgpack_type_name(key)} ({quote(key)})")
        if key in out:
            raise _BadKey(f"map key {quote(key)} appears twice in one map")
        out[key] = value
    return out


def decode_body(body: bytes) -> dict:
    """The map in one frame body; ProtocolError unless it is exactly one msgpack map whose maps,
    at every depth, have distinct str keys."""
    try:
        obj = msgpack.unpackb(body, raw=False, strict_map_key=True, object_pairs_hook=_checked_map)
    except _BadKey as exc:
        raise ProtocolError(str(exc)) from None
    except msgpack.ExtraData as exc:
        raise ProtocolError(f"frame body has {len(exc.extra)} bytes after its msgpack value") from None
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"frame body holds a str that is not valid UTF-8: {exc.reason}") from None
    except ValueError as exc:
        # msgpack reports bad bytes, truncated values and non-string map keys as ValueError subclasses.
        text = str(exc)
        if "map key" in text:  # "int is not allowed for map key when strict_map_key=True"
            key_type = _PYTHON_TYPE_NAMES.get(text.split()[0], text.split()[0])
            raise ProtocolError(f"map keys must be msgpack str, not {key_type}") from None
        raise ProtocolError(f"frame body is not valid msgpack: {text or type(exc).__name__}") from None
    except Exception as exc:  # msgpack raises a few other types for hostile input (e.g. too-deep nesting)
        raise ProtocolError(f"frame body is not valid msgpack: {type(exc).__name__}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"frame body must be a msgpack map, got {msgpack_type_name(obj)}")
    return obj


class FrameDecoder:
    """Incremental decoder: feed bytes as they arrive, get back whole messages.

    The length prefix is checked as soon as its 4 bytes arrive, so an oversized or
    empty frame is refused before any of its body is buffered. After a
    ProtocolError the stream is out of step and every later feed raises it again.
    """

    def __init__(self, max_frame_bytes: int = MAX_FRAME_BYTES):
        self.max_frame_bytes = max_frame_bytes
        self._buffer = bytearray()
        self._need: int = 0  # body length of the frame being read; 0 while reading a header
        self._error: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes held that do not yet make up a whole frame (non-zero at EOF means a cut-off frame)."""
        return len(self._buffer) + (HEADER.size if self._need else 0)

    def feed(self, data: bytes) -> list[dict]:
        """Add bytes; return the messages completed by them, in order."""
        return [message for message, _ in self.feed_frames(data)]

    def feed_frames(self, data: bytes) -> list[tuple[dict, int]]:
        """Add bytes; return (message, frame size in bytes) for each frame completed by them, in order."""
        if self._error is not None:
            raise self._error
        self._buffer += data
        messages = []
        try:
            while True:
                if not self._need:
                    if len(self._buffer) < HEADER.size:
                        break
                    (length,) = HEADER.unpack_from(self._buffer)
                    if length == 0:
                        raise ProtocolError("frame length is 0: every frame must hold one msgpack map")
                    if length > self.max_frame_bytes:
                        raise ProtocolError(f"frame of {length} bytes exceeds max_frame_bytes={self.max_frame_bytes}")
                    del self._buffer[: HEADER.size]
                    self._need = length
                if len(self._buffer) < self._need:
                    break
                body = bytes(self._buffer[: self._need])
                del self._buffer[: self._need]
                self._need = 0
                messages.append((decode_body(body), HEADER.size + len(body)))
        except ProtocolError as exc:
            self._error = exc
            self._buffer.clear()
            raise
        return messages
