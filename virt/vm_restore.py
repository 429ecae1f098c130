"""VirtualMachineRestore reconcile (KubeVirt's restore controller, snapshot.kubevirt.io/v1beta1).

A restore makes one new claim per volume backup of the snapshot's content, restored from its
VolumeSnapshot (a CSI CreateVolume from the snapshot: on the reflink pool a clone of the
snapshot's file, independent of it), named as KubeVirt names them: `restore-<restore uid>-
<volume>` (volumeRestorePolicy RandomizeNames, the default), `<target>-<volume>`
(PrefixTargetName) or a volumeRestoreOverride's restoreName. Then:

- to the snapshot's own VM (spec.target.name is the source's): the VM must be stopped, as
  KubeVirt requires — targetReadinessPolicy WaitGracePeriod (the default) waits up to 5
  minutes, WaitEventually forever, FailImmediate fails at once, StopTarget asks it to stop.
  Its spec becomes the snapshot's (its run strategy stays what it is now: the user started
  or stopped it), each backed-up volume now a persistentVolumeClaim of its restored claim;
  the DataVolumes of its old dataVolumeTemplates that the restored spec no longer has are
  deleted (status.deletedDataVolumes) — only those the VM owns, never one it merely used.
- to a VM that does not exist (another name): it is made from the snapshot's spec, with the
  restored claims, owned by nothing but itself (the claims are owned by it, volumeOwnershipPolicy
  Vm, the default), spec.patches applied to it first (controlplane/vm_restore_patches.py). An
  existing VM that is not the snapshot's source is refused; a restore to the source ignores
  spec.patches as KubeVirt does, with a Warning event saying so.

The content is anyone's: the VM and claims a restore makes pass `pvlun apply`'s admission, and
each volume gets its own claim, one this restore made (restore.kubevirt.io/uid), or it fails.
The restore waits for its claims to be bound, except one Pending in a WaitForFirstConsumer
class (KubeVirt's rule: it binds once the VM's launcher uses it).
A snapshot, content or VolumeSnapshot gone before the claims are bound fails the restore, and
a VM it held stopped (status.restoreInProgress) is released.

complete, restoreTime, restores and the Progressing/Ready conditions as KubeVirt reports them.
On a cluster (`pvlun controller`) the same: the external-provisioner restores the claims from
their VolumeSnapshots, and a target is stopped when it has no VirtualMachineInstance.
"""

from __future__ import annotations

import copy
import logging

from controlplane.admission import Refused, admit
from controlplane.context import Context
from controlplane.store import Conflict, Obj, now, set_condition
from controlplane.user_text import one_line
from controlplane.vm_restore_patches import apply_patches
from controlplane.vm_snapshot_spec import (DEFAULT_GRACE_PERIOD, check_metadata_map, check_restore,
                                          restore_claim_names)
from virt.reconcile import REQUEST, key_of, runtime
from virt.vm_snapshot import CONTENT, WAIT, age_seconds

log = logging.getLogger("pvlun.virt")
# claim annotations that belonged to the old claim's provisioning (KubeVirt drops the same prefixes)
DROPPED_ANNOTATIONS = ("pv.kubernetes.io", "volume.beta.kubernetes.io", "cdi.kubevirt.io", "volume.kubernetes.io",
                       "k8s.io/CloneRequest", "k8s.io/CloneOf")
RESTORE_NAME = "restore.kubevirt.io/name"  # on a restored claim: the restore that made it (KubeVirt's)
RESTORE_UID = "restore.kubevirt.io/uid"  # and its uid: a later restore of the same name is another one
LAST_RESTORE = "restore.kubevirt.io/lastRestoreUID"  # on the target VM: <restore name>-<restore uid>
PATCHES_NOT_APPLIED = "RestorePatchesNotApplied"  # event: spec.patches of a restore to an existing VM


def _status(ctx: Context, restore: Obj, *, complete: bool, progressing: tuple[bool, str], ready: tuple[bool, str],
            failure: str = "", **fields) -> None:
    meta = restore["metadata"]
    current = ctx.store.get("VirtualMachineRestore", meta["name"], meta.get("namespace", "default")) or restore
    status = dict(current.get("status") or {})
    status.update(complete=complete, **fields)
    set_condition(status, "Progressing", progressing[0], progressing[1], progressing[1])
    set_condition(status, "Ready", ready[0], ready[1], ready[1])
    if failure:
        set_condition(status, "Failure", True, "Operation failed", failure)
    ctx.store.update_status("VirtualMachineRestore", meta["name"], meta.get("namespace", "default"), status)


