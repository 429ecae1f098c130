"""What every reconcile function gets: the store, the driver, the nodes (and their free
attach slots), and a bounded pool to run long work (imports, VMs) without blocking the loop."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from controlplane.csi_client import CsiClient
from controlplane.kubelet import NodeFull
from controlplane.node_slots import NodeSlots
from controlplane.store import ObjectStore

log = logging.getLogger("pvlun.controllers")


@dataclass
class _Job:
    key: str
    fn: Callable[..., None]
    volumes: int | None  # None: needs no node; else the attach slots it needs on the node it gets
    owner: str = ""  # the owner its VolumeAttachments carry
    not_before: float = 0.0


class Jobs:
    """A bounded pool of workers fed by one queue (imports, clones, VM starts and stops).

    One job per key, queued or running; starting a key already there is a no-op. A job
    that needs a node (`start_on_node`) leaves the queue only when a node has the attach
    slots it needs, and goes back to the queue if ControllerPublish still finds the node
    full (`NodeFull`), so a crowd waits for slots instead of failing."""

    WORKERS = 8
    RETRY_FULL = 0.5  # seconds before a job that found its node full is placed again

    def __init__(self, workers: int = WORKERS) -> None:
        self._cond = threading.Condition()
        self._queue: deque[_Job] = deque()
        self._keys: set[str] = set()  # queued or running
        self._workers = workers
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._cancels: dict[str, threading.Event] = {}
        self.slots: NodeSlots | None = None
        self.on_done: Callable[[str], None] | None = None  # told every key that finished

    def start(self, key: str, fn: Callable[[], None]) -> bool:
        return self._submit(_Job(key, fn, None))

    def start_on_node(self, key: str, fn: Callable[[str], None], owner: str, volumes: int = 1) -> bool:
        """Run fn(node) once a node has `volumes` free attach slots, reserved until the job
        ends (from then on the attachments it made, those whose owner is `owner` or
        `owner/...`, count). A node already holding some of them is the one it gets."""
        if self.slots is None:
            raise RuntimeError("Jobs.slots is not set (a Context sets it)")
        if volumes > self.slots.limit:
            raise ValueError(f"needs {volumes} volumes attached on one node; a node takes at most {self.slots.limit}")
        return self._submit(_Job(key, fn, volumes, owner))

    def _submit(self, job: _Job) -> bool:
        with self._cond:
            if job.key in self._keys or self._closed:
                return False
            self._keys.add(job.key)
            self._queue.append(job)
            if len(self._threads) < self._workers:
                thread = threading.Thread(target=self._work, name=f"job-worker-{len(self._threads)}", daemon=True)
                self._threads.append(thread)
                thread.start()
            self._cond.notify()
            return True

    def _take(self) -> tuple[_Job, str | None] | None:
        """The first job that can run now (with its node), out of the queue; caller holds _cond."""
        usage = None
        now = time.monotonic()
        for job in self._queue:
            if job.not_before > now:
                continue
            node = None
            if job.volumes is not None:
                usage = self.slots.usage() if usage is None else usage
                node = self.slots.reserve(job.owner, job.volumes, usage)
                if node is None:
                    continue
            self._queue.remove(job)
            return job, node
        return None

    def _work(self) -> None:
        while True:
            with self._cond:
                while (taken := self._take()) is None:
                    if self._closed:
                        return
                    # jobs waiting for a slot or a retry time are looked at again soon
                    self._cond.wait(0.25 if self._queue else None)
                if self._closed:
                    self._queue.appendleft(taken[0])
                    return
            job, node = taken
            requeued = False
            try:
                job.fn() if job.volumes is None else job.fn(node)
            except NodeFull as exc:
                log.info("job %s: %s; waiting for a free slot", job.key, exc)
                job.not_before = time.monotonic() + self.RETRY_FULL
                requeued = True
            except Exception:
                log.exception("job %s failed", job.key)
            finally:
                if job.volumes is not None:
                    self.slots.release(job.owner)
                with self._cond:
                    if requeued and not self._closed:
                        self._queue.append(job)
                    else:
                        self._keys.discard(job.key)
                        self._cancels.pop(job.key, None)
                    self._cond.notify_all()
            if not requeued and self.on_done is not None:
                try:
                    self.on_done(job.key)
                except Exception:
                    log.exception("after job %s", job.key)

    def running(self, key: str) -> bool:
        """Queued or running."""
        with self._cond:
            return key in self._keys

    def cancel_event(self, key: str) -> threading.Event:
        """The job's cancellation flag: set by `cancel(key)`, read by the job between steps."""
        with self._cond:
            return self._cancels.setdefault(key, threading.Event())

    def cancel(self, key: str) -> bool:
        """Drop the job if it still waits in the queue, else ask it to stop; False when there is none."""
        with self._cond:
            if key not in self._keys:
                return False
            waiting = next((job for job in self._queue if job.key == key), None)
            if waiting is not None:
                self._queue.remove(waiting)
                self._keys.discard(key)
                self._cancels.pop(key, None)
                return True
            self._cancels.setdefault(key, threading.Event()).set()
            return True

    def join_all(self, timeout: float) -> None:
        """Stop taking jobs (queued ones are dropped: start-up repair redoes their work)
        and wait up to `timeout` for the running ones."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._closed = True
            self._queue.clear()
            self._cond.notify_all()
        for thread in list(self._threads):
            thread.join(max(0.0, deadline - time.monotonic()))


@dataclass(frozen=True)
class Cluster:
    """Cluster mode: work that needs a node runs in Pods Kubernetes places (importer and
    launcher Pods of this image); the CSI sidecars and the kubelet drive the driver."""
    image: str
    namespace: str  # the controller's own (its Lease, its Events about itself)
    kvm: bool = False  # launcher Pods ask for /dev/kvm (devices.kubevirt.io/kvm)
    pull_policy: str = "IfNotPresent"
    migration_port: int | None = None  # where migration targets listen; None: KubeVirt's (virt/pods.py)


@dataclass
class Context:
    store: ObjectStore
    csi: CsiClient | None  # None in cluster mode: the sidecars call the driver
    data_dir: str
    node_ids: list[str]
    jobs: Jobs = field(default_factory=Jobs)
    stopping: threading.Event = field(default_factory=threading.Event)
    services: dict = field(default_factory=dict)  # optional parts: upload server, VM runtime, ...
    max_volumes_per_node: int = 256
    cluster: Cluster | None = None
    slots: NodeSlots = field(init=False)

    def __post_init__(self) -> None:
        self.slots = NodeSlots(self.store, self.node_ids, self.max_volumes_per_node)
        self.jobs.slots = self.slots

    @property
    def node_id(self) -> str:
        return self.node_ids[0]
