"""Per-name and per-ID locks: concurrent calls on the same object are serialized, and one
that waits too long gets ABORTED (the CSI spec's answer for "operation pending")."""

from __future__ import annotations

import threading
from contextlib import ExitStack, contextmanager
from typing import Iterator

from csi.errors import aborted


class KeyedLocks:
    def __init__(self, wait_seconds: float = 5.0):
        self._guard = threading.Lock()
        self._locks: dict[str, list] = {}  # key -> [lock, users]
        self.wait_seconds = wait_seconds

    @contextmanager
    def hold(self, *keys: str) -> Iterator[None]:
        """Hold every key (sorted, so two callers never deadlock) for the block."""
        with ExitStack() as stack:
            for key in sorted(set(k for k in keys if k)):
                stack.enter_context(self._one(key))
            yield

    @contextmanager
    def _one(self, key: str) -> Iterator[None]:
        with self._guard:
            entry = self._locks.setdefault(key, [threading.Lock(), 0])
            entry[1] += 1
        try:
            if not entry[0].acquire(timeout=self.wait_seconds):
                raise aborted(f"an operation on {key} is already in progress; retry later")
            try:
                yield
            finally:
                entry[0].release()
        finally:
            with self._guard:
                entry[1] -= 1
                if entry[1] == 0:
                    self._locks.pop(key, None)