def _wait(ctx: Context, restore: Obj, why: str) -> float:
    _status(ctx, restore, complete=False, progressing=(False, why), ready=(False, why))
    return WAIT


def _fail(ctx: Context, restore: Obj, message: str) -> None:
    """Failed for good; a target this restore held stopped may start again."""
    _status(ctx, restore, complete=False, progressing=(False, "Operation failed"), ready=(False, message),
            failure=message)
    ctx.store.add_event(restore, "Warning", "VirtualMachineRestoreError", message)
    target = ((restore.get("spec") or {}).get("target") or {}).get("name")
    ns = restore["metadata"].get("namespace", "default")
    if isinstance(target, str) and _holds(ctx.store.get("VirtualMachine", target, ns), restore):
        _release(ctx, target, ns)


def _holds(vm: Obj | None, restore: Obj) -> bool:
    """The VM is held stopped by this restore (KubeVirt's status.restoreInProgress)."""
    return ((vm or {}).get("status") or {}).get("restoreInProgress") == restore["metadata"]["name"]


def _release(ctx: Context, vm: str, ns: str) -> None:
    """The VM may start again: no restore of its disks is in progress."""
    current = ctx.store.get("VirtualMachine", vm, ns)
    status = dict((current or {}).get("status") or {})
    if status.pop("restoreInProgress", None) is not None:
        ctx.store.update_status("VirtualMachine", vm, ns, status)


def _failed(restore: Obj) -> bool:
    return any(c.get("type") == "Failure" and c.get("status") == "True"
               for c in (restore.get("status") or {}).get("conditions") or [])


def _target_busy(ctx: Context, vm: Obj) -> bool:
    key = key_of(vm)
    ns, name = key.split("/", 1)
    return bool((ctx.cluster is None and runtime(ctx).get(key)) or ctx.jobs.running("vm:" + key)
                or ctx.store.get("VirtualMachineInstance", name, ns))


def _not_ready(ctx: Context, restore: Obj, vm: Obj) -> float | None:
    """The running target, as its targetReadinessPolicy says: wait (WAIT), or None once failed."""
    policy = (restore.get("spec") or {}).get("targetReadinessPolicy") or "WaitGracePeriod"
    name = vm["metadata"]["name"]
    if policy == "FailImmediate":
        _fail(ctx, restore, f"restore target VirtualMachine {name} is not stopped (targetReadinessPolicy FailImmediate)")
        return None
    if policy == "WaitGracePeriod" and age_seconds(restore) > DEFAULT_GRACE_PERIOD:
        _fail(ctx, restore, f"restore target VirtualMachine {name} was not stopped within {DEFAULT_GRACE_PERIOD:g} s "
                            "(targetReadinessPolicy WaitGracePeriod)")
        return None
    if policy == "StopTarget" and not (vm["metadata"].get("annotations") or {}).get(REQUEST):
        ctx.store.annotate("VirtualMachine", name, vm["metadata"].get("namespace", "default"), **{REQUEST: "stop"})
    return _wait(ctx, restore, f"Waiting for target VirtualMachine {name} to be stopped")


def _claim(restore: Obj, backup: Obj, name: str, owner: Obj | None) -> Obj:
    old = backup.get("persistentVolumeClaim") or {}
    meta = old.get("metadata") or {}
    annotations = {k: v for k, v in (meta.get("annotations") or {}).items() if not k.startswith(DROPPED_ANNOTATIONS)}
    labels = dict(meta.get("labels") or {})
    for override in (restore.get("spec") or {}).get("volumeRestoreOverrides") or []:
        if override.get("volumeName") == backup["volumeName"]:
            labels.update(override.get("labels") or {})
            annotations.update(override.get("annotations") or {})
    annotations[RESTORE_NAME] = restore["metadata"]["name"]
    annotations[RESTORE_UID] = restore["metadata"]["uid"]
    spec = copy.deepcopy(old.get("spec") or {})
    spec["dataSource"] = {"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot",
                          "name": backup["volumeSnapshotName"]}
    spec.pop("dataSourceRef", None)
    spec.pop("volumeName", None)
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": name, "namespace": restore["metadata"].get("namespace", "default"),
                         "labels": labels, "annotations": annotations,
                         **({"ownerReferences": [{"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
                                                  "name": owner["metadata"]["name"], "uid": owner["metadata"]["uid"]}]}
                            if owner is not None else {})},
            "spec": spec}


