"""Which daemon `kakeya run` talks to: the one that answers on the socket, else a private one it starts and stops."""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Iterator, Optional

from kakeya_protocol import default_socket_path

from .client import Client
from .errors import ConnectionFailed, KakeyaError
from .service import DEFAULT_MODEL, DEFAULT_MODEL_NAME

# How long a stopped daemon may take to exit before it is terminated (`kakeya stop` waits as long).
STOP_WAIT_S = 30.0
# The daemon's log line once it serves (kakeya_daemon.server); its log is shown up to there.
READY_LINE = b" INFO serving "
# Longest wait, once connected, for that line to come through the pipe.
READY_LINE_WAIT_S = 5.0


def running_daemon(socket_path: Optional[str], model: Optional[str], timeout: float) -> Optional[Client]:
    """A client of the daemon answering on the socket, when it serves `model` (any, for None); else None, said why."""
    path = socket_path or default_socket_path()
    try:
        client = Client(socket_path, timeout=timeout)
    except ConnectionFailed:
        _say(f"no daemon answers at {path}; starting a private one (it stops when this run ends)")
        return None
    served = client.server_info.get("model", {})
    if model is not None and not _serves(served, model):
        client.close()
        _say(
            f"the daemon at {path} serves {served.get('name')}, not {model}; "
            "starting a private one (it stops when this run ends)"
        )
        return None
    _say(f"using the daemon at {path} ({served.get('name')})")
    return client


def _serves(model: dict, asked: str) -> bool:
    """Whether a daemon serving `model` (hello's model) serves the model `asked` names."""
    if asked == DEFAULT_MODEL:
        return model.get("name") == DEFAULT_MODEL_NAME
    if asked == model.get("name"):
        return True
    path = Path(asked).expanduser()
    return path.exists() and str(path.resolve()) == model.get("path")


def _say(message: str) -> None:
    print(f"kakeya run: {message}", file=sys.stderr, flush=True)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


@contextlib.contextmanager
def private_daemon(model: Optional[str], timeout: float) -> Iterator[Client]:
    """Start `python -m kakeya_daemon` on a private socket, yield a connected Client, shut it down after."""
    tmp = Path(tempfile.mkdtemp(prefix="kakeya-run-"))
    sock = tmp / "kakeya.sock"
    # Its session is throwaway: kept in a store of its own, not saved when it stops.
    cmd = [sys.executable, "-m", "kakeya_daemon", "--socket", str(sock), "--store-dir", str(tmp / "sessions")]
    # At least info: its start-up lines are what the terminal shows, up to READY_LINE.
    level = "debug" if os.environ.get("KAKEYA_LOG_LEVEL", "").strip().lower() == "debug" else "info"
    cmd += ["--stop-save-s", "0", "--log-level", level] + (["--model", model] if model else [])
    # Own process group: Ctrl-C reaches only us, and we cancel and shut the daemon down in order.
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    log = _DaemonLog(proc)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    client = None
    try:
        client = _wait_until_serving(proc, sock, timeout, log)
        yield client
    finally:
        signal.signal(signal.SIGTERM, previous)
        asked = False
        if client is not None:
            with contextlib.suppress(KakeyaError):
                client.shutdown()
                asked = True
            client.close()
        _stop_process(proc, asked)
        log.join()
        shutil.rmtree(tmp, ignore_errors=True)


class _DaemonLog:
    """Copies the daemon's stderr to ours while it loads (progress bars included); keeps a tail after."""

    def __init__(self, proc: subprocess.Popen):
        self.tail: deque[bytes] = deque(maxlen=64)
        self.showing = True
        self.ready = threading.Event()
        self._proc = proc
        self._thread = threading.Thread(target=self._copy, daemon=True)
        self._thread.start()

    def _copy(self) -> None:
        fd = self._proc.stderr.fileno()
        while True:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                return
            if not chunk:
                return
            seen = (self.tail[-1] if self.tail else b"")[-len(READY_LINE) :] + chunk  # the line may straddle reads
            self.tail.append(chunk)
            if self.showing:
                with contextlib.suppress(OSError, ValueError):
                    sys.stderr.buffer.write(chunk)
                    sys.stderr.flush()
            if READY_LINE in seen:
                self.showing = False  # from here on its log would only interleave with the reply
                self.ready.set()

    def settle(self) -> None:
        """Once the daemon answers: show its log up to its ready line (bounded wait), then no more."""
        self.ready.wait(READY_LINE_WAIT_S)
        self.showing = False

    def last_line(self) -> str:
        lines = b"".join(self.tail).decode(errors="replace").strip().splitlines()
        return lines[-1] if lines else ""

    def join(self) -> None:
        self._thread.join(timeout=5)
        self._proc.stderr.close()


def _wait_until_serving(proc: subprocess.Popen, sock: Path, timeout: float, log: _DaemonLog) -> Client:
    while True:
        if proc.poll() is not None:
            log.join()
            why = " (its log is above)" if log.showing else f": {log.last_line() or 'no output'}"
            raise KakeyaError(f"the daemon exited with code {proc.returncode} before serving{why}")
        if sock.exists():
            try:
                client = Client(sock, timeout=timeout)
            except ConnectionFailed:
                pass  # bound but not listening yet
            else:
                log.settle()
                return client
        time.sleep(0.05)


def _stop_process(proc: subprocess.Popen, asked: bool) -> None:
    """Wait for a daemon that was asked to shut down; SIGTERM (a graceful stop too), then SIGKILL, if it lingers."""
    steps = [(proc.terminate, 10.0), (proc.kill, 10.0)]
    if asked:
        steps.insert(0, (None, STOP_WAIT_S))
    for stop, wait in steps:
        if stop is not None:
            with contextlib.suppress(ProcessLookupError):
                stop()
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
