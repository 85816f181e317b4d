"""A bounded worker pool: at most ``workers`` analyses run (in threads, off the event loop) and at most
``queue_size`` wait. Anything beyond is refused at once with 503 + Retry-After, so overload shows
up as fast, honest refusals instead of piling-up requests that all time out.
"""
from __future__ import annotations

import asyncio
import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

from ..errors import DermfusionError

T = TypeVar("T")


class Overloaded(DermfusionError):
    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class InferencePool:
    def __init__(self, workers: int, queue_size: int, queue_timeout_s: float = 30.0):
        self.workers, self.queue_size, self.queue_timeout_s = workers, queue_size, queue_timeout_s
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dermfusion-infer")
        self._sem: asyncio.Semaphore | None = None
        self.pending = 0            # running + waiting (only touched on the event loop)
        self.admitted = 0           # analysis requests let in by the middleware and not yet answered
        self.running = 0
        self._avg_s = 0.5           # running mean of service time, for Retry-After

    @property
    def capacity(self) -> int:
        return self.workers + self.queue_size

    def retry_after(self) -> int:
        waiting = max(0, max(self.pending, self.admitted) - self.workers)
        return max(1, math.ceil((waiting + 1) * self._avg_s / self.workers))

    def try_admit(self) -> bool:
        """Let one more analysis request in (before its body is read) unless ``capacity`` are in already: the
        bound on bodies held in memory and on work queued. Pair with ``leave`` (event loop only)."""
        if self.admitted >= self.capacity:
            return False
        self.admitted += 1
        return True

    def leave(self) -> None:
        self.admitted -= 1

    async def run(self, fn: Callable[[], T]) -> tuple[T, float]:
        """Run ``fn`` in a worker thread; returns (result, seconds waited in the queue)."""
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.workers)
        if self.pending >= self.capacity:
            raise Overloaded(f"server busy: {self.running} analyses running and {self.pending - self.running} "
                             f"queued (limit {self.capacity}); retry shortly", self.retry_after())
        self.pending += 1
        t0 = time.perf_counter()
        try:
            await asyncio.wait_for(self._sem.acquire(), timeout=self.queue_timeout_s)
        except asyncio.TimeoutError:
            self.pending -= 1
            raise Overloaded(f"server busy: no worker free within {self.queue_timeout_s:g} s; retry shortly",
                             self.retry_after()) from None
        except BaseException:  # cancelled while queued (client went away)
            self.pending -= 1
            raise
        waited = time.perf_counter() - t0
        self.running += 1
        t1 = time.perf_counter()

        def release(_fut) -> None:
            # runs when the *thread* finishes, even if the request was cancelled meanwhile, so the
            # semaphore never admits more concurrent analyses than there are workers
            self.running -= 1
            self.pending -= 1
            self._avg_s = 0.8 * self._avg_s + 0.2 * (time.perf_counter() - t1)
            self._sem.release()

        fut = asyncio.get_running_loop().run_in_executor(self.executor, fn)
        fut.add_done_callback(release)
        return await asyncio.shield(fut), waited

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