def _restored_spec(source_spec: Obj, claims: dict[str, str]) -> Obj:
    """The snapshot's VM spec with every restored volume a persistentVolumeClaim of its new
    claim, the dataVolumeTemplates of those volumes' DataVolumes dropped."""
    spec = copy.deepcopy(source_spec)
    template_spec = (spec.get("template") or {}).get("spec") or {}
    dropped: list[str] = []
    for volume in template_spec.get("volumes") or []:
        if volume.get("name") not in claims:
            continue
        dv = (volume.pop("dataVolume", None) or {}).get("name")
        volume.pop("persistentVolumeClaim", None)
        volume["persistentVolumeClaim"] = {"claimName": claims[volume["name"]]}
        if dv:
            dropped.append(dv)
    templates = [t for t in spec.get("dataVolumeTemplates") or []
                 if (t.get("metadata") or {}).get("name") not in dropped]
    if templates:
        spec["dataVolumeTemplates"] = templates
    else:
        spec.pop("dataVolumeTemplates", None)
    return spec


def _template_names(spec: Obj) -> set[str]:
    return {(t.get("metadata") or {}).get("name") for t in spec.get("dataVolumeTemplates") or []}


def _stale_data_volumes(ctx: Context, target: Obj, vm_spec: Obj) -> list[str]:
    """KubeVirt's rule: the DataVolumes of the target's dataVolumeTemplates that the restored
    spec no longer has — only those the target owns (a DataVolume it merely uses stays)."""
    meta = target["metadata"]
    named = _template_names(vm_spec) | {(v.get("dataVolume") or {}).get("name") for v in
                                        ((vm_spec.get("template") or {}).get("spec") or {}).get("volumes") or []}
    stale = []
    for name in sorted(n for n in _template_names(target.get("spec") or {}) if isinstance(n, str) and n not in named):
        dv = ctx.store.get("DataVolume", name, meta.get("namespace", "default"))
        if dv and any(r.get("uid") == meta["uid"] for r in dv["metadata"].get("ownerReferences") or []):
            stale.append(name)
    return stale


def _backups(content: Obj) -> tuple[Obj, list[Obj]]:
    """The content's VM and volume backups, each checked (the content may be anyone's): ValueError."""
    spec = content.get("spec") or {}
    source = (spec.get("source") or {}).get("virtualMachine")
    if not isinstance(source, dict) or not isinstance(source.get("spec"), dict):
        raise ValueError("has no spec.source.virtualMachine.spec")
    if not isinstance(source.get("metadata") or {}, dict):
        raise ValueError("spec.source.virtualMachine.metadata must be an object")
    check_metadata_map((source.get("metadata") or {}).get("labels") or {}, "spec.source.virtualMachine.metadata.labels",
                       True)
    backups = spec.get("volumeBackups") or []
    if not isinstance(backups, list):
        raise ValueError("spec.volumeBackups must be a list")
    for i, backup in enumerate(backups):
        field = f"spec.volumeBackups[{i}]"
        if not isinstance(backup, dict) or not all(isinstance(backup.get(k), str) and backup[k]
                                                   for k in ("volumeName", "volumeSnapshotName")):
            raise ValueError(f"{field} needs a volumeName and a volumeSnapshotName")
        claim = backup.get("persistentVolumeClaim") or {}
        if not isinstance(claim, dict) or not isinstance(claim.get("metadata") or {}, dict) \
                or not isinstance(claim.get("spec") or {}, dict):
            raise ValueError(f"{field}.persistentVolumeClaim must be an object with metadata and spec")
        for key, labels in (("labels", True), ("annotations", False)):
            check_metadata_map((claim.get("metadata") or {}).get(key) or {},
                               f"{field}.persistentVolumeClaim.metadata.{key}", labels)
    return source, backups


def _admitted(objects: list[Obj]) -> str:
    """What `pvlun apply` would refuse of what the restore makes, in one line ("" if nothing)."""
    for obj in objects:
        try:
            admit(copy.deepcopy(obj), "restore")
        except Refused as exc:
            return str(exc)
    return ""


def _bound_enough(ctx: Context, pvc: Obj | None) -> bool:
    """Bound, or Pending in a WaitForFirstConsumer class: KubeVirt's rule — such a claim binds
    only once the VM's launcher Pod uses it (a restore that waited for it would wait forever)."""
    phase = ((pvc or {}).get("status") or {}).get("phase")
    if phase == "Bound":
        return True
    class_name = ((pvc or {}).get("spec") or {}).get("storageClassName")
    if phase != "Pending" or not isinstance(class_name, str) or not class_name:
        return False
    return (ctx.store.get("StorageClass", class_name, "") or {}).get("volumeBindingMode") == "WaitForFirstConsumer"


