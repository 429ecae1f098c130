"""VirtualMachineInstanceReplicaSet controller (KubeVirt's replicaset controller), the same in
both modes: it only makes and deletes VMIs; each runs as a VMI applied alone does
(virt/vmi_alone.py: its own finalizer, its guest stopped before it goes).

- Its VMIs are the ones it controls (ownerReferences, by uid) whose labels its selector
  selects; one whose labels no longer match is released (virt/replica_claims.py).
  Active: not Succeeded or Failed and not being deleted.
- Too few active: new VMIs of the template, named as a `generateName` of the template's name
  (else its generateName, else the replica set's name) would be, owned by the replica set.
- Too many: KubeVirt deletes the first ones it lists; pvlun deletes those not yet Running
  first (KubeVirt's stated order: not yet running ones before the others), then the newest.
- Finished VMIs are deleted, so that new ones take their place (KubeVirt's cleanFinishedVmis),
  but each counts a failure in a row and the next VMI waits an exponential delay
  (virt/replica_backoff.py) until every wanted VMI runs: ReplicaFailure (FailedCreate) says
  how many failed, why the last did, and how long the wait is.
- `spec.paused`: nothing is made or deleted; status still follows (ReplicaPaused).
Its status: replicas and readyReplicas of the active VMIs, labelSelector, ReplicaFailure
(FailedCreate or FailedDelete) and ReplicaPaused conditions (virt/replica_status.py).
"""

from __future__ import annotations

import logging

from controlplane.admission import admit
from controlplane.context import Context
from controlplane.label_selectors import matches
from controlplane.replica_specs import (BURST_REPLICAS, generated_name, replica_set_vmi, replicas_of,
                                        vmi_base_name)
from controlplane.store import Conflict, Obj
from controlplane.user_text import user_text
from virt import replica_backoff
from virt.replica_claims import claimed
from virt.replica_status import REPLICA_SET_PAUSE, is_ready, write_status

log = logging.getLogger("pvlun.virt")
KIND = "VirtualMachineInstanceReplicaSet"
FINISHED = ("Succeeded", "Failed")


def _phase(vmi: Obj) -> str:
    return (vmi.get("status") or {}).get("phase") or ""


def _vmis(ctx: Context, rs: Obj) -> list[Obj]:
    return claimed(ctx, rs, "VirtualMachineInstance")


def _active(vmis: list[Obj]) -> list[Obj]:
    return [v for v in vmis if _phase(v) not in FINISHED and not v["metadata"].get("deletionTimestamp")]


def _create(ctx: Context, rs: Obj, count: int) -> None:
    ns, base = rs["metadata"].get("namespace", "default"), vmi_base_name(rs)
    for _ in range(count):
        vmi = replica_set_vmi(rs, generated_name(base))
        admit(vmi, f"replica set {rs['metadata']['name']}")  # as `pvlun apply` would take it
        try:
            vmi = ctx.store.create(vmi)
        except Conflict:  # the 5 random characters met a name in use: the next pass draws again
            continue
        ctx.store.add_event(rs, "Normal", "SuccessfulCreate", "Started the virtual machine by creating the new "
                                                              f"virtual machine instance {vmi['metadata']['name']}")
        log.info("replica set %s/%s: VMI %s created", ns, rs["metadata"]["name"], vmi["metadata"]["name"])


def _delete(ctx: Context, rs: Obj, vmis: list[Obj], why: str) -> list[Obj]:
    """The VMIs deleted (those gone meanwhile left out)."""
    ns, deleted = rs["metadata"].get("namespace", "default"), []
    for vmi in vmis:
        if ctx.store.delete("VirtualMachineInstance", vmi["metadata"]["name"], ns):
            ctx.store.add_event(rs, "Normal", "SuccessfulDelete", f"{why} {vmi['metadata'].get('uid', '')}")
            deleted.append(vmi)
    return deleted


