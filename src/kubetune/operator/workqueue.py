"""A keyed work queue with per-key backoff, as Kubernetes controllers use.

Watch events only say "look at this FineTuneJob again"; many events for one job while it
waits collapse into one reconcile, and a job is never reconciled by two workers at once.
A failed reconcile comes back after an exponential backoff (1 s doubling up to 5 min); a
reconcile may also ask to be looked at again after a delay (polling a running job's
progress).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Hashable

logger = logging.getLogger("kubetune.operator")

BASE_DELAY = 1.0
MAX_DELAY = 300.0


def backoff(failures: int, base: float = BASE_DELAY, cap: float = MAX_DELAY) -> float:
    """Seconds before retry number `failures` (1, 2, 4, … capped)."""
    return float(min(cap, base * 2 ** max(0, failures - 1)))


class WorkQueue:
    """Keys waiting to be processed; each key at most once in the queue and in flight."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[Hashable] = asyncio.Queue()
        self._queued: set[Hashable] = set()
        self._active: set[Hashable] = set()
        self._dirty: set[Hashable] = set()
        self._timers: dict[Hashable, asyncio.TimerHandle] = {}
        self.failures: dict[Hashable, int] = {}

    def add(self, key: Hashable) -> None:
        """Process `key` soon (again after the current pass, if it is in flight)."""
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        if key in self._active:
            self._dirty.add(key)
        elif key not in self._queued:
            self._queued.add(key)
            self._queue.put_nowait(key)

    def add_after(self, key: Hashable, delay: float) -> None:
        """Process `key` after `delay` seconds, unless something adds it sooner."""
        if key in self._queued or key in self._timers:
            return
        loop = asyncio.get_running_loop()
        self._timers[key] = loop.call_later(delay, self._fire, key)

    def _fire(self, key: Hashable) -> None:
        self._timers.pop(key, None)
        self.add(key)

    def __len__(self) -> int:
        return len(self._queued) + len(self._active)

    async def run(
        self, process: Callable[[Hashable], Awaitable[float | None]], workers: int
    ) -> None:
        """Process keys with `workers` concurrent workers until cancelled. `process`
        returns a delay to look again after (or None); an exception retries with backoff."""
        await asyncio.gather(*(self._worker(process) for _ in range(workers)))

    async def _worker(self, process: Callable[[Hashable], Awaitable[float | None]]) -> None:
        while True:
            key = await self._queue.get()
            self._queued.discard(key)
            self._active.add(key)
            started = time.monotonic()
            try:
                again = await process(key)
            except asyncio.CancelledError:
                raise
            except Exception:
                failures = self.failures.get(key, 0) + 1
                self.failures[key] = failures
                delay = backoff(failures)
                logger.exception("Reconciling %s failed (attempt %d); retrying in %.0f s",
                                 key, failures, delay)  # fmt: skip
                again = delay
            else:
                self.failures.pop(key, None)
            finally:
                self._active.discard(key)
            logger.debug("Reconciled %s in %.3f s", key, time.monotonic() - started)
            if key in self._dirty:
                self._dirty.discard(key)
                self.add(key)
            elif again is not None:
                self.add_after(key, again)