def _vanished(ctx: Context, restore: Obj, snap: Obj | None, backups: list[Obj], unbound: set[str],
              claims: dict[str, str]) -> str:
    """Why a restore under way cannot finish: its snapshot, content or a VolumeSnapshot that an
    unbound claim is restored from is gone ("" if all are there)."""
    ns = restore["metadata"].get("namespace", "default")
    name = restore["spec"]["virtualMachineSnapshotName"]
    if snap is None or snap["metadata"].get("deletionTimestamp"):
        return f"VirtualMachineSnapshot {name} was deleted before the restored claims were bound"
    for backup in backups:
        if claims[backup["volumeName"]] in unbound and ctx.store.get("VolumeSnapshot", backup["volumeSnapshotName"],
                                                                     ns) is None:
            return (f"VolumeSnapshot {backup['volumeSnapshotName']} (volume {backup['volumeName']}) was deleted before "
                    "its restored claim was bound")
    return ""


def _halted(spec: dict) -> dict:
    """The spec with its run strategy stopped, in the field it uses (KubeVirt's restore: runStrategy
    Halted, or running false)."""
    if "runStrategy" in spec:
        return {**spec, "runStrategy": "Halted"}
    if "running" in spec:
        return {**spec, "running": False}
    return spec


def reconcile_vm_restore(ctx: Context, restore: Obj) -> float | None:
    meta = restore["metadata"]
    ns = meta.get("namespace", "default")
    spec = restore.get("spec") or {}
    if meta.get("deletionTimestamp") or (restore.get("status") or {}).get("complete") or _failed(restore):
        return None
    try:
        check_restore(restore)
    except ValueError as exc:
        _fail(ctx, restore, one_line(f"VirtualMachineRestore {meta['name']} is invalid: {exc}"))
        return None
    snap_name = spec["virtualMachineSnapshotName"]
    target_name = spec["target"]["name"]
    target = ctx.store.get("VirtualMachine", target_name, ns)
    started = bool((restore.get("status") or {}).get("restores")) or _holds(target, restore)
    snap = ctx.store.get("VirtualMachineSnapshot", snap_name, ns)
    snap_status = (snap or {}).get("status") or {}
    if snap is None or not snap_status.get("readyToUse"):
        if snap_status.get("phase") == "Failed":
            _fail(ctx, restore, f"VirtualMachineSnapshot {snap_name} failed")
            return None
        if started:  # the restore was under way: it cannot finish
            _fail(ctx, restore, f"VirtualMachineSnapshot {snap_name} "
                                f"{'was deleted' if snap is None else 'is no longer ready to use'} during the restore")
            return None
        return _wait(ctx, restore, f"VirtualMachineSnapshot {snap_name} "
                                   f"{'does not exist' if snap is None else 'is not ready to use'}")
    content_name = snap_status.get("virtualMachineSnapshotContentName") or ""
    content = ctx.store.get(CONTENT, content_name, ns)
    if content is None:
        if started:
            _fail(ctx, restore, f"VirtualMachineSnapshotContent of {snap_name} was deleted during the restore")
            return None
        return _wait(ctx, restore, f"VirtualMachineSnapshotContent of {snap_name} does not exist")
    try:
        source, backups = _backups(content)
        claims = restore_claim_names(restore, [b["volumeName"] for b in backups], target_name)
    except ValueError as exc:
        _fail(ctx, restore, one_line(f"VirtualMachineSnapshotContent {content_name} of {snap_name}: {exc}"))
        return None
    source_uid = (source.get("metadata") or {}).get("uid")
    mark = f"{meta['name']}-{meta['uid']}"
    new_vm = target is None or ((target["metadata"].get("annotations") or {}).get(LAST_RESTORE) == mark
                                and target["metadata"]["uid"] != source_uid)  # made on a pass before
    if not new_vm and target["metadata"]["uid"] != source_uid:
        _fail(ctx, restore, f"VirtualMachine {target_name} exists and is not the snapshot's source "
                            f"({(source.get('metadata') or {}).get('name')}): restore to the source, or to a name no "
                            "VM has")
        return None
    if not new_vm and _target_busy(ctx, target):
        return _not_ready(ctx, restore, target)
    for volume, name in claims.items():  # a claim of that name that this restore did not make is never taken
        existing = ctx.store.get("PersistentVolumeClaim", name, ns)
        if existing and (existing["metadata"].get("annotations") or {}).get(RESTORE_UID) != meta["uid"]:
            _fail(ctx, restore, f"PersistentVolumeClaim {name} (volume {volume}) exists and is not this restore's: "
                                "choose other names (volumeRestorePolicy, volumeRestoreOverrides)")
            return None
    labels = (source.get("metadata") or {}).get("labels") or {}
    made = {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
            "metadata": {"name": target_name, "namespace": ns, "labels": labels, "annotations": {LAST_RESTORE: mark}},
            "spec": source["spec"]}
    refused = _admitted([made])  # the snapshot's VM as it was, then as the restore makes it, and its claims
    vm_spec = made["spec"] = {} if refused else _restored_spec(source["spec"], claims)
    refused = refused or _admitted([made, *(_claim(restore, b, claims[b["volumeName"]], None) for b in backups)])
    if refused:  # the content's VM or claims are not what `pvlun apply` would take
        _fail(ctx, restore, one_line(f"restore from VirtualMachineSnapshotContent {content_name} refused: {refused}"))
        return None
    if new_vm:  # made stopped, as KubeVirt makes it (a running VM's snapshot would start at once); patches may change it
        made["spec"] = _halted(made["spec"])
    if new_vm and spec.get("patches"):  # KubeVirt patches the VM a restore creates, and only that one
        try:
            made = apply_patches(made, spec["patches"])
        except ValueError as exc:
            _fail(ctx, restore, one_line(f"VirtualMachine {target_name}: {exc}"))
            return None
        refused = _admitted([made])
        if refused:
            _fail(ctx, restore, one_line(f"VirtualMachine {target_name} as spec.patches make it is refused: {refused}"))
            return None
    if not new_vm and not _holds(target, restore):
        ctx.store.merge_status("VirtualMachine", target_name, ns, restoreInProgress=meta["name"])  # not started now
        if spec.get("patches"):  # KubeVirt ignores them here: not silently
            ctx.store.add_event(restore, "Warning", PATCHES_NOT_APPLIED,
                                f"spec.patches applies only when the restore creates its target: VirtualMachine "
                                f"{target_name} exists, so its patches are not applied")
    if target is None:  # a new VM: made first, so that its claims can be owned by it
        try:  # created, never applied over a VM someone made since the look above
            target = ctx.store.create(made)
        except Conflict:
            _fail(ctx, restore, f"VirtualMachine {target_name} was made by someone else while this restore "
                                "ran: restore to another name")
            return None
        ctx.store.add_event(restore, "Normal", "VirtualMachineCreated",
                            f"VirtualMachine {target_name} made from snapshot {snap_name}")
    owner = target if spec.get("volumeOwnershipPolicy", "Vm") == "Vm" else None
    for backup in backups:
        if ctx.store.get("PersistentVolumeClaim", claims[backup["volumeName"]], ns) is None:
            ctx.store.apply(_claim(restore, backup, claims[backup["volumeName"]], owner))
    restores = [{"volumeName": b["volumeName"], "persistentVolumeClaim": claims[b["volumeName"]],
                 "volumeSnapshotName": b["volumeSnapshotName"]} for b in backups]
    unbound = {c for c in claims.values() if not _bound_enough(ctx, ctx.store.get("PersistentVolumeClaim", c, ns))}
    if unbound:
        gone = _vanished(ctx, restore, snap, backups, unbound, claims)
        if gone:
            _fail(ctx, restore, gone)
            return None
        _status(ctx, restore, complete=False, progressing=(True, "Initializing VirtualMachineRestore"),
                ready=(False, f"Waiting for restored claims: {', '.join(sorted(unbound))}"), restores=restores)
        return WAIT
    deleted: list[str] = []
    if not new_vm:  # the snapshot's own VM: its spec, its run strategy as it is now
        stale = _stale_data_volumes(ctx, target, vm_spec)
        current = copy.deepcopy(target)
        strategy = {k: current["spec"][k] for k in ("running", "runStrategy") if k in current.get("spec", {})}
        vm_spec = {k: v for k, v in vm_spec.items() if k not in ("running", "runStrategy")}
        current["spec"] = {**vm_spec, **strategy}
        (current["metadata"].setdefault("annotations", {}))[LAST_RESTORE] = mark
        ctx.store.apply(current)
        _release(ctx, target_name, ns)
        deleted = [dv for dv in stale if ctx.store.delete("DataVolume", dv, ns)]
    _status(ctx, restore, complete=True, progressing=(False, "Operation complete"), ready=(True, "Operation complete"),
            restores=restores, restoreTime=now(), **({"deletedDataVolumes": deleted} if deleted else {}))
    ctx.store.add_event(restore, "Normal", "VirtualMachineRestoreComplete",
                        f"VirtualMachine {target_name} restored from snapshot {snap_name}: {len(restores)} volumes")
    log.info("restore %s/%s: VM %s from snapshot %s", ns, meta["name"], target_name, snap_name)
    return None
