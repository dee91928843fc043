"""Owning the socket path safely: a private directory, one daemon per socket, same-user peers only."""

import errno
import fcntl
import logging
import os
import socket
import stat
import struct
import sys
from pathlib import Path
from typing import Optional

from kakeya_mlx.private_dir import private_dir_problem

log = logging.getLogger("kakeya.daemon")

# sockaddr_un.sun_path holds 104 bytes on macOS and 108 on Linux, NUL included.
MAX_SOCKET_PATH = 103 if sys.platform == "darwin" else 107


class StartError(Exception):
    """The daemon cannot start; the message says why in one line."""


def ensure_private_dir(directory: Path, option: str = "--socket") -> None:
    """Create `directory` with mode 0700, or check an existing one is ours and not writable by others."""
    problem = private_dir_problem(directory, "socket directory", option, others_may_read=True)
    if problem is not None:
        raise StartError(problem)


class SocketLock:
    """An exclusive flock on <socket>.lock, held for the daemon's lifetime.

    Whoever holds it owns the socket path, so checking for a live daemon and
    taking over a stale socket cannot race with another daemon starting.
    """

    def __init__(self, socket_path: Path, path: Optional[Path] = None):
        self.owned = socket_path  # what holding the lock makes this daemon's
        self.path = path if path is not None else socket_path.with_name(socket_path.name + ".lock")
        self._fd: Optional[int] = None

    def held_by(self, pid: Optional[int]) -> str:
        """Why the lock cannot be had, naming the daemon that holds it."""
        return _already_serving(self.owned, pid)

    def acquire(self) -> None:
        """Take the lock, or raise StartError naming the daemon that holds it."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = _read_pid(fd)
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise StartError(self.held_by(holder)) from None
                raise StartError(f"cannot lock {self.path}: {exc.strerror}") from None
            # The previous owner unlinks the file on exit; if it did so after our
            # open, we locked an orphan inode: start again on the new file.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Remove the lock file and drop the lock (in that order, see acquire)."""
        if self._fd is None:
            return
        try:
            self.path.unlink()
        except OSError:
            pass  # gone already, or its directory is: the lock goes with the descriptor anyway
        os.close(self._fd)
        self._fd = None


class StoreLock(SocketLock):
    """An exclusive flock on <store>/.daemon.lock: one daemon per session store directory.

    Two daemons sharing a store would each take the other's stored sessions for
    its own at start, and fail to restore them (another model) or restore them twice.
    """

    def __init__(self, directory: Path):
        super().__init__(directory, directory / ".daemon.lock")

    def held_by(self, pid: Optional[int]) -> str:
        who = f" (pid {pid})" if pid else ""
        return f"the session store {self.owned} is in use by another kakeya daemon{who}"


def _read_pid(fd: int) -> Optional[int]:
    try:
        return int(os.pread(fd, 32, 0).decode().strip())
    except (OSError, ValueError):
        return None


def _already_serving(path: Path, pid: Optional[int]) -> str:
    who = f" (pid {pid})" if pid else ""
    return f"another kakeya daemon is already serving {path}{who}"


def claim_socket_path(path: Path, option: str = "--socket") -> None:
    """With the lock held: refuse if something answers on `path`, remove a stale socket file."""
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise StartError(
            f"socket path {path} is {len(os.fsencode(path))} bytes; Unix sockets allow at most "
            f"{MAX_SOCKET_PATH}: choose a shorter {option}"
        )
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise StartError(f"{path} exists and is not a socket; remove it or choose another {option}")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(os.fspath(path))
    except (ConnectionRefusedError, FileNotFoundError):
        log.info("removing stale socket %s left by a daemon that is gone", path)
        path.unlink(missing_ok=True)
        return
    except OSError as exc:
        raise StartError(f"cannot check the socket {path}: {exc.strerror or exc}") from None
    finally:
        probe.close()
    # Something answers although nobody holds the lock (its lock file was removed).
    raise StartError(_already_serving(path, None))


def peer_credentials(sock: socket.socket) -> tuple[Optional[int], Optional[int]]:
    """(uid, pid) of the process at the other end of a Unix socket; None where the OS won't say."""
    if sys.platform.startswith("linux"):
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, _gid = struct.unpack("3i", raw)
        return uid, pid
    if sys.platform == "darwin":
        sol_local, local_peercred, local_peerpid = 0, 0x001, 0x002
        # struct xucred { u_int cr_version; uid_t cr_uid; short cr_ngroups; gid_t cr_groups[16]; }
        raw = sock.getsockopt(sol_local, local_peercred, struct.calcsize("IIh2x16I"))
        _version, uid = struct.unpack_from("II", raw)
        try:
            pid = struct.unpack("i", sock.getsockopt(sol_local, local_peerpid, 4))[0]
        except OSError:
            pid = None
        return uid, pid
    return None, None


class ClaimedSocket:
    """A Unix socket path owned for the daemon's life: a private directory, the lock, no stale file.

    The main socket and the HTTP front's socket are claimed the same way; `option`
    names the setting in error messages.
    """

    def __init__(self, path: Path, option: str = "--socket"):
        self.path = path
        self.option = option
        self.lock = SocketLock(path)
        self.listening = False

    def claim(self) -> None:
        """Take the path, or raise StartError saying why not."""
        ensure_private_dir(self.path.parent, self.option)
        self.lock.acquire()
        try:
            claim_socket_path(self.path, self.option)
        except BaseException:
            self.lock.release()
            raise

    def served(self) -> None:
        """The socket file exists now: make it private."""
        os.chmod(self.path, 0o600)
        self.listening = True

    def release(self) -> None:
        """Remove the socket file (if this daemon made it) and the lock."""
        if self.listening and self.lock.held:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
        self.listening = False
        self.lock.release()


def check_peer(sock: Optional[socket.socket]) -> tuple[Optional[str], Optional[int]]:
    """(why a Unix-socket peer is refused, or None when it may stay; its pid where the OS says)."""
    if sock is None or sock.family != socket.AF_UNIX:
        return None, None
    try:
        uid, pid = peer_credentials(sock)
    except OSError as exc:
        log.debug("peer credentials unavailable: %s", exc)
        return None, None
    if uid is None or uid == os.getuid():
        return None, pid
    return f"this daemon serves uid {os.getuid()} only; connection from uid {uid} refused (pid {pid})", pid
