"""The local snapshotter: what external-snapshotter does on a cluster. A VolumeSnapshot of
a claim becomes a CSI snapshot; deleting it deletes the snapshot (deletionPolicy Delete).
The VolumeSnapshotContent is folded into the VolumeSnapshot's status (snapshotHandle)."""

from __future__ import annotations

import grpc

from csi.proto import csi_pb2 as pb
from pvlun.context import Context
from pvlun.provisioner import claim_populated
from pvlun.store import Obj, remove_finalizer
from pvlun.user_text import user_text

FINALIZER = "snapshot.storage.kubernetes.io/volumesnapshot-bound-protection"


def reconcile_volume_snapshot(ctx: Context, snap: Obj) -> None:
    meta = snap["metadata"]
    ns = meta.get("namespace", "default")
    status = snap.get("status") or {}
    if meta.get("deletionTimestamp"):
        handle = status.get("snapshotHandle")
        if handle:
            try:
                ctx.csi.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=handle))
            except grpc.RpcError as exc:
                ctx.store.add_event(snap, "Warning", "SnapshotDeleteError", user_text(exc))
                return
        remove_finalizer(ctx.store, snap, FINALIZER)
        return
    if status.get("readyToUse") or status.get("error"):
        return
    claim = (snap.get("spec") or {}).get("source", {}).get("persistentVolumeClaimName")
    pvc = ctx.store.get("PersistentVolumeClaim", claim, ns) if claim else None
    if not pvc or not claim_populated(ctx, pvc):
        ctx.store.update_status("VolumeSnapshot", meta["name"], ns, {
            "readyToUse": False, "error": None if claim else {"message": "spec.source.persistentVolumeClaimName is required"}})
        return
    pv = ctx.store.get("PersistentVolume", pvc["spec"]["volumeName"])
    if FINALIZER not in meta.get("finalizers", []):
        ctx.store.patch_metadata("VolumeSnapshot", meta["name"], ns, finalizers=meta.get("finalizers", []) + [FINALIZER])
    try:
        created = ctx.csi.controller.CreateSnapshot(pb.CreateSnapshotRequest(
            name=f"snapshot-{meta['uid']}", source_volume_id=pv["spec"]["csi"]["volumeHandle"])).snapshot
    except grpc.RpcError as exc:
        ctx.store.update_status("VolumeSnapshot", meta["name"], ns, {
            "readyToUse": False, "error": {"message": user_text(exc)}})
        return
    ctx.store.update_status("VolumeSnapshot", meta["name"], ns, {
        "readyToUse": created.ready_to_use, "snapshotHandle": created.snapshot_id,
        "restoreSize": str(created.size_bytes), "boundVolumeSnapshotContentName": f"snapcontent-{meta['uid']}"})
    ctx.store.add_event(snap, "Normal", "SnapshotCreated", f"snapshot {created.snapshot_id} of claim {claim}")
