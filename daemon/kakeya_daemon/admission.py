"""Admission of generations: a fixed number of slots, and a bounded FIFO queue or an immediate refusal.

Pure policy: it hands out slots and says no; it never calls back into its owner.
Every refusal is a `Refusal` naming the limit that refused.
"""

import asyncio
import collections

from kakeya_mlx.errors import ResourceExhaustedError


class Refusal(ResourceExhaustedError):
    """A request refused by a daemon limit; `limit` is the setting's name (the key in stats.rejections)."""

    def __init__(self, limit: str, message: str):
        super().__init__(message)
        self.limit = limit


class Admission:
    """Generation slots: at most `max_generations` run; others wait in FIFO order or are refused."""

    def __init__(self, max_generations: int, queue_policy: str, max_queue_wait_s: float, max_queued: int):
        self.max_generations = max_generations
        self.queue_policy = queue_policy
        self.max_queue_wait_s = max_queue_wait_s
        self.max_queued = max_queued
        self.active = 0
        self._waiters: collections.deque[asyncio.Future] = collections.deque()

    @property
    def queued(self) -> int:
        return sum(1 for w in self._waiters if not w.done())

    def try_acquire(self) -> bool:
        """Take a free slot now if there is one and nobody waits for it."""
        if self.active < self.max_generations and not self.queued:
            self.active += 1
            return True
        return False

    async def acquire(self) -> None:
        """Take a slot, waiting in FIFO order if the policy is 'queue'; Refusal otherwise."""
        if not self.try_acquire():
            await self.wait(self.enqueue())

    def enqueue(self) -> asyncio.Future:
        """Join the queue now (it counts as queued at once); `wait` on the result. Refusal if it may not."""
        if self.queue_policy == "reject":
            raise Refusal(
                "max_concurrent_generations",
                f"all generation slots are busy (max_concurrent_generations={self.max_generations}, "
                "queue_policy=reject); try again shortly",
            )
        if self.queued >= self.max_queued:
            raise Refusal(
                "max_queued_generations",
                f"the generation queue is full (max_queued_generations={self.max_queued}, "
                f"max_concurrent_generations={self.max_generations}); try again shortly",
            )
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        return waiter

    async def wait(self, waiter: asyncio.Future) -> None:
        """Wait for the slot `waiter` was queued for, up to max_queue_wait_s (then Refusal)."""
        try:
            await asyncio.wait_for(asyncio.shield(waiter), self.max_queue_wait_s)
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                self.release()  # the slot arrived just as we gave up: pass it on
            else:
                waiter.cancel()
            if isinstance(exc, asyncio.TimeoutError):
                raise Refusal(
                    "max_queue_wait_s",
                    f"no generation slot freed within max_queue_wait_s={self.max_queue_wait_s:g} "
                    f"(max_concurrent_generations={self.max_generations})",
                ) from None
            raise
        finally:
            try:
                self._waiters.remove(waiter)
            except ValueError:
                pass

    def release(self) -> None:
        """Hand the slot to the longest waiter, or free it."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.active -= 1
