"""What every reconcile function gets: the store, the driver, the nodes, and a place to
run long work (imports, VMs) without blocking the loop."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Callable

from pvlun.csi_client import CsiClient
from pvlun.store import ObjectStore

log = logging.getLogger("pvlun.controllers")


class Jobs:
    """One background thread per key; starting a key that runs is a no-op."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[str, threading.Thread] = {}
        self._cancels: dict[str, threading.Event] = {}

    def start(self, key: str, fn: Callable[[], None]) -> bool:
        with self._lock:
            if key in self._running and self._running[key].is_alive():
                return False
            thread = threading.Thread(target=self._run, args=(key, fn), name=key, daemon=True)
            self._running[key] = thread
            thread.start()
            return True

    def _run(self, key: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception:
            log.exception("job %s failed", key)
        finally:
            with self._lock:
                self._cancels.pop(key, None)

    def running(self, key: str) -> bool:
        with self._lock:
            return key in self._running and self._running[key].is_alive()

    def cancel_event(self, key: str) -> threading.Event:
        """The running job's cancellation flag: set by `cancel(key)`, read by the job between steps."""
        with self._lock:
            return self._cancels.setdefault(key, threading.Event())

    def cancel(self, key: str) -> bool:
        """Ask the job running under `key` to stop; False when none runs."""
        with self._lock:
            if not (key in self._running and self._running[key].is_alive()):
                return False
            self._cancels.setdefault(key, threading.Event()).set()
            return True

    def join_all(self, timeout: float) -> None:
        for thread in list(self._running.values()):
            thread.join(timeout)


@dataclass
class Context:
    store: ObjectStore
    csi: CsiClient
    data_dir: str
    node_ids: list[str]
    jobs: Jobs = field(default_factory=Jobs)
    stopping: threading.Event = field(default_factory=threading.Event)
    services: dict = field(default_factory=dict)  # optional parts: upload server, VM runtime, ...

    @property
    def node_id(self) -> str:
        return self.node_ids[0]
