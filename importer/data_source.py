"""CDI's DataSource controller: a DataSource names a claim (usually a DataVolume's) or a
snapshot, and its Ready condition says whether a DataVolume cloning from it (spec.sourceRef)
gets something whole. Reasons as CDI gives them: Ready, NoSource, NotFound, SnapshotNotReady,
or the DataVolume's phase while it is being filled."""

from __future__ import annotations

from controlplane.context import Context
from controlplane.data_source_ref import data_source_target
from controlplane.store import Obj, set_condition

KIND = "DataSource"


def readiness(ctx: Context, ds: Obj) -> tuple[bool, str, str]:
    """(ready, reason, message) of the DataSource's source now."""
    target = data_source_target(ds)
    if target is None:
        return False, "NoSource", "No source PVC set"
    kind, ref = target
    where = f"{ref['namespace']}/{ref['name']}"
    if kind == "snapshot":
        snap = ctx.store.get("VolumeSnapshot", ref["name"], ref["namespace"])
        if snap is None:
            return False, "NotFound", f"VolumeSnapshot {where} not found"
        if (snap.get("status") or {}).get("readyToUse") is not True:
            return False, "SnapshotNotReady", f"VolumeSnapshot {where} is not ready to use"
        return True, "Ready", "DataSource is ready to be consumed"
    dv = ctx.store.get("DataVolume", ref["name"], ref["namespace"])
    if dv is not None:
        phase = (dv.get("status") or {}).get("phase") or "Pending"
        if phase == "Succeeded":
            return True, "Ready", "DataSource is ready to be consumed"
        return False, phase, f"Import DataVolume phase {phase}"
    pvc = ctx.store.get("PersistentVolumeClaim", ref["name"], ref["namespace"])
    if pvc is None:
        return False, "NotFound", f"PersistentVolumeClaim {where} not found"
    if (pvc.get("status") or {}).get("phase") != "Bound":
        return False, "NotFound", f"PersistentVolumeClaim {where} is not bound yet"
    return True, "Ready", "DataSource is ready to be consumed"


def reconcile_data_source(ctx: Context, ds: Obj) -> None:
    """Status.conditions[Ready] and status.source (the source it stands for), written when they change."""
    ready, reason, message = readiness(ctx, ds)
    status = dict(ds.get("status") or {})
    current = next((c for c in status.get("conditions", []) if c.get("type") == "Ready"), None)
    source = (ds.get("spec") or {}).get("source") or {}
    if current and (current["status"], current.get("reason"), current.get("message")) == \
            ("True" if ready else "False", reason, message) and status.get("source") == source:
        return
    set_condition(status, "Ready", ready, reason, message)
    status["source"] = source
    ctx.store.update_status(KIND, ds["metadata"]["name"], ds["metadata"].get("namespace", "default"), status)
