"""Typed errors: one class per protocol error code, plus the two the client raises itself."""

from pathlib import Path
from typing import Optional


class KakeyaError(Exception):
    """Base class; `code` is the protocol error code, `message` the daemon's (or client's) explanation."""

    code = "internal"

    def __init__(self, message: str, code: Optional[str] = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return self.message


class NotFound(KakeyaError):
    """The session (or request) does not exist, or the daemon evicted it."""

    code = "not_found"


class InvalidArgument(KakeyaError):
    """A parameter is wrong; the message names it."""

    code = "invalid_argument"


class Busy(KakeyaError):
    """The session is already generating."""

    code = "busy"


class ResourceExhausted(KakeyaError):
    """A daemon limit was reached (sessions, queued generations, memory), or it is shutting down."""

    code = "resource_exhausted"


class ProtocolError(KakeyaError):
    """Client and daemon disagree about the protocol itself."""

    code = "protocol_error"


class Internal(KakeyaError):
    """The daemon failed unexpectedly."""

    code = "internal"


class ConnectionFailed(KakeyaError):
    """No daemon answers at the socket path, or the connection to it was lost."""

    code = "connection_failed"


class Timeout(KakeyaError):
    """The daemon did not answer within the client's timeout."""

    code = "timeout"


_BY_CODE = {cls.code: cls for cls in (NotFound, InvalidArgument, Busy, ResourceExhausted, ProtocolError, Internal)}


def error_from(code: str, message: str) -> KakeyaError:
    """The exception for an error the daemon reported; unknown codes give a plain KakeyaError."""
    cls = _BY_CODE.get(code)
    return cls(message) if cls is not None else KakeyaError(message, code)


def no_daemon(path: Path) -> ConnectionFailed:
    return ConnectionFailed(f"no kakeya daemon at {path}; start one with `kakeya serve`")


def connect_failed(path: Path, exc: OSError) -> ConnectionFailed:
    """The error for a failed connect: a missing or stale socket means no daemon runs there."""
    if isinstance(exc, (FileNotFoundError, ConnectionRefusedError)):
        return no_daemon(path)
    return ConnectionFailed(f"cannot connect to the kakeya daemon at {path}: {exc.strerror or exc}")


def connection_lost(path: Path, why: str) -> ConnectionFailed:
    return ConnectionFailed(f"lost the connection to the kakeya daemon at {path}: {why}")


def no_answer(method: str, path: Path, timeout: Optional[float]) -> Timeout:
    return Timeout(f"{method}: no answer from the kakeya daemon at {path} within {timeout}s")


def not_taken(method: str, path: Path, timeout: Optional[float]) -> Timeout:
    return Timeout(f"{method}: the kakeya daemon at {path} did not take the request within {timeout}s")
