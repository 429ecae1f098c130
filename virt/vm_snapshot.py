"""VirtualMachineSnapshot and VirtualMachineSnapshotContent reconcile (KubeVirt's snapshot
controller, snapshot.kubevirt.io/v1beta1).

Every disk of the VM (its dataVolume and persistentVolumeClaim volumes) is captured by ONE
CSI group snapshot (CreateVolumeGroupSnapshot, named `vmsnapshot-<snapshot uid>`, so a retry
after a crash finds the same group), taken while a running guest is held still by
`VmLauncher.quiesced()` — the pause is only as long as the group snapshot. Each member is
recorded as a VolumeSnapshotContent (with the group's handle, as external-snapshotter records
a group's members) and a VolumeSnapshot bound to it, `vmsnapshot-<uid>-volume-<volume>`, so a
claim or a DataVolume can be restored from it; the VirtualMachineSnapshotContent
`vmsnapshot-content-<uid>` keeps the VM as it was (spec.source.virtualMachine) and the
volumeBackups. The snapshot is Succeeded and readyToUse once every VolumeSnapshot is.

Deleting a snapshot (deletionPolicy Delete, the default) deletes its content, which it owns;
the content's deletion deletes the group snapshot and its VolumeSnapshots. Claims restored
from it keep their volumes (a restored volume never depends on its snapshot's bytes).

On a cluster (`pvlun controller`) the controller reaches neither QEMU's monitor nor the CSI
driver: each disk gets its own VolumeSnapshot of the same name, which the external-snapshotter
cuts while a running guest is frozen through its launcher Pod — virt/vm_snapshot_cluster.py.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from datetime import datetime, timezone
from typing import Iterator

import grpc

from csi.proto import csi_pb2 as pb
from controlplane.context import Context
from controlplane.kube_kinds import ApiError
from controlplane.instancetype_revisions import vm_as_run
from controlplane.provisioner import claim_populated
from controlplane.store import Obj, now, remove_finalizer, set_condition
from controlplane.user_text import user_text
from controlplane.vm_snapshot_spec import (API_VERSION, DEFAULT_FAILURE_DEADLINE, content_name, parse_duration,
                                           volume_snapshot_name)
from controlplane.vm_spec import SpecError
from virt.launcher import Phase
from virt.qmp_session import QmpError
from virt.reconcile import key_of, runtime
from virt.runtime import CSI_SOURCES, Running
from virt.vm_snapshot_cluster import (CLUSTER_INDICATION_TEXT, ClusterSnapshotError, ForeignVolumeSnapshot,
                                      create_volume_snapshots, frozen, running_vmi, snapshot_class, wait_cut)

log = logging.getLogger("pvlun.virt")
CONTENT = "VirtualMachineSnapshotContent"
FINALIZER = "snapshot.kubevirt.io/vmsnapshot-protection"
CONTENT_FINALIZER = "snapshot.kubevirt.io/vmsnapshotcontent-protection"
GROUP_HANDLE = "volumeGroupSnapshotHandle"  # in the content's status (no manifest sets a status): its CSI group
PAUSE_ANNOTATION = "pvlun.dev/guest-pause-seconds"  # on the content: how long the guest was held (stop→cont)
WAIT = 0.5  # seconds between looks while waiting on the VM, its claims or the VolumeSnapshots


def _status(ctx: Context, snap: Obj, phase: str, *, progressing: tuple[bool, str], ready: tuple[bool, str],
            error: str | None = None, **fields) -> None:
    meta = snap["metadata"]
    status = dict(snap.get("status") or {})
    status.update(phase=phase, readyToUse=phase == "Succeeded", **fields)
    if error:
        status["error"] = {"time": now(), "message": error}
    set_condition(status, "Progressing", progressing[0], progressing[1], progressing[1])
    set_condition(status, "Ready", ready[0], ready[1], ready[1])
    ctx.store.update_status("VirtualMachineSnapshot", meta["name"], meta.get("namespace", "default"), status)


def _fail(ctx: Context, snap: Obj, message: str) -> None:
    _status(ctx, snap, "Failed", progressing=(False, "Operation failed"), ready=(False, "Operation failed"),
            error=message)
    ctx.store.add_event(snap, "Warning", "VirtualMachineSnapshotFailed", message)


def age_seconds(obj: Obj) -> float:
    created = obj["metadata"].get("creationTimestamp")
    if not created:
        return 0.0
    stamp = datetime.strptime(created, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    return time.time() - stamp.timestamp()


def _claims(ctx: Context, vm: Obj) -> tuple[list[tuple[str, Obj, str]], list[str], str | None]:
    """([(volume, claim, CSI volume id)], excluded volume names, what is still awaited or None)."""
    _vm, parsed = vm_as_run(ctx.store, vm)
    ns = vm["metadata"].get("namespace", "default")
    included, excluded = [], []
    for volume in parsed.template.volumes:
        if volume.source not in CSI_SOURCES:
            excluded.append(volume.name)  # cloud-init, containerDisk, emptyDisk: nothing to keep
            continue
        pvc = ctx.store.get("PersistentVolumeClaim", volume.claim_name, ns)
        if pvc is None or not claim_populated(ctx, pvc):
            return [], [], f"waiting for volume {volume.name} (claim {volume.claim_name}) to be bound and populated"
        if ctx.cluster is not None:  # the external-snapshotter finds the volume itself
            included.append((volume.name, pvc, ""))
            continue
        pv = ctx.store.get("PersistentVolume", pvc["spec"]["volumeName"], "")
        included.append((volume.name, pvc, pv["spec"]["csi"]["volumeHandle"]))
    return included, excluded, None


@contextlib.contextmanager
def _held_still(running: Running | None, indications: list[str]) -> Iterator[None]:
    """A running guest quiesced for the group snapshot (its indications added); a stopped VM as it is."""
    if running is None or running.launcher.phase not in (Phase.RUNNING, Phase.PAUSED):
        yield
        return
    indications.append("Online")
    if running.launcher.phase is Phase.PAUSED:
        indications.append("Paused")
    with running.launcher.quiesced() as how:
        indications.extend(["GuestAgent", how] if how == "QuiesceFailed" else [how])
        yield


def _take(ctx: Context, snap: Obj, vm: Obj) -> float | None:
    """Quiesce, group-snapshot and record; the snapshot then waits for its VolumeSnapshots."""
    meta, ns = snap["metadata"], snap["metadata"].get("namespace", "default")
    key = key_of(vm)
    if ctx.jobs.running("vm:" + key) or ctx.jobs.running("migration:" + key):
        _status(ctx, snap, "InProgress", progressing=(False, "Source not ready: starting, stopping or migrating"),
                ready=(False, "Not ready"), sourceUID=vm["metadata"]["uid"])
        return WAIT
    try:
        included, excluded, waiting = _claims(ctx, vm)
    except SpecError as exc:
        _fail(ctx, snap, f"VirtualMachine {vm['metadata']['name']}: {user_text(exc)}")
        return None
    if waiting:
        _status(ctx, snap, "InProgress", progressing=(False, waiting), ready=(False, "Not ready"),
                sourceUID=vm["metadata"]["uid"])
        return WAIT
    if ctx.cluster is not None:
        return _take_on_cluster(ctx, snap, vm, included, excluded)
    running = runtime(ctx).get(key)
    indications: list[str] = []
    group = None
    try:
        with _held_still(running, indications):
            if included:
                group = ctx.csi.group.CreateVolumeGroupSnapshot(pb.CreateVolumeGroupSnapshotRequest(
                    name=f"vmsnapshot-{meta['uid']}", source_volume_ids=[vid for _v, _c, vid in included])).group_snapshot
    except (grpc.RpcError, QmpError) as exc:  # a full pool, a QEMU that went away: tried again until the deadline
        _status(ctx, snap, "InProgress", progressing=(False, f"snapshot failed: {user_text(exc)}"),
                ready=(False, "Not ready"), error=user_text(exc), sourceUID=vm["metadata"]["uid"])
        ctx.store.add_event(snap, "Warning", "VolumeGroupSnapshotFailed", user_text(exc))
        return 5.0
    held = running is not None and "Online" in indications and "Paused" not in indications
    pause = running.launcher.last_pause_seconds if held else None
    if pause is not None:
        log.info("VM snapshot %s/%s: guest held %.1f ms (QMP stop→cont)", ns, meta["name"], pause * 1000)
        ctx.store.add_event(snap, "Normal", "GuestQuiesced",
                            f"guest held still {pause * 1000:.1f} ms for the group snapshot of {len(included)} "
                            f"volumes ({', '.join(i for i in indications if i != 'Online')})")
    try:
        _record(ctx, snap, vm, included, group, pause)
    except ForeignContent as exc:
        _fail(ctx, snap, str(exc))
        return None
    return _taken(ctx, snap, vm, included, excluded, indications)


def _taken(ctx: Context, snap: Obj, vm: Obj, included: list[tuple[str, Obj, str]], excluded: list[str],
           indications: list[str], texts: dict[str, str] | None = None) -> float:
    """Recorded: the snapshot now waits for its VolumeSnapshots (_finish)."""
    texts = texts or INDICATION_TEXT
    _status(ctx, snap, "InProgress", progressing=(True, "Source locked and operation in progress"),
            ready=(False, "Not ready"), sourceUID=vm["metadata"]["uid"],
            virtualMachineSnapshotContentName=content_name(snap["metadata"]["uid"]), indications=indications,
            sourceIndications=[{"indication": i, "message": texts.get(i, i)} for i in indications],
            snapshotVolumes={"includedVolumes": [v for v, _c, _i in included], "excludedVolumes": excluded})
    return 0.1


def _take_on_cluster(ctx: Context, snap: Obj, vm: Obj, included: list[tuple[str, Obj, str]],
                     excluded: list[str]) -> float | None:
    """One VolumeSnapshot per volume, cut while a running guest is frozen (vm_snapshot_cluster)."""
    meta, ns = snap["metadata"], snap["metadata"].get("namespace", "default")
    vmi, waiting = running_vmi(ctx, vm)
    if waiting:
        _status(ctx, snap, "InProgress", progressing=(False, waiting), ready=(False, "Not ready"),
                sourceUID=vm["metadata"]["uid"])
        return WAIT
    try:
        members = [(volume_snapshot_name(meta["uid"], v), pvc, snapshot_class(ctx, pvc)) for v, pvc, _i in included]
    except ValueError as exc:
        _fail(ctx, snap, f"VirtualMachine {vm['metadata']['name']}: {exc}")
        return None
    indications: list[str] = []
    try:
        content = _content(ctx, snap, vm, included, "", None)
        with frozen(ctx, vmi, indications) as held:
            create_volume_snapshots(ctx, content, vm["metadata"]["name"], members)
            if held:
                wait_cut(ctx, [name for name, _p, _k in members], ns)
    except (ForeignContent, ForeignVolumeSnapshot) as exc:
        _fail(ctx, snap, str(exc))
        return None
    except (ApiError, ClusterSnapshotError) as exc:  # a launcher or snapshotter not there yet: again until the deadline
        _status(ctx, snap, "InProgress", progressing=(False, f"snapshot failed: {user_text(exc)}"),
                ready=(False, "Not ready"), error=user_text(exc), sourceUID=vm["metadata"]["uid"])
        ctx.store.add_event(snap, "Warning", "VolumeSnapshotFailed", user_text(exc))
        return 5.0
    if "GuestAgent" in indications:
        ctx.store.add_event(snap, "Normal", "GuestQuiesced", f"guest agent froze the guest's filesystems while "
                                                             f"{len(members)} VolumeSnapshots were cut")
    return _taken(ctx, snap, vm, included, excluded, indications, {**INDICATION_TEXT, **CLUSTER_INDICATION_TEXT})


INDICATION_TEXT = {
    "Online": "the VM was running when the snapshot was taken",
    "Paused": "the VM was paused when the snapshot was taken",
    "NoGuestAgent": "no guest agent answered: the guest was paused (not frozen) for the snapshot's instant",
    "GuestAgent": "the guest agent froze the guest's filesystems, and the guest was paused, for the snapshot's instant",
    "QuiesceFailed": "the guest agent refused to freeze the filesystems: the guest was paused (not frozen) for the "
                     "snapshot's instant",
}


def _claim_backup(pvc: Obj) -> Obj:
    """What a restore needs of a claim: its metadata (no server-set fields) and its spec
    (no binding, no data source: the restore names its own)."""
    meta = pvc["metadata"]
    spec = {k: copy.deepcopy(v) for k, v in pvc["spec"].items()
            if k not in ("volumeName", "dataSource", "dataSourceRef")}
    return {"metadata": {k: copy.deepcopy(meta[k]) for k in ("name", "namespace", "labels", "annotations") if k in meta},
            "spec": spec}


class ForeignContent(Exception):
    """A content of this snapshot's name that the controller did not make (a user's, planted)."""


def _content(ctx: Context, snap: Obj, vm: Obj, included: list[tuple[str, Obj, str]], handle: str,
             pause: float | None) -> Obj:
    """The VirtualMachineSnapshotContent: the VM as it is and its volume backups (ForeignContent
    when one of its name was not made for this snapshot)."""
    meta, ns = snap["metadata"], snap["metadata"].get("namespace", "default")
    uid = meta["uid"]
    owned = (snap.get("spec") or {}).get("deletionPolicy", "Delete") == "Delete"
    vm_meta = vm["metadata"]
    content = ctx.store.get(CONTENT, content_name(uid), ns)
    if content is not None and (((content.get("status") or {}).get(GROUP_HANDLE) or "") != handle
                                or (content.get("spec") or {}).get("virtualMachineSnapshotName") != meta["name"]):
        raise ForeignContent(f"VirtualMachineSnapshotContent {content_name(uid)} exists and was not made for this "
                             "snapshot; delete it and the snapshot, then snapshot again")
    content = content or ctx.store.apply({
        "apiVersion": API_VERSION, "kind": CONTENT,
        "metadata": {"name": content_name(uid), "namespace": ns, "finalizers": [CONTENT_FINALIZER],
                     "annotations": {**({PAUSE_ANNOTATION: f"{pause:.6f}"} if pause is not None else {})},
                     **({"ownerReferences": [{"apiVersion": API_VERSION, "kind": "VirtualMachineSnapshot",
                                              "name": meta["name"], "uid": uid, "controller": True}]} if owned else {})},
        "spec": {"virtualMachineSnapshotName": meta["name"],
                 "source": {"virtualMachine": {
                     "metadata": {k: copy.deepcopy(vm_meta[k]) for k in ("name", "namespace", "uid", "labels",
                                                                          "annotations", "generation") if k in vm_meta},
                     "spec": copy.deepcopy(vm.get("spec") or {}), "status": {}}},
                 "volumeBackups": [{"volumeName": v, "persistentVolumeClaim": _claim_backup(pvc),
                                    "volumeSnapshotName": volume_snapshot_name(uid, v)} for v, pvc, _i in included]}})
    if ((content.get("status") or {}).get(GROUP_HANDLE) or "") != handle:  # what its deletion deletes: only ours
        ctx.store.merge_status(CONTENT, content["metadata"]["name"], ns, **{GROUP_HANDLE: handle})
    return content


def _record(ctx: Context, snap: Obj, vm: Obj, included: list[tuple[str, Obj, str]], group, pause: float | None) -> None:
    """The VirtualMachineSnapshotContent, then each member's VolumeSnapshotContent and VolumeSnapshot."""
    ns, uid, vm_meta = snap["metadata"].get("namespace", "default"), snap["metadata"]["uid"], vm["metadata"]
    members = {s.source_volume_id: s for s in group.snapshots} if group is not None else {}
    content = _content(ctx, snap, vm, included, group.group_snapshot_id if group is not None else "", pause)
    for volume, pvc, volume_id in included:
        member = members[volume_id]
        name = volume_snapshot_name(uid, volume)
        if ctx.store.get("VolumeSnapshotContent", name, "") is None:
            ctx.store.apply({"apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshotContent",
                             "metadata": {"name": name},
                             "spec": {"deletionPolicy": "Delete", "driver": "csi.pvlun.dev",
                                      "source": {"snapshotHandle": member.snapshot_id},
                                      "sourceVolumeMode": pvc["spec"].get("volumeMode") or "Filesystem",
                                      "volumeSnapshotRef": {"apiVersion": "snapshot.storage.k8s.io/v1",
                                                            "kind": "VolumeSnapshot", "name": name, "namespace": ns}}})
            ctx.store.update_status("VolumeSnapshotContent", name, "", {
                "snapshotHandle": member.snapshot_id, "readyToUse": member.ready_to_use,
                "restoreSize": member.size_bytes, "volumeGroupSnapshotHandle": group.group_snapshot_id,
                "creationTime": member.creation_time.seconds * 10**9 + member.creation_time.nanos})
        if ctx.store.get("VolumeSnapshot", name, ns) is None:
            ctx.store.apply({"apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
                             "metadata": {"name": name, "namespace": ns,
                                          "labels": {"snapshot.kubevirt.io/source-vm-name": vm_meta["name"]},
                                          "ownerReferences": [{"apiVersion": API_VERSION, "kind": CONTENT,
                                                               "name": content["metadata"]["name"],
                                                               "uid": content["metadata"]["uid"], "controller": True}]},
                             "spec": {"source": {"volumeSnapshotContentName": name}}})


