"""The controllers' work queue, as client-go's rate-limited workqueue: keys, not objects.

A key waits in the queue at most once however often it is added; a key being processed is
never handed to a second worker — added meanwhile, it comes back once the first is done.
Failures requeue the key after a delay that doubles per failure of that key (capped), and
`forget` resets it after a success. `add_after` serves "look again in N seconds".
"""

from __future__ import annotations

import heapq
import threading
import time
from collections import deque
from typing import Hashable

BASE_DELAY = 0.5  # seconds before the first retry of a failed key
MAX_DELAY = 120.0  # the longest wait between retries of one key


class WorkQueue:
    def __init__(self, base_delay: float = BASE_DELAY, max_delay: float = MAX_DELAY):
        self.base_delay, self.max_delay = base_delay, max_delay
        self._cond = threading.Condition()
        self._queue: deque[Hashable] = deque()
        self._queued: set[Hashable] = set()
        self._processing: set[Hashable] = set()
        self._dirty: set[Hashable] = set()  # added while processing: back in the queue when done
        self._later: list[tuple[float, int, Hashable]] = []  # heap of (due, seq, key)
        self._seq = 0
        self._failures: dict[Hashable, int] = {}
        self._shut = False

    def add(self, key: Hashable) -> None:
        with self._cond:
            self._add(key)

    def _add(self, key: Hashable) -> None:
        if self._shut or key in self._queued:
            return
        if key in self._processing:
            self._dirty.add(key)
            return
        self._queued.add(key)
        self._queue.append(key)
        self._cond.notify()

    def add_after(self, key: Hashable, delay: float) -> None:
        if delay <= 0:
            return self.add(key)
        with self._cond:
            self._seq += 1
            heapq.heappush(self._later, (time.monotonic() + delay, self._seq, key))
            self._cond.notify()

    def add_rate_limited(self, key: Hashable) -> float:
        """Requeue a key whose processing failed; returns the delay chosen."""
        with self._cond:
            failures = self._failures.get(key, 0)
            self._failures[key] = failures + 1
        delay = min(self.max_delay, self.base_delay * 2 ** min(failures, 32))
        self.add_after(key, delay)
        return delay

    def forget(self, key: Hashable) -> None:
        """The key was processed successfully: its next failure starts from the base delay."""
        with self._cond:
            self._failures.pop(key, None)

    def failures(self, key: Hashable) -> int:
        with self._cond:
            return self._failures.get(key, 0)

    def get(self, timeout: float | None = None) -> Hashable | None:
        """The next key to process (call `done` after), or None on timeout or shutdown."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                now = time.monotonic()
                while self._later and self._later[0][0] <= now:
                    self._add(heapq.heappop(self._later)[2])
                if self._queue:
                    key = self._queue.popleft()
                    self._queued.discard(key)
                    self._processing.add(key)
                    return key
                if self._shut:
                    return None
                wait = None if deadline is None else deadline - now
                if self._later:
                    due = self._later[0][0] - now
                    wait = due if wait is None else min(wait, due)
                if wait is not None and wait <= 0:
                    if deadline is not None and now >= deadline:
                        return None
                    continue
                self._cond.wait(wait)

    def done(self, key: Hashable) -> None:
        with self._cond:
            self._processing.discard(key)
            if key in self._dirty:
                self._dirty.discard(key)
                self._add(key)

    def __len__(self) -> int:
        with self._cond:
            return len(self._queue)

    def shut_down(self) -> None:
        with self._cond:
            self._shut = True
            self._cond.notify_all()
