"""Admission: the session limit, generation slots (reject or queue), and the memory budget.

Every refusal raises ResourceExhaustedError whose message names the limit, and is
counted in `rejections` under that limit's name.
"""

import asyncio
import collections
from typing import Awaitable, Callable, Optional

from kakeya_mlx.errors import ResourceExhaustedError


class Admission:
    """Decides whether new sessions and generations may start."""

    def __init__(
        self,
        max_sessions: int,
        max_concurrent_generations: int,
        queue_policy: str,
        max_queue_wait_s: float,
        memory_budget_bytes: Optional[int],
    ):
        self.max_sessions = max_sessions
        self.max_generations = max_concurrent_generations
        self.queue_policy = queue_policy
        self.max_queue_wait_s = max_queue_wait_s
        self.memory_budget_bytes = memory_budget_bytes  # None: no budget
        self.active_generations = 0
        self.rejections: collections.Counter = collections.Counter()
        self._waiters: collections.deque[asyncio.Future] = collections.deque()

    @property
    def queued_generations(self) -> int:
        return sum(1 for w in self._waiters if not w.done())

    def reject(self, limit: str, message: str) -> ResourceExhaustedError:
        """Count a refusal under `limit` and return the error to raise."""
        self.rejections[limit] += 1
        return ResourceExhaustedError(message)

    def check_session_slot(self, sessions_held: int) -> None:
        if sessions_held >= self.max_sessions:
            raise self.reject(
                "max_sessions",
                f"session limit reached (max_sessions={self.max_sessions}); close a session or raise max_sessions",
            )

    async def fit_memory(self, measure: Callable[[], int], evict_one: Callable[[], Awaitable[bool]]) -> int:
        """Evict idle sessions while over the budget; return MLX active bytes after.

        measure() reads MLX's active memory; evict_one() closes the least recently
        used idle session and says whether there was one.
        """
        active = measure()
        while self.memory_budget_bytes is not None and active > self.memory_budget_bytes and await evict_one():
            active = measure()
        return active

    async def check_memory(self, measure: Callable[[], int], evict_one: Callable[[], Awaitable[bool]]) -> None:
        """Within budget, or made so by evicting idle sessions (LRU first); else reject."""
        active = await self.fit_memory(measure, evict_one)
        budget = self.memory_budget_bytes
        if budget is not None and active > budget:
            raise self.reject(
                "memory_budget_bytes",
                f"memory budget exceeded: MLX active memory is {active} bytes, over "
                f"memory_budget_bytes={budget}, and no idle session is left to evict",
            )

    async def acquire_generation(self) -> None:
        """Take a generation slot, waiting in FIFO order if the policy is 'queue'."""
        if self.active_generations < self.max_generations and not self.queued_generations:
            self.active_generations += 1
            return
        if self.queue_policy == "reject":
            raise self.reject(
                "max_concurrent_generations",
                f"all generation slots are busy (max_concurrent_generations={self.max_generations}, "
                "queue_policy=reject); try again shortly",
            )
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), self.max_queue_wait_s)
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                self.release_generation()  # the slot arrived just as we gave up: pass it on
            else:
                waiter.cancel()
            if isinstance(exc, asyncio.TimeoutError):
                raise self.reject(
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

    def release_generation(self) -> None:
        """Hand the slot to the longest waiter, or free it."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.active_generations -= 1