def _finish(ctx: Context, snap: Obj) -> float | None:
    """Recorded: Succeeded once every VolumeSnapshot is ready to use."""
    meta, ns = snap["metadata"], snap["metadata"].get("namespace", "default")
    name = (snap.get("status") or {}).get("virtualMachineSnapshotContentName") or content_name(meta["uid"])
    content = ctx.store.get(CONTENT, name, ns)
    if content is None:
        _fail(ctx, snap, f"its VirtualMachineSnapshotContent {name} is gone")
        return None
    statuses, ready = [], True
    for backup in content["spec"].get("volumeBackups") or []:
        vs = ctx.store.get("VolumeSnapshot", backup["volumeSnapshotName"], ns)
        vs_status = (vs or {}).get("status") or {}
        ready &= bool(vs_status.get("readyToUse"))
        statuses.append({"volumeSnapshotName": backup["volumeSnapshotName"], "readyToUse": bool(vs_status.get("readyToUse")),
                         **({"creationTime": content["metadata"]["creationTimestamp"]} if vs else {})})
    if not ready:
        return WAIT
    ctx.store.merge_status(CONTENT, content["metadata"]["name"], ns, creationTime=content["metadata"]["creationTimestamp"],
                           readyToUse=True, volumeSnapshotStatus=statuses)
    _status(ctx, snap, "Succeeded", progressing=(False, "Operation complete"), ready=(True, "Operation complete"),
            creationTime=content["metadata"]["creationTimestamp"])
    ctx.store.add_event(snap, "Normal", "SuccessfulVirtualMachineSnapshot",
                        f"snapshot of VirtualMachine {snap['spec']['source']['name']}: {len(statuses)} volumes")
    return None


