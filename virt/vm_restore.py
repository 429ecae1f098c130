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
  the DataVolumes of its old dataVolumeTemplates are deleted (status.deletedDataVolumes).
- to a VM that does not exist (another name): it is made from the snapshot's spec, with the
  restored claims, owned by nothing but itself (the claims are owned by it, volumeOwnershipPolicy
  Vm, the default). An existing VM that is not the snapshot's source is refused.

complete, restoreTime, restores and the Progressing/Ready conditions as KubeVirt reports them.
On a cluster the restore is refused (Failed), as VirtualMachineSnapshots are there.
"""

from __future__ import annotations

import copy
import logging

from controlplane.context import Context
from controlplane.store import Obj, now, set_condition
from controlplane.vm_snapshot_spec import DEFAULT_GRACE_PERIOD, restore_claim_name
from virt.reconcile import REQUEST, key_of, runtime
from virt.vm_snapshot import CLUSTER_REFUSAL, CONTENT, WAIT, age_seconds

log = logging.getLogger("pvlun.virt")
# claim annotations that belonged to the old claim's provisioning (KubeVirt drops the same prefixes)
DROPPED_ANNOTATIONS = ("pv.kubernetes.io", "volume.beta.kubernetes.io", "cdi.kubevirt.io", "volume.kubernetes.io",
                       "k8s.io/CloneRequest", "k8s.io/CloneOf")
RESTORE_NAME = "restore.kubevirt.io/name"  # on a restored claim: the restore that made it
LAST_RESTORE = "restore.kubevirt.io/lastRestoreUID"  # on the target VM: <restore name>-<restore uid>


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
    _status(ctx, restore, complete=False, progressing=(False, "Operation failed"), ready=(False, message),
            failure=message)
    ctx.store.add_event(restore, "Warning", "VirtualMachineRestoreError", message)


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
    return bool(runtime(ctx).get(key) or ctx.jobs.running("vm:" + key)
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


def _restored_spec(source_spec: Obj, claims: dict[str, str]) -> tuple[Obj, list[str]]:
    """The snapshot's VM spec with every restored volume a persistentVolumeClaim of its new
    claim, and the names of the DataVolumes it no longer makes (their templates dropped)."""
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
    return spec, dropped


def reconcile_vm_restore(ctx: Context, restore: Obj) -> float | None:
    meta = restore["metadata"]
    ns = meta.get("namespace", "default")
    spec = restore.get("spec") or {}
    if meta.get("deletionTimestamp") or (restore.get("status") or {}).get("complete") or _failed(restore):
        return None
    if ctx.cluster is not None:
        _fail(ctx, restore, CLUSTER_REFUSAL.replace("VirtualMachineSnapshots", "VirtualMachineRestores"))
        return None
    snap_name = spec["virtualMachineSnapshotName"]
    snap = ctx.store.get("VirtualMachineSnapshot", snap_name, ns)
    snap_status = (snap or {}).get("status") or {}
    if snap is None or not snap_status.get("readyToUse"):
        if snap_status.get("phase") == "Failed":
            _fail(ctx, restore, f"VirtualMachineSnapshot {snap_name} failed")
            return None
        return _wait(ctx, restore, f"VirtualMachineSnapshot {snap_name} "
                                   f"{'does not exist' if snap is None else 'is not ready to use'}")
    content = ctx.store.get(CONTENT, snap_status.get("virtualMachineSnapshotContentName") or "", ns)
    if content is None:
        return _wait(ctx, restore, f"VirtualMachineSnapshotContent of {snap_name} does not exist")
    source = content["spec"]["source"]["virtualMachine"]
    target_name = spec["target"]["name"]
    target = ctx.store.get("VirtualMachine", target_name, ns)
    mark = f"{meta['name']}-{meta['uid']}"
    new_vm = target is None or ((target["metadata"].get("annotations") or {}).get(LAST_RESTORE) == mark
                                and target["metadata"]["uid"] != source["metadata"].get("uid"))  # made on a pass before
    if not new_vm and target["metadata"]["uid"] != source["metadata"].get("uid"):
        _fail(ctx, restore, f"VirtualMachine {target_name} exists and is not the snapshot's source "
                            f"({source['metadata'].get('name')}): restore to the source, or to a name no VM has")
        return None
    if not new_vm and _target_busy(ctx, target):
        return _not_ready(ctx, restore, target)
    backups = content["spec"].get("volumeBackups") or []
    claims = {b["volumeName"]: restore_claim_name(restore, b["volumeName"], target_name) for b in backups}
    for volume, name in claims.items():  # a claim of that name that this restore did not make is never taken
        existing = ctx.store.get("PersistentVolumeClaim", name, ns)
        if existing and (existing["metadata"].get("annotations") or {}).get(RESTORE_NAME) != meta["name"]:
            _fail(ctx, restore, f"PersistentVolumeClaim {name} (volume {volume}) exists and is not this restore's: "
                                "choose other names (volumeRestorePolicy, volumeRestoreOverrides)")
            return None
    if not new_vm and (target.get("status") or {}).get("restoreInProgress") != meta["name"]:
        ctx.store.merge_status("VirtualMachine", target_name, ns, restoreInProgress=meta["name"])  # not started now
    vm_spec, dropped = _restored_spec(source.get("spec") or {}, claims)
    if target is None:  # a new VM: made first, so that its claims can be owned by it
        labels = dict((source.get("metadata") or {}).get("labels") or {})
        target = ctx.store.apply({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
                                  "metadata": {"name": target_name, "namespace": ns, "labels": labels,
                                               "annotations": {LAST_RESTORE: mark}},
                                  "spec": vm_spec})
        ctx.store.add_event(restore, "Normal", "VirtualMachineCreated",
                            f"VirtualMachine {target_name} made from snapshot {snap_name}")
    owner = target if spec.get("volumeOwnershipPolicy", "Vm") == "Vm" else None
    for backup in backups:
        if ctx.store.get("PersistentVolumeClaim", claims[backup["volumeName"]], ns) is None:
            ctx.store.apply(_claim(restore, backup, claims[backup["volumeName"]], owner))
    restores = [{"volumeName": b["volumeName"], "persistentVolumeClaim": claims[b["volumeName"]],
                 "volumeSnapshotName": b["volumeSnapshotName"]} for b in backups]
    unbound = [c for c in claims.values()
               if ((ctx.store.get("PersistentVolumeClaim", c, ns) or {}).get("status") or {}).get("phase") != "Bound"]
    if unbound:
        _status(ctx, restore, complete=False, progressing=(True, "Initializing VirtualMachineRestore"),
                ready=(False, f"Waiting for restored claims: {', '.join(unbound)}"), restores=restores)
        return WAIT
    deleted: list[str] = []
    if not new_vm:  # the snapshot's own VM: its spec, its run strategy as it is now
        current = copy.deepcopy(target)
        strategy = {k: current["spec"][k] for k in ("running", "runStrategy") if k in current.get("spec", {})}
        vm_spec = {k: v for k, v in vm_spec.items() if k not in ("running", "runStrategy")}
        current["spec"] = {**vm_spec, **strategy}
        (current["metadata"].setdefault("annotations", {}))[LAST_RESTORE] = mark
        ctx.store.apply(current)
        _release(ctx, target_name, ns)
        named = {(v.get("dataVolume") or {}).get("name") for v in
                 ((vm_spec.get("template") or {}).get("spec") or {}).get("volumes") or []}
        for dv in dropped:
            if dv not in named and ctx.store.delete("DataVolume", dv, ns):
                deleted.append(dv)
    _status(ctx, restore, complete=True, progressing=(False, "Operation complete"), ready=(True, "Operation complete"),
            restores=restores, restoreTime=now(), **({"deletedDataVolumes": deleted} if deleted else {}))
    ctx.store.add_event(restore, "Normal", "VirtualMachineRestoreComplete",
                        f"VirtualMachine {target_name} restored from snapshot {snap_name}: {len(restores)} volumes")
    log.info("restore %s/%s: VM %s from snapshot %s", ns, meta["name"], target_name, snap_name)
    return None
