"""The single compute thread: every MLX call of the engine runs here.

Two kinds of work: one-shot calls, and the scheduler's steps. Queued calls go
first, between any two steps, so a tokenize or a session save never waits for a
generation to end.

MLX keeps per-thread state (streams, and a compile cache whose entries hold
Python objects). A thread's C++ thread-locals are destroyed after Python's
`join()` has returned; if the compile cache is still full then, its destructor
takes the GIL, and if the interpreter is finalizing by that time the thread is
unwound from inside that destructor and the process aborts ("terminate called
without an active exception"). So the thread empties its MLX state itself, with
the GIL held, before it returns.
"""

import collections
import logging
import threading
from concurrent.futures import Future
from typing import Callable, Optional

import mlx.core as mx

from .scheduler import Scheduler

log = logging.getLogger("kakeya.engine")


class ComputeThread:
    """Runs callables and the scheduler on one dedicated thread."""

    def __init__(self, scheduler: Scheduler, name: str = "kakeya-compute"):
        self.scheduler = scheduler
        self._calls: collections.deque = collections.deque()
        self._arrivals: collections.deque = collections.deque()  # turns waiting to join the scheduler
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name)

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

    def submit(self, turn) -> None:
        """Hand a turn to the scheduler; it joins at the next step."""
        with self._wake:
            if self._stopping:
                raise RuntimeError("the compute thread is stopped")
            self._arrivals.append(turn)
            self._wake.notify()

    def stop(self, timeout: Optional[float] = None) -> None:
        """Finish queued calls, cancel running turns, then end the thread and join it."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        try:
            self._serve()
        finally:
            mx.clear_streams()

    def _serve(self) -> None:
        scheduler = self.scheduler
        while True:
            with self._wake:
                while not (self._calls or self._arrivals or scheduler.busy or self._stopping):
                    self._wake.wait()
                calls = list(self._calls)
                self._calls.clear()
                arrivals = list(self._arrivals)
                self._arrivals.clear()
                stopping = self._stopping
            for future, fn, args, kwargs in calls:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn(*args, **kwargs))
                    except BaseException as exc:  # handed to the caller
                        future.set_exception(exc)
            for turn in arrivals:
                scheduler.add(turn)
            if stopping:
                scheduler.end_all()
                return
            if scheduler.busy:
                try:
                    scheduler.step()
                except Exception as exc:
                    log.exception("a scheduler step failed; ending its turns")
                    scheduler.end_all(exc)