def _drop_unready_content(ctx: Context, name: str | None, ns: str) -> None:
    """A failed snapshot's content that never became ready is deleted (KubeVirt's rule), and
    with it its VolumeSnapshots: a half-taken snapshot leaves nothing behind."""
    content = ctx.store.get(CONTENT, name, ns) if name else None
    if content is not None and not (content.get("status") or {}).get("readyToUse"):
        ctx.store.delete(CONTENT, content["metadata"]["name"], ns)


def reconcile_vm_snapshot(ctx: Context, snap: Obj) -> float | None:
    meta = snap["metadata"]
    ns = meta.get("namespace", "default")
    status = snap.get("status") or {}
    if meta.get("deletionTimestamp"):
        remove_finalizer(ctx.store, snap, FINALIZER)  # its content, if owned, follows by garbage collection
        return None
    if status.get("phase") in ("Succeeded", "Failed"):
        return None
    if FINALIZER not in meta.get("finalizers", []):
        snap = ctx.store.patch_metadata("VirtualMachineSnapshot", meta["name"], ns,
                                        finalizers=meta.get("finalizers", []) + [FINALIZER]) or snap
    spec = snap.get("spec") or {}
    deadline = parse_duration(spec["failureDeadline"], "spec.failureDeadline") \
        if spec.get("failureDeadline") is not None else DEFAULT_FAILURE_DEADLINE
    if deadline and age_seconds(snap) > deadline:  # "0s": no deadline, as KubeVirt has it
        _fail(ctx, snap, f"snapshot deadline exceeded ({spec.get('failureDeadline') or '5m'})")
        _drop_unready_content(ctx, status.get("virtualMachineSnapshotContentName"), ns)
        return None
    if status.get("virtualMachineSnapshotContentName"):
        return _finish(ctx, snap)
    vm = ctx.store.get("VirtualMachine", spec["source"]["name"], ns)
    if vm is None or vm["metadata"].get("deletionTimestamp"):
        _status(ctx, snap, "InProgress", progressing=(False, "Source does not exist"), ready=(False, "Not ready"))
        return WAIT * 4
    return _take(ctx, snap, vm)


