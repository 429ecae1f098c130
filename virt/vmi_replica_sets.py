"""VirtualMachineInstanceReplicaSet controller (KubeVirt's replicaset controller), the same in
both modes: it only makes and deletes VMIs; each runs as a VMI applied alone does
(virt/vmi_alone.py: its own finalizer, its guest stopped before it goes).

- Its VMIs are the ones it controls (ownerReferences, by uid) whose labels its selector
  selects. Active: not Succeeded or Failed and not being deleted.
- Too few active: new VMIs of the template, named as a `generateName` of the template's name
  (else its generateName, else the replica set's name) would be, owned by the replica set.
- Too many: KubeVirt deletes the first ones it lists; pvlun deletes those not yet Running
  first (KubeVirt's stated order: not yet running ones before the others), then the newest.
- Finished VMIs are deleted, so that new ones take their place (KubeVirt's cleanFinishedVmis).
- `spec.paused`: nothing is made or deleted; status still follows (ReplicaPaused).
Its status: replicas and readyReplicas of the active VMIs, labelSelector, ReplicaFailure
(FailedCreate or FailedDelete) and ReplicaPaused conditions (virt/replica_status.py).
"""

from __future__ import annotations

import logging

from controlplane.admission import check_name
from controlplane.context import Context
from controlplane.label_selectors import matches
from controlplane.replica_specs import (BURST_REPLICAS, controlled_by, generated_name, replica_set_vmi, replicas_of,
                                        vmi_base_name)
from controlplane.store import Conflict, Obj
from controlplane.user_text import user_text
from virt.replica_status import REPLICA_SET_PAUSE, is_ready, write_status

log = logging.getLogger("pvlun.virt")
KIND = "VirtualMachineInstanceReplicaSet"
FINISHED = ("Succeeded", "Failed")


def _phase(vmi: Obj) -> str:
    return (vmi.get("status") or {}).get("phase") or ""


def _vmis(ctx: Context, rs: Obj) -> list[Obj]:
    ns, selector = rs["metadata"].get("namespace", "default"), (rs.get("spec") or {}).get("selector")
    return [vmi for vmi in ctx.store.list("VirtualMachineInstance", ns)
            if controlled_by(vmi, rs) and matches(selector, vmi["metadata"].get("labels") or {})]


def _active(vmis: list[Obj]) -> list[Obj]:
    return [v for v in vmis if _phase(v) not in FINISHED and not v["metadata"].get("deletionTimestamp")]


def _create(ctx: Context, rs: Obj, count: int) -> None:
    ns, base = rs["metadata"].get("namespace", "default"), vmi_base_name(rs)
    for _ in range(count):
        vmi = replica_set_vmi(rs, generated_name(base))
        check_name(vmi["metadata"]["name"], ns, "VirtualMachineInstance")
        try:
            vmi = ctx.store.create(vmi)
        except Conflict:  # the 5 random characters met a name in use: the next pass draws again
            continue
        ctx.store.add_event(rs, "Normal", "SuccessfulCreate", "Started the virtual machine by creating the new "
                                                              f"virtual machine instance {vmi['metadata']['name']}")
        log.info("replica set %s/%s: VMI %s created", ns, rs["metadata"]["name"], vmi["metadata"]["name"])


def _delete(ctx: Context, rs: Obj, vmis: list[Obj], why: str) -> None:
    ns = rs["metadata"].get("namespace", "default")
    for vmi in vmis:
        if ctx.store.delete("VirtualMachineInstance", vmi["metadata"]["name"], ns):
            ctx.store.add_event(rs, "Normal", "SuccessfulDelete", f"{why} {vmi['metadata'].get('uid', '')}")


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
            return None  # going (its VMIs follow through the garbage collector), or invalid: left alone, as KubeVirt
    except ValueError:
        return None
    vmis = _vmis(ctx, rs)
    active = _active(vmis)
    failure = None
    if not spec.get("paused"):
        diff = len(active) - replicas_of(spec)
        try:
            if diff < 0:
                _create(ctx, rs, min(-diff, BURST_REPLICAS))
            elif diff > 0:
                _delete(ctx, rs, scale_in_order(active)[:min(diff, BURST_REPLICAS)],
                        "Stopped the virtual machine by deleting the virtual machine instance")
            finished = [v for v in vmis if _phase(v) in FINISHED and not v["metadata"].get("deletionTimestamp")]
            _delete(ctx, rs, finished[:BURST_REPLICAS], "Deleted finished virtual machine:")
        except Conflict:
            raise
        except Exception as exc:  # noqa: BLE001 - reported on the replica set (ReplicaFailure), retried
            failure = ("FailedCreate" if diff < 0 else "FailedDelete", user_text(exc))
        active = _active(_vmis(ctx, rs))
    write_status(ctx, ctx.store.get(KIND, meta["name"], ns) or rs, len(active), sum(map(is_ready, active)), failure,
                 REPLICA_SET_PAUSE)
    return 10.0 if failure else None
