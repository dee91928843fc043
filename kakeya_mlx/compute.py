"""The single compute thread: every MLX call of the engine runs here.

Two kinds of work: one-shot calls, and streams (generators stepped one item at a
time). Streams are stepped round-robin so concurrent generations share the device
fairly; one-shot calls go first, between any two steps.
"""

import collections
import threading
from concurrent.futures import Future
from typing import Callable, Iterator


class ComputeThread:
    """Runs callables and generator streams on one dedicated thread."""

    def __init__(self, name: str = "kakeya-compute"):
        self._calls: collections.deque = collections.deque()
        self._streams: collections.deque = collections.deque()
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def call(self, fn: Callable, *args, **kwargs) -> Future:
        """Run fn(*args, **kwargs) on the compute thread; the future holds its result."""
        future: Future = Future()
        with self._wake:
            if self._stopping:
                raise RuntimeError("the compute thread is stopped")
            self._calls.append((future, fn, args, kwargs))
            self._wake.notify()
        return future

    def add_stream(
        self,
        steps: Iterator,
        on_item: Callable[[object], None],
        on_error: Callable[[BaseException], None],
    ) -> None:
        """Step `steps` until exhausted, passing each item to on_item (on this thread)."""
        with self._wake:
            if self._stopping:
                raise RuntimeError("the compute thread is stopped")
            self._streams.append((steps, on_item, on_error))
            self._wake.notify()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish queued calls and running streams, then end the thread."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._wake:
                while not (self._calls or self._streams or self._stopping):
                    self._wake.wait()
                if self._stopping and not (self._calls or self._streams):
                    return
                calls = list(self._calls)
                self._calls.clear()
                stream = self._streams.popleft() if self._streams else None
            for future, fn, args, kwargs in calls:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn(*args, **kwargs))
                    except BaseException as exc:  # handed to the caller
                        future.set_exception(exc)
            if stream is not None:
                self._step(stream)

    def _step(self, stream) -> None:
        steps, on_item, on_error = stream
        try:
            item = next(steps)
        except StopIteration:
            return
        except BaseException as exc:  # reported to the stream's owner
            on_error(exc)
            return
        on_item(item)
        with self._wake:
            self._streams.append(stream)