def reconcile_vm_snapshot_content(ctx: Context, content: Obj) -> float | None:
    """A content being deleted deletes its CSI group snapshot, then its VolumeSnapshots."""
    meta = content["metadata"]
    ns = meta.get("namespace", "default")
    if not meta.get("deletionTimestamp"):
        return None
    # its VolumeSnapshots first (only those it owns): one a claim is being restored from waits
    # for that restore (source protection), and the group snapshot goes only when they are gone
    waiting = False
    for backup in (content.get("spec") or {}).get("volumeBackups") or []:
        name = backup.get("volumeSnapshotName") if isinstance(backup, dict) else None
        vs = ctx.store.get("VolumeSnapshot", name, ns) if isinstance(name, str) and name else None
        if vs is not None and any(o.get("uid") == meta.get("uid") for o in vs["metadata"].get("ownerReferences") or []):
            ctx.store.delete("VolumeSnapshot", name, ns)
            waiting = waiting or ctx.store.get("VolumeSnapshot", name, ns) is not None
    if waiting:
        return WAIT
    group = (content.get("status") or {}).get(GROUP_HANDLE)
    if group and ctx.csi is not None:
        try:
            ctx.csi.group.DeleteVolumeGroupSnapshot(pb.DeleteVolumeGroupSnapshotRequest(group_snapshot_id=group))
        except grpc.RpcError as exc:
            if exc.code() is not grpc.StatusCode.NOT_FOUND:
                ctx.store.add_event(content, "Warning", "VolumeGroupSnapshotDeleteFailed", user_text(exc))
                return 5.0
    remove_finalizer(ctx.store, content, CONTENT_FINALIZER)
    return None