def _why_finished(vmi: Obj) -> str:
    """What a finished VMI says about its end: its reason, else its conditions' messages, else its phase."""
    status = vmi.get("status") or {}
    messages = [c.get("message") for c in status.get("conditions") or [] if isinstance(c, dict) and c.get("message")]
    return f"{vmi['metadata']['name']} {_phase(vmi)}" + (f": {status.get('reason') or messages[-1]}"
                                                         if status.get("reason") or messages else "")


def _clean_finished(ctx: Context, rs: Obj, vmis: list[Obj]) -> None:
    """Finished VMIs deleted, each one failure in a row of the replica set."""
    finished = [v for v in vmis if _phase(v) in FINISHED and not v["metadata"].get("deletionTimestamp")]
    deleted = _delete(ctx, rs, finished[:BURST_REPLICAS], "Deleted finished virtual machine:")
    if deleted:
        failures = replica_backoff.note(rs["metadata"]["uid"], len(deleted), _why_finished(deleted[-1]))
        log.info("replica set %s: %d VMIs finished in a row, the next in %.0f s", rs["metadata"]["name"],
                 failures.count, failures.delay())


def _backoff_failure(uid: str) -> tuple[str, str] | None:
    failures = replica_backoff.current(uid)
    if failures is None:
        return None
    return "FailedCreate", (f"{failures.count} VMIs in a row finished before all replicas ran "
                            f"(last {failures.message}); a new VMI is created {failures.delay():.0f} s after the last "
                            "failure")


def scale_in_order(vmis: list[Obj]) -> list[Obj]:
    """Which VMIs a scale-in deletes first: those not Running, then the newest."""
    newest_first = sorted(vmis, key=lambda v: (v["metadata"].get("creationTimestamp", ""), v["metadata"]["name"]),
                          reverse=True)
    return sorted(newest_first, key=lambda v: _phase(v) == "Running")


def reconcile_vmi_replica_set(ctx: Context, rs: Obj) -> float | None:
    meta, spec = rs["metadata"], rs.get("spec") or {}
    ns = meta.get("namespace", "default")
    labels = ((spec.get("template") or {}).get("metadata") or {}).get("labels") or {}
    try:
        if meta.get("deletionTimestamp") or not labels or not matches(spec.get("selector"), labels):
            replica_backoff.reset(meta.get("uid", ""))
            return None  # going (its VMIs follow through the garbage collector), or invalid: left alone, as KubeVirt
    except ValueError:
        return None
    vmis, uid = _vmis(ctx, rs), meta["uid"]
    failure, wait = None, 0.0
    if not spec.get("paused"):
        step = "FailedDelete"  # of the finished ones first
        try:
            _clean_finished(ctx, rs, vmis)
            active = _active(_vmis(ctx, rs))
            diff, wait = len(active) - replicas_of(spec), replica_backoff.wait_left(uid)
            step = "FailedCreate" if diff < 0 else "FailedDelete"
            if diff < 0 and not wait:
                _create(ctx, rs, min(-diff, BURST_REPLICAS))
            elif diff > 0:
                _delete(ctx, rs, scale_in_order(active)[:min(diff, BURST_REPLICAS)],
                        "Stopped the virtual machine by deleting the virtual machine instance")
        except Conflict:
            raise
        except Exception as exc:  # noqa: BLE001 - reported on the replica set (ReplicaFailure), retried
            failure = (step, user_text(exc))
    active = _active(_vmis(ctx, rs))
    if len(active) >= replicas_of(spec) and all(_phase(v) == "Running" for v in active):
        replica_backoff.reset(uid)  # every wanted VMI runs
    write_status(ctx, ctx.store.get(KIND, meta["name"], ns) or rs, len(active), sum(map(is_ready, active)),
                 failure or _backoff_failure(uid), REPLICA_SET_PAUSE)
    if failure:
        return 10.0
    return wait or None  # a backoff: look again when it ends
