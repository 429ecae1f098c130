"""Leader election on a coordination.k8s.io/v1 Lease, as client-go's leaderelection does it, over
the ObjectStore interface: several `pvlun controller` replicas run, one reconciles.

The holder renews the Lease's renewTime every `retry` seconds; a candidate takes the Lease
only once it has seen no renewal for leaseDurationSeconds on its own monotonic clock (the
holder died or lost its API server; the clocks of two machines are never compared). Every write carries the resourceVersion it read, so two candidates racing for an
expired Lease cannot both win: the store refuses the second write (Conflict). A holder that
could not renew for `renew_deadline` seconds stops leading before another may take over
(renew_deadline < lease_duration), so two leaders never overlap."""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timezone
from typing import Callable

from controlplane.store import Conflict, ObjectStore

log = logging.getLogger("pvlun.leader")

LEASE_SECONDS, RENEW_DEADLINE, RETRY_SECONDS = 15.0, 10.0, 2.0  # client-go's defaults


def micro_time(t: float) -> str:
    """A Kubernetes MicroTime (RFC 3339 with microseconds, UTC)."""
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_micro_time(text: object) -> float | None:
    if not isinstance(text, str):
        return None
    for layout in ("%Y-%m-%dT%H:%M:%S.%fZ", "%Y-%m-%dT%H:%M:%SZ"):
        try:
            return datetime.strptime(text, layout).replace(tzinfo=timezone.utc).timestamp()
        except ValueError:
            continue
    return None


class LeaderElector:
    def __init__(self, store: ObjectStore, name: str, namespace: str, identity: str, *,
                 lease_seconds: float = LEASE_SECONDS, renew_deadline: float = RENEW_DEADLINE,
                 retry_seconds: float = RETRY_SECONDS, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic):
        if not renew_deadline < lease_seconds:
            raise ValueError("the renew deadline must be shorter than the lease, or two leaders could overlap")
        self.store, self.name, self.namespace, self.identity = store, name, namespace, identity
        self.lease_seconds, self.renew_deadline, self.retry_seconds = lease_seconds, renew_deadline, retry_seconds
        self.clock, self.monotonic = clock, monotonic
        self.leading = threading.Event()
        self._last_renew = 0.0
        self._observed: tuple = ()
        self._observed_at = 0.0

    def try_acquire_or_renew(self) -> bool:
        """One attempt; True when this candidate holds the Lease afterwards."""
        now = self.clock()
        lease = self.store.get("Lease", self.name, self.namespace)
        spec = dict((lease or {}).get("spec") or {})
        holder = spec.get("holderIdentity") or ""
        duration = spec.get("leaseDurationSeconds") if isinstance(spec.get("leaseDurationSeconds"), int) else 0
        # As client-go: the holder's renewTime is its clock, not ours; what counts is when WE saw
        # the record change, on our monotonic clock, so clock skew cannot make two leaders.
        record = (holder, spec.get("renewTime"), (lease or {}).get("metadata", {}).get("resourceVersion"))
        if record != self._observed:
            self._observed, self._observed_at = record, self.monotonic()
        if lease is not None and holder and holder != self.identity and \
                self._observed_at + duration > self.monotonic():
            return False  # someone else holds a lease we saw renewed less than its duration ago
        if holder != self.identity:
            spec["acquireTime"] = micro_time(now)
            spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + (1 if holder else 0)
        spec.update(holderIdentity=self.identity, leaseDurationSeconds=int(self.lease_seconds),
                    renewTime=micro_time(now))
        meta: dict = {"name": self.name, "namespace": self.namespace}
        if lease is not None:
            meta["resourceVersion"] = lease["metadata"].get("resourceVersion")
        try:
            self.store.apply({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": meta, "spec": spec},
                             merge=lambda old, new: _guarded_replace(old, new))
        except Conflict:
            return False
        self._last_renew = self.monotonic()
        return True

    def run(self, stopping: threading.Event, on_started: Callable[[], None], on_stopped: Callable[[], None]) -> None:
        """Campaign until leading, call on_started, renew until `stopping`; on_stopped when
        leadership is lost instead (the caller exits, as client-go's users do: a fresh process
        campaigns again)."""
        while not stopping.is_set():
            if self._attempt():
                break
            stopping.wait(self.retry_seconds)
        else:
            return
        log.info("%s leads (Lease %s/%s)", self.identity, self.namespace, self.name)
        self.leading.set()
        on_started()
        while not stopping.wait(self.retry_seconds):
            if self._attempt():
                continue
            if self.monotonic() - self._last_renew >= self.renew_deadline:
                log.error("%s could not renew Lease %s/%s for %.0f s: no longer leading",
                          self.identity, self.namespace, self.name, self.renew_deadline)
                break
        else:  # asked to stop: the caller releases the Lease
            return
        self.leading.clear()
        on_stopped()

    def release(self) -> None:
        """Give the Lease up at a clean stop, so a standby takes over at once (client-go's
        ReleaseOnCancel): renewTime in the past, holder emptied."""
        lease = self.store.get("Lease", self.name, self.namespace)
        if lease is None or (lease.get("spec") or {}).get("holderIdentity") != self.identity:
            return
        spec = dict(lease["spec"], holderIdentity="", leaseDurationSeconds=1, renewTime=micro_time(0))
        meta = {"name": self.name, "namespace": self.namespace, "resourceVersion": lease["metadata"].get("resourceVersion")}
        try:
            self.store.apply({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": meta, "spec": spec},
                             merge=lambda old, new: _guarded_replace(old, new))
        except Conflict:
            pass
        self.leading.clear()

    def _attempt(self) -> bool:
        try:
            return self.try_acquire_or_renew()
        except Exception as exc:  # an API server away for a moment: the deadline decides
            log.warning("Lease %s/%s: %s", self.namespace, self.name, exc)
            return False


def _guarded_replace(old: dict | None, new: dict) -> dict:
    """The whole spec replaced, but only over the version that was read (the store compares
    resourceVersion; the SQLite store has one writer and no versions to compare)."""
    seen = new["metadata"].get("resourceVersion")
    if old is not None and seen is not None and old["metadata"].get("resourceVersion") not in (None, seen):
        raise Conflict(f"Lease {new['metadata']['name']} changed since it was read")
    merged = dict(old or {}, **{k: v for k, v in new.items() if k != "metadata"})
    merged["metadata"] = dict((old or {}).get("metadata") or {}, **new["metadata"])
    return merged
