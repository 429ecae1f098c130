"""The local snapshotter: what external-snapshotter does on a cluster. A VolumeSnapshot of
a claim becomes a CSI snapshot and a VolumeSnapshotContent (`snapcontent-<uid>`, cluster
scoped) that records it: the snapshotHandle, the size, and the source's volume mode, which
the provisioner checks before a restore (users allow a change of mode with an annotation on
the content, as in Kubernetes). The VolumeSnapshot's status repeats the handle for
`pvlun get`. Deleting the snapshot deletes both (deletionPolicy Delete).

A failed CreateSnapshot (RESOURCE_EXHAUSTED on a full pool, UNAVAILABLE while the driver
stops) is retried with exponential backoff, as external-snapshotter's rate-limited queue does;
its error stays in the status, and a Warning event says it, until a try succeeds."""

from __future__ import annotations

import time

import grpc

from csi.proto import csi_pb2 as pb
from csi import DRIVER_NAME
from controlplane.context import Context
from controlplane.provisioner import claim_populated
from controlplane.source_protection import PVC_AS_SOURCE, being_read, reading
from controlplane.store import Obj, now, remove_finalizer
from controlplane.user_text import user_text

FINALIZER = "snapshot.storage.kubernetes.io/volumesnapshot-bound-protection"
CONTENT_KIND = "VolumeSnapshotContent"
RETRY_FIRST, RETRY_MAX = 1.0, 300.0  # seconds before the first retry of a failed snapshot; the longest wait


def _retries(ctx: Context) -> dict[str, tuple[int, float]]:
    """Snapshot uid → (failed tries, monotonic time of the next try). In memory: a restart
    tries again at once, as a restarted external-snapshotter does."""
    return ctx.services.setdefault("snapshot_retries", {})


def content_name(snap: Obj) -> str:
    return f"snapcontent-{snap['metadata']['uid']}"


def _record_content(ctx: Context, snap: Obj, handle: str, size: int, volume_handle: str,
                    source_mode: str | None) -> None:
    """Make the snapshot's VolumeSnapshotContent unless it exists (a user's annotations on
    it are kept). `source_mode` None: not known any more (the source claim is gone)."""
    name = content_name(snap)
    if ctx.store.get(CONTENT_KIND, name, "") is not None:
        return
    meta = snap["metadata"]
    spec: Obj = {"deletionPolicy": "Delete", "driver": DRIVER_NAME, "source": {"volumeHandle": volume_handle},
                 "volumeSnapshotRef": {"apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
                                       "name": meta["name"], "namespace": meta.get("namespace", "default"),
                                       "uid": meta["uid"]}}
    if source_mode:
        spec["sourceVolumeMode"] = source_mode
    ctx.store.apply({"apiVersion": "snapshot.storage.k8s.io/v1", "kind": CONTENT_KIND,
                     "metadata": {"name": name}, "spec": spec})
    ctx.store.update_status(CONTENT_KIND, name, "", {"snapshotHandle": handle, "readyToUse": True,
                                                     "restoreSize": size})


def _volume_mode(pvc: Obj | None) -> str | None:
    return ((pvc or {}).get("spec") or {}).get("volumeMode") or ("Filesystem" if pvc else None)


def reconcile_volume_snapshot(ctx: Context, snap: Obj) -> float | None:
    meta = snap["metadata"]
    ns = meta.get("namespace", "default")
    status = snap.get("status") or {}
    if meta.get("deletionTimestamp"):
        _retries(ctx).pop(meta["uid"], None)
        if being_read(ctx, snap):
            return None  # a claim is being restored from it: that restore's end brings it back here
        handle = status.get("snapshotHandle")
        if handle:
            try:
                ctx.csi.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=handle))
            except grpc.RpcError as exc:
                ctx.store.add_event(snap, "Warning", "SnapshotDeleteError", user_text(exc))
                return
        ctx.store.delete(CONTENT_KIND, content_name(snap), "")
        remove_finalizer(ctx.store, snap, FINALIZER)
        return
    claim = (snap.get("spec") or {}).get("source", {}).get("persistentVolumeClaimName")
    if status.get("readyToUse"):
        if ctx.store.get(CONTENT_KIND, content_name(snap), "") is None:  # made before contents were recorded
            pvc = ctx.store.get("PersistentVolumeClaim", claim, ns) if claim else None
            pv = ctx.store.get("PersistentVolume", pvc["spec"].get("volumeName", "")) if pvc else None
            _record_content(ctx, snap, status["snapshotHandle"], int(status.get("restoreSize") or 0),
                            ((pv or {}).get("spec") or {}).get("csi", {}).get("volumeHandle", ""), _volume_mode(pvc))
        return
    failed, due = _retries(ctx).get(meta["uid"], (0, 0.0))
    if time.monotonic() < due:
        return due - time.monotonic()  # backing off: look again when the next try is due
    pvc = ctx.store.get("PersistentVolumeClaim", claim, ns) if claim else None
    if not pvc or not claim_populated(ctx, pvc):
        ctx.store.update_status("VolumeSnapshot", meta["name"], ns, {
            "readyToUse": False, "error": None if claim else {"message": "spec.source.persistentVolumeClaimName is required"}})
        return
    pv = ctx.store.get("PersistentVolume", pvc["spec"]["volumeName"])
    if FINALIZER not in meta.get("finalizers", []):
        ctx.store.patch_metadata("VolumeSnapshot", meta["name"], ns, finalizers=meta.get("finalizers", []) + [FINALIZER])
    volume_handle = pv["spec"]["csi"]["volumeHandle"]
    try:
        with reading(ctx, "PersistentVolumeClaim", claim, ns, PVC_AS_SOURCE):
            created = ctx.csi.controller.CreateSnapshot(pb.CreateSnapshotRequest(
                name=f"snapshot-{meta['uid']}", source_volume_id=volume_handle)).snapshot
    except grpc.RpcError as exc:
        delay = min(RETRY_MAX, RETRY_FIRST * 2 ** min(failed, 16))
        _retries(ctx)[meta["uid"]] = (failed + 1, time.monotonic() + delay)
        text = user_text(exc)
        ctx.store.update_status("VolumeSnapshot", meta["name"], ns, {
            "readyToUse": False, "error": {"message": text, "time": now()}})
        ctx.store.add_event(snap, "Warning", "SnapshotCreationFailed", f"{text} (trying again in {delay:g} s)")
        return delay
    _retries(ctx).pop(meta["uid"], None)
    # the content first: a ready snapshot always has one for the provisioner to check
    _record_content(ctx, snap, created.snapshot_id, created.size_bytes, volume_handle, _volume_mode(pvc))
    ctx.store.update_status("VolumeSnapshot", meta["name"], ns, {
        "readyToUse": created.ready_to_use, "snapshotHandle": created.snapshot_id,
        "restoreSize": str(created.size_bytes), "boundVolumeSnapshotContentName": content_name(snap)})
    ctx.store.add_event(snap, "Normal", "SnapshotCreated", f"snapshot {created.snapshot_id} of claim {claim}")
