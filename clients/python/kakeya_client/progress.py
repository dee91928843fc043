"""A one-line spinner on a terminal while the CLI waits for the first token (the prompt being prefilled).

Drawn on stderr only when stderr is a terminal, redrawn in place (carriage return,
erase line), and erased before the reply's first text is written, so the transcript
on stdout never holds it.
"""

import sys
import threading
import time
from typing import Optional, TextIO

FRAMES = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"
INTERVAL_S = 0.1
ERASE = "\r\x1b[K"


class Spinner:
    """`with Spinner("reading 812 prompt tokens"):` ... or start() / stop(); stop() is idempotent."""

    def __init__(self, label: str, stream: Optional[TextIO] = None):
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty()
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "Spinner":
        if self.enabled and self._thread is None:
            self._draw(0, 0.0)  # at once: the first frame does not wait for the thread
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop and erase the line (only what the spinner drew)."""
        if self._thread is None or self._done.is_set():
            return
        self._done.set()
        self._thread.join()
        with self._lock:
            self.stream.write(ERASE)
            self.stream.flush()

    def _run(self) -> None:
        started, frame = time.monotonic(), 1
        while not self._done.wait(INTERVAL_S):
            self._draw(frame, time.monotonic() - started)
            frame += 1

    def _draw(self, frame: int, elapsed: float) -> None:
        with self._lock:
            if self._done.is_set():
                return
            self.stream.write(f"{ERASE}{FRAMES[frame % len(FRAMES)]} {self.label} ({elapsed:.1f} s)")
            self.stream.flush()

    def __enter__(self) -> "Spinner":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
