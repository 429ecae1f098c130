"""Why a VirtualMachineInstanceReplicaSet whose VMIs keep failing does not churn: each
finished VMI it deletes counts one failure in a row, and its next VMI is made only
`min(300, 5 * 2**(failures-1))` seconds after the last one (the VM controller's
CrashLoopBackOff cap, virt/reconcile.py); once every wanted VMI runs, the count starts
again. KubeVirt bounds the same loop by its expectations and the rate-limited queue;
here the reconcile says when to look again. Held per replica set (by uid) in this
process: a restarted daemon starts again from the first delay."""

from __future__ import annotations

import threading
import time
from typing import NamedTuple

BASE_SECONDS, CAP_SECONDS = 5.0, 300.0


class Failures(NamedTuple):
    """Failures in a row, when the last was seen, and what it said."""
    count: int
    last: float
    message: str

    def delay(self) -> float:
        return min(CAP_SECONDS, BASE_SECONDS * 2 ** (self.count - 1)) if self.count else 0.0


_lock = threading.Lock()
_failures: dict[str, Failures] = {}


def clock() -> float:
    """Seconds now (a function of its own so that tests can move time on)."""
    return time.monotonic()


def note(uid: str, count: int, message: str) -> Failures:
    """`count` more VMIs of the replica set finished; `message` says why the last did."""
    with _lock:
        old = _failures.get(uid)
        _failures[uid] = Failures((old.count if old else 0) + count, clock(), message)
        return _failures[uid]


def current(uid: str) -> Failures | None:
    with _lock:
        return _failures.get(uid)


def wait_left(uid: str) -> float:
    """Seconds before the replica set may make a VMI again (0: now)."""
    failures = current(uid)
    return max(0.0, failures.last + failures.delay() - clock()) if failures else 0.0


def reset(uid: str) -> None:
    """Every wanted VMI runs: the next failure waits the first delay again."""
    with _lock:
        _failures.pop(uid, None)
