"""The control loop, shaped as Kubernetes controllers are: a watcher turns store changes into
keys (kind, namespace, name) on one rate-limited work queue, and workers reconcile one key at
a time. The same loop runs on either store (SQLiteStore embedded, KubeStore on a cluster);
which reconcilers it runs is the caller's choice (pvlun/controllers.py).

- A change enqueues the changed object and the objects linked to it (object_links): a
  claim's change reaches its DataVolume, a volume attachment's its claim, and so on.
- A job's end (an import, a VM start) enqueues the object it worked for.
- A reconcile that raises is retried with a per-key exponential backoff (one counted
  ReconcileError event, not one per try); a reconciler may return a number of seconds
  after which its object is looked at again (a backoff of its own). A write refused for a
  stale resourceVersion (Conflict) is retried with the key's backoff, without an event.
- Every RESYNC_SECONDS everything is enqueued once, for what no change announces.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from controlplane.context import Context
from controlplane.object_links import LinkIndex, key_of
from controlplane.instancetypes import KINDS as INSTANCETYPE_KINDS
from controlplane.store import Conflict, Key, Obj
from controlplane.user_text import user_text
from controlplane.work_queue import WorkQueue

log = logging.getLogger("pvlun.controllers")

Reconciler = Callable[[Context, Obj], "float | None"]
RESYNC_SECONDS = 30.0
# Kinds the embedded watcher keeps for their links even though nobody reconciles them.
WATCHED = ("PersistentVolume", "VolumeAttachment", "StorageClass", "VolumeAttributesClass", "VirtualMachineInstance",
           "VolumeSnapshotContent", "StorageProfile", *INSTANCETYPE_KINDS)
# A job's key prefix → the kind of object it works for (its end is that object's change).
JOB_KINDS = {"dv": "DataVolume", "vm": "VirtualMachine", "migration": "VirtualMachineInstance", "cron": "DataImportCron"}


class ControlLoop:
    def __init__(self, ctx: Context, table: list[tuple[str, Reconciler]], queue: WorkQueue | None = None,
                 watched: tuple[str, ...] = WATCHED):
        self.ctx = ctx
        self.watched = watched
        self.by_kind: dict[str, list[Reconciler]] = {}
        for kind, fn in table:
            self.by_kind.setdefault(kind, []).append(fn)
        self.queue = queue or WorkQueue()
        self.index = LinkIndex()
        self._index_lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    # ---- what to reconcile
    def _enqueue(self, keys) -> None:
        for k in keys:
            if k[0] in self.by_kind:
                self.queue.add(k)

    def _changed(self, k: Key) -> None:
        kind, ns, name = k
        obj = self.ctx.store.get(kind, name, ns)
        with self._index_lock:
            touched = self.index.update(k, obj)
        self._enqueue(touched)

    def relist(self) -> None:
        """Read every object again (start, or a watcher that fell behind) and enqueue all."""
        seen: set[Key] = set()
        for kind in list(self.by_kind) + [k for k in self.watched if k not in self.by_kind]:
            for obj in self.ctx.store.list(kind):
                k = key_of(obj)
                seen.add(k)
                with self._index_lock:
                    self.index.update(k, obj)
        with self._index_lock:
            gone = [k for k in self.index.objects if k not in seen]
            for k in gone:
                self.index.update(k, None)
            everything = list(self.index.objects)
        self._enqueue(everything)

    def job_done(self, job_key: str) -> None:
        prefix, _, rest = job_key.partition(":")
        ns, _, name = rest.partition("/")
        if prefix not in JOB_KINDS or not name:
            return
        k = (JOB_KINDS[prefix], ns, name)
        with self._index_lock:
            touched = {k} | self.index.around([k])
        self._enqueue(touched)

    # ---- the two kinds of thread
    def watch(self) -> None:
        store, stopping = self.ctx.store, self.ctx.stopping
        version = store.version()
        listed = False
        next_resync = time.monotonic() + RESYNC_SECONDS
        while not stopping.is_set():
            try:
                if not listed:  # a first list that fails (an API server away) is tried again
                    self.relist()
                    listed = True
                store.wait_for_change(version, timeout=0.5)
                if stopping.is_set():
                    return
                version, changed = store.changes_since(version)
                if changed is None:
                    self.relist()
                else:
                    for k in changed:
                        self._changed(k)
                if time.monotonic() >= next_resync:
                    next_resync = time.monotonic() + RESYNC_SECONDS
                    with self._index_lock:
                        everything = list(self.index.objects)
                    self._enqueue(everything)
            except Exception:  # the watcher must outlive one bad read
                if stopping.is_set():
                    return
                log.exception("watching the store")
                stopping.wait(1.0)

    def work(self) -> None:
        while True:
            k = self.queue.get()
            if k is None:
                return
            try:
                self.reconcile(k)
            except Exception:  # recording the failure failed too: the worker stays
                if not self.ctx.stopping.is_set():
                    log.exception("reconcile %s", k)
            finally:
                self.queue.done(k)

    def reconcile(self, k: Key) -> None:
        kind, ns, name = k
        again: float | None = None
        for fn in self.by_kind.get(kind, []):
            obj = self.ctx.store.get(kind, name, ns)
            if obj is None or self.ctx.stopping.is_set():
                self.queue.forget(k)
                return
            try:
                after = fn(self.ctx, obj)
            except Conflict:  # written meanwhile: look again at what is there then, with the key's backoff
                self.queue.add_rate_limited(k)  # (a cache behind a broken watch stays stale for a while)
                return
            except Exception as exc:  # one bad object must not stop the others: it backs off
                delay = self.queue.add_rate_limited(k)
                log.warning("reconcile %s %s/%s failed (again in %.1f s): %s", kind, ns, name, delay, exc,
                            exc_info=self.queue.failures(k) == 1)
                self.ctx.store.add_event(obj, "Warning", "ReconcileError", user_text(exc))
                return
            if isinstance(after, (int, float)) and after > 0:
                again = after if again is None else min(again, after)
        self.queue.forget(k)
        if again is not None:
            self.queue.add_after(k, again)

    def start(self, workers: int = 1) -> None:
        self.ctx.jobs.on_done = self.job_done
        for target, name in [(self.watch, "watch")] + [(self.work, f"reconcile-{i}") for i in range(workers)]:
            thread = threading.Thread(target=target, name=name, daemon=True)
            self._threads.append(thread)
            thread.start()
        threading.Thread(target=self._stop_when_stopping, name="reconcile-stop", daemon=True).start()

    def _stop_when_stopping(self) -> None:
        self.ctx.stopping.wait()
        self.queue.shut_down()

    def join(self, timeout: float) -> bool:
        """Stop handing out keys and wait up to `timeout` seconds for the watcher and the
        workers to finish what they hold (a daemon stopping: the store closes after this).
        True when they all ended."""
        self.queue.shut_down()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in self._threads)
