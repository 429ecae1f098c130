"""A DataVolume with a pvc source, by CDI's clone strategies (see cloner/): the strategy is
chosen once, saved on the DataVolume and its claim (`cdi.kubevirt.io/cloneType`, with
`cdi.kubevirt.io/cloneFallbackReason` and a Warning event when it is not the one asked for),
then run:

- snapshot: a temporary VolumeSnapshot `tmp-snapshot-<DataVolume uid>` of the source, the claim
  restored from it, the snapshot deleted once the claim is bound (or the clone fails). In
  another namespace no owner reference can tie it to the DataVolume, so, as CDI does, the
  DataVolume carries `cdi.kubevirt.io/dataVolumeFinalizer` while it exists: a DataVolume
  deleted midway takes its snapshot with it;
- csi-clone: the claim's dataSource is the source (CreateVolume with a volume content source);
- copy: a blank claim, filled on a node by the host-assisted copy.

A target larger than its source is made at the source's size by snapshot and csi-clone and
then expanded (the claim's request raised: ControllerExpandVolume, NodeExpandVolume where it is
attached; a Filesystem volume's disk.img grown to fill it), as CDI's claim preparation does.
"""

from __future__ import annotations

from cloner import CLONE_TYPE_ANNOTATION, COPY, CSI_CLONE, FALLBACK_ANNOTATION, SNAPSHOT, Choice
from controlplane import kubelet
from controlplane.context import Context
from controlplane.dv_spec import claim_spec
from controlplane.quantity import parse_quantity
from controlplane.store import Obj, remove_finalizer, set_condition
from controlplane.user_text import user_text
from importer import reconcile as dvr

TMP_SNAPSHOT_PREFIX = "tmp-snapshot-"  # CDI's name for the snapshot strategy's temporary snapshot
OWNED_BY_UID = "cdi.kubevirt.io/OwnedByUID"  # label: the DataVolume a temporary snapshot is for
CROSS_NAMESPACE_FINALIZER = "cdi.kubevirt.io/dataVolumeFinalizer"  # CDI's, for what a clone leaves in the source namespace
RECHECK_SECONDS = 0.2  # a step another controller takes (the snapshot, the expansion): look again soon


UNAUTHORIZED = "CloneValidationFailed"  # CDI's reason for a clone its checks do not admit
GRANT_RECHECK_SECONDS = 5.0  # a clone waiting for its grant looks again (a Role or binding may come)
SERVICE_ACCOUNT = "default"  # whose grant a clone into a namespace needs, as KubeVirt and CDI ask it


def _denied(ctx: Context, dv: Obj, source: dict, src_ns: str) -> str | None:
    """Why the DataVolume may not clone from another namespace (None if it may): the target
    namespace's service account needs `create` on `datavolumes/source` there (CDI's check)."""
    from controlplane.rbac import may_clone_from

    ns = dv["metadata"].get("namespace", "default")
    if src_ns == ns:
        return None
    return may_clone_from(ctx.store, src_ns, source.get("name", ""), ns, SERVICE_ACCOUNT)


def tmp_snapshot_name(dv: Obj) -> str:
    return TMP_SNAPSHOT_PREFIX + dv["metadata"]["uid"]


def _capacity(pvc: Obj | None) -> int:
    return parse_quantity(str(((pvc or {}).get("status") or {}).get("capacity", {}).get("storage") or "0"))


def _choose(ctx: Context, dv: Obj, src: Obj, mode: str, size: int, sc: str | None) -> Choice:
    """The strategy, from the target's class and profile and the source (cloner.choose_strategy)."""
    from cloner import asked_strategy, choose_strategy
    from controlplane.provisioner import storage_class_for

    target_class = storage_class_for(ctx, {"spec": {"storageClassName": sc}})
    source_class = storage_class_for(ctx, src)
    profile = ctx.store.get("StorageProfile", target_class["metadata"]["name"], "") if target_class else None
    asked = asked_strategy(target_class, profile)
    return choose_strategy(asked, source_pvc=src, target_mode=mode, target_size=size, source_class=source_class,
                           target_class=target_class, snapshot_classes=ctx.store.list("VolumeSnapshotClass"))


def _save_choice(ctx: Context, dv: Obj, choice: Choice) -> None:
    """On the DataVolume (CDI's cloneType) with an event saying which strategy and why."""
    meta = dv["metadata"]
    ctx.store.annotate(dvr.KIND, meta["name"], meta.get("namespace", "default"),
                       **{CLONE_TYPE_ANNOTATION: choice.strategy})
    meta.setdefault("annotations", {})[CLONE_TYPE_ANNOTATION] = choice.strategy
    if choice.reason:
        ctx.store.add_event(dv, "Warning", choice.reason, choice.says())
    ctx.store.add_event(dv, "Normal", "CloneStrategy", choice.says())


def _saved(dv: Obj) -> str | None:
    return (dv["metadata"].get("annotations") or {}).get(CLONE_TYPE_ANNOTATION)


def _ensure_tmp_snapshot(ctx: Context, dv: Obj, src: Obj) -> Obj | None:
    """The snapshot strategy's temporary VolumeSnapshot of the source; None until ready to use."""
    src_ns = src["metadata"]["namespace"]
    name = tmp_snapshot_name(dv)
    snap = ctx.store.get("VolumeSnapshot", name, src_ns)
    if snap is None:
        from controlplane.provisioner import storage_class_for

        driver = (storage_class_for(ctx, src) or {}).get("provisioner")
        klass = next((c["metadata"]["name"] for c in ctx.store.list("VolumeSnapshotClass") if c.get("driver") == driver),
                     None)
        meta = dv["metadata"]
        # owned by the DataVolume where an owner reference may point (one namespace): a DataVolume
        # deleted before its claim is made takes the snapshot with it; elsewhere its finalizer does
        same_namespace = src_ns == meta.get("namespace", "default")
        owner = ([{"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": dvr.KIND, "name": meta["name"], "uid": meta["uid"]}]
                 if same_namespace else [])
        if not same_namespace and CROSS_NAMESPACE_FINALIZER not in meta.get("finalizers", []):
            ctx.store.patch_metadata(dvr.KIND, meta["name"], meta.get("namespace", "default"),
                                     finalizers=meta.get("finalizers", []) + [CROSS_NAMESPACE_FINALIZER])
        ctx.store.apply({
            "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
            "metadata": {"name": name, "namespace": src_ns, "ownerReferences": owner,
                         "labels": {OWNED_BY_UID: meta["uid"]},
                         "annotations": {"cdi.kubevirt.io/ownedByDataVolume": f"{meta.get('namespace', 'default')}/"
                                                                              f"{meta['name']}"}},
            "spec": {"source": {"persistentVolumeClaimName": src["metadata"]["name"]},
                     **({"volumeSnapshotClassName": klass} if klass else {})},
        })
        return None
    status = snap.get("status") or {}
    return snap if status.get("readyToUse") and status.get("snapshotHandle") else None


def delete_tmp_snapshot(ctx: Context, dv: Obj, src_ns: str) -> None:
    """The snapshot strategy's temporary snapshot goes once its clone is made (or abandoned),
    and with it the DataVolume's finalizer that stood for it in another namespace."""
    ctx.store.delete("VolumeSnapshot", tmp_snapshot_name(dv), src_ns)
    if CROSS_NAMESPACE_FINALIZER in dv["metadata"].get("finalizers", []):
        remove_finalizer(ctx.store, dv, CROSS_NAMESPACE_FINALIZER)


def release_deleted(ctx: Context, dv: Obj) -> None:
    """A DataVolume being deleted: its temporary snapshot in another namespace (the one whose
    label names this DataVolume's uid) is deleted, then the DataVolume may go."""
    uid = dv["metadata"].get("uid")
    name = tmp_snapshot_name(dv)
    for snap in ctx.store.list("VolumeSnapshot"):
        if snap["metadata"]["name"] == name and (snap["metadata"].get("labels") or {}).get(OWNED_BY_UID) == uid:
            ctx.store.delete("VolumeSnapshot", name, snap["metadata"].get("namespace", "default"))
    remove_finalizer(ctx.store, dv, CROSS_NAMESPACE_FINALIZER)


def reconcile_clone(ctx: Context, dv: Obj, source: dict, size: int, mode: str, access: list[str],
                    sc: str | None, taken) -> float | None:
    """The next step of a DataVolume with a pvc source (both modes; the copy runs embedded only)."""
    meta = dv["metadata"]
    ns = meta.get("namespace", "default")
    src_ns = source.get("namespace") or ns
    src = ctx.store.get("PersistentVolumeClaim", source.get("name", ""), src_ns)
    pvc = ctx.store.get("PersistentVolumeClaim", meta["name"], ns)
    if pvc is not None and pvc["metadata"].get("deletionTimestamp"):
        return None  # the old claim (a failed or restarted clone) is still going away
    if pvc is None:
        denied = _denied(ctx, dv, source, src_ns)
        if denied:
            status = dvr.status_of(dv)
            if status.get("phase") != "Pending" or not any(c.get("message") == denied for c in status.get("conditions", [])):
                dvr.set_phase(ctx, dv, "Pending", progress="N/A", ready=False, ready_why=(UNAUTHORIZED, denied),
                              running=(False, UNAUTHORIZED, denied), event=("Warning", UNAUTHORIZED, denied))
            return GRANT_RECHECK_SECONDS
        return _make_claim(ctx, dv, src, source, size, mode, access, sc, taken)
    if (pvc.get("status") or {}).get("phase") != "Bound" and dvr.waits_for_class(ctx, dv, sc):
        return dvr.CLASS_RECHECK_SECONDS
    if (pvc.get("status") or {}).get("phase") != "Bound":
        cond = next((c for c in pvc.get("status", {}).get("conditions", []) if c["type"] == "Provisioned"), None)
        if cond and cond.get("reason") == "ProvisioningFailed":
            delete_tmp_snapshot(ctx, dv, src_ns)
            dvr.fail(ctx, dv, "ProvisioningFailed", cond.get("message", ""))
        return None
    status = dvr.status_of(dv)
    if not any(c["type"] == "Bound" and c["status"] == "True" for c in status.get("conditions", [])):
        set_condition(status, "Bound", True, "Bound", f"PVC {meta['name']} Bound")
        status["claimName"] = meta["name"]
        dvr.save_status(ctx, dv, status)
        dv["status"] = status
    strategy = _saved(dv) or CSI_CLONE
    if strategy == SNAPSHOT:
        delete_tmp_snapshot(ctx, dv, src_ns)
    if strategy == COPY:
        if ctx.cluster is not None:
            dvr.fail(ctx, dv, "CloneNotSupported", "the copy clone strategy (host-assisted) runs only in embedded "
                     "mode (pvlun serve) for now")
            return None
        from controlplane.provisioner import claim_populated

        if src is not None and claim_populated(ctx, src):
            user = _vm_using(ctx, src)
            if user:  # a disk a guest writes would be copied torn: CDI waits for the pod to let go too
                message = f"{user} using PersistentVolumeClaim {src_ns}/{source.get('name')}: the copy waits for it"
                if not any(c.get("message") == message for c in dvr.status_of(dv).get("conditions", [])):
                    dvr.set_phase(ctx, dv, "CloneScheduled", progress="N/A", ready=False,
                                  running=(False, "CloneSourceInUse", message),
                                  event=("Warning", "CloneSourceInUse", message))
                return IN_USE_RECHECK_SECONDS
            ctx.jobs.start_on_node("dv:" + dvr.key_of(dv), lambda node: run_copy(ctx, dv, source, node),
                                   f"clone/{dvr.key_of(dv)}", volumes=2)
        return None
    wanted = _claim_request(dv, source, size, mode, access, sc)
    if wanted > _capacity(pvc) and _expandable(ctx, pvc):
        return _expand(ctx, dv, pvc, wanted)
    _succeeded(ctx, dv, strategy)
    return None


IN_USE_RECHECK_SECONDS = 5.0


def _vm_using(ctx: Context, pvc: Obj) -> str:
    """The VM whose run has the claim attached ("" for none): a copy of it would be torn."""
    pv_name = (pvc.get("spec") or {}).get("volumeName")
    for att in ctx.store.list("VolumeAttachment"):
        spec = att.get("spec") or {}
        if (spec.get("source") or {}).get("persistentVolumeName") == pv_name and spec.get("owner", "").startswith("vm/"):
            return "VirtualMachine " + spec["owner"][3:]
    return ""


def _expandable(ctx: Context, pvc: Obj) -> bool:
    """The claim's class allows expansion. A claim that asks for more only for CDI's filesystem
    overhead (a disk no larger than its source) keeps its source's size on a class that does not."""
    from controlplane.provisioner import storage_class_for

    return bool((storage_class_for(ctx, pvc) or {}).get("allowVolumeExpansion"))


def _claim_request(dv: Obj, source: dict, size: int, mode: str, access: list[str], sc: str | None) -> int:
    """The bytes the DataVolume's claim asks for (with CDI's filesystem overhead when spec.storage
    gives a Filesystem size); 0 if none is given (the source's size)."""
    ns = dv["metadata"].get("namespace", "default")
    spec = claim_spec("blank", source, size, mode, access, sc, (dv.get("spec") or {}).get("storage") is not None, ns)
    return parse_quantity(spec.get("resources", {}).get("requests", {}).get("storage", "0"))


def _make_claim(ctx: Context, dv: Obj, src: Obj | None, source: dict, size: int, mode: str, access: list[str],
                sc: str | None, taken) -> float | None:
    meta = dv["metadata"]
    ns = meta.get("namespace", "default")
    src_ns = source.get("namespace") or ns
    if src is None or taken is None:
        status = dvr.status_of(dv)
        if status.get("phase") != "Pending":
            dvr.set_phase(ctx, dv, "Pending", progress="N/A", ready=False, event=(
                "Normal", "CloneSourceNotReady", f"waiting for pvc {src_ns}/{source.get('name')}: the clone takes "
                "its volume mode and size"))
        return 2.0
    wanted = _claim_request(dv, source, size, mode, access, sc)
    strategy = _saved(dv)
    if strategy is None:
        choice = _choose(ctx, dv, src, mode, size, sc)  # the disk asked for, without the filesystem overhead
        _save_choice(ctx, dv, choice)
        strategy = choice.strategy
        fallback = choice.message if choice.reason else None
    else:
        fallback = None
    src_size = _capacity(src)
    claim_source, claim_kind, claim_size = source, "pvc", size
    if strategy in (SNAPSHOT, CSI_CLONE) and wanted > src_size:
        claim_size = src_size  # made at the source's size, expanded once bound (CDI's claim preparation)
    if strategy == SNAPSHOT:
        snap = _ensure_tmp_snapshot(ctx, dv, src)
        if snap is None:
            if dvr.status_of(dv).get("phase") != "SnapshotForSmartCloneInProgress":
                dvr.set_phase(ctx, dv, "SnapshotForSmartCloneInProgress", progress="N/A", ready=False,
                              running=(False, "SnapshotForSmartCloneInProgress",
                                       f"snapshot {tmp_snapshot_name(dv)} of {src_ns}/{source.get('name')}"))
            return RECHECK_SECONDS
        claim_source, claim_kind = {"name": snap["metadata"]["name"], "namespace": src_ns}, "snapshot"
    elif strategy == COPY:
        claim_kind, claim_size = "blank", size or src_size
    spec = claim_spec(claim_kind, claim_source, claim_size, mode, access, sc,
                      (dv.get("spec") or {}).get("storage") is not None and claim_size == size, ns,
                      dvr.attributes_class(dv))
    annotations = {CLONE_TYPE_ANNOTATION: strategy}
    if fallback:
        annotations[FALLBACK_ANNOTATION] = fallback
    ctx.store.apply({
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": meta["name"], "namespace": ns, "annotations": annotations,
                     "ownerReferences": [{"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": dvr.KIND,
                                          "name": meta["name"], "uid": meta["uid"], "controller": True}]},
        "spec": spec,
    })
    if dvr.waits_for_class(ctx, dv, sc):
        return dvr.CLASS_RECHECK_SECONDS
    status = dvr.set_phase(ctx, dv, "CloneScheduled", progress="N/A", ready=False)
    status["claimName"] = meta["name"]
    dvr.save_status(ctx, dv, status)
    return None


def _expand(ctx: Context, dv: Obj, pvc: Obj, wanted: int) -> float | None:
    """Raise the claim's request to what the DataVolume asks for; the provisioner grows the
    volume. A Filesystem volume's disk.img is grown after it (a job, embedded)."""
    meta = dv["metadata"]
    ns = meta.get("namespace", "default")
    if dvr.status_of(dv).get("phase") != "ExpansionInProgress":
        dvr.set_phase(ctx, dv, "ExpansionInProgress", progress="N/A", ready=False,
                      running=(True, "ExpansionInProgress", f"growing claim {meta['name']} to {wanted} bytes"))
    requested = parse_quantity(str(pvc["spec"].get("resources", {}).get("requests", {}).get("storage") or "0"))
    block = (pvc["spec"].get("volumeMode") or "Filesystem") == "Block"
    if block or ctx.cluster is not None:
        if requested < wanted:
            resources = dict(pvc["spec"].get("resources") or {})
            resources["requests"] = dict(resources.get("requests") or {}, storage=str(wanted))
            ctx.store.patch_spec("PersistentVolumeClaim", meta["name"], ns, resources=resources)
        return RECHECK_SECONDS
    ctx.jobs.start_on_node("dv:" + dvr.key_of(dv), lambda node: run_grow_disk(ctx, dv, wanted, node),
                           f"expand/{dvr.key_of(dv)}")
    return None


def run_grow_disk(ctx: Context, dv: Obj, wanted: int, node: str | None = None) -> None:
    """A Filesystem clone made at its source's size: attached (so NodeExpandVolume grows its
    filesystem), its claim raised, and its disk.img grown into the new room."""
    import time

    meta = dv["metadata"]
    ns = meta.get("namespace", "default")
    owner = f"expand/{ns}/{meta['name']}"
    node = node or ctx.node_id
    att = kubelet.attach(ctx.store, ctx.csi, ctx.data_dir, meta["name"], ns, node, owner)
    try:
        pvc = ctx.store.get("PersistentVolumeClaim", meta["name"], ns)
        resources = dict(pvc["spec"].get("resources") or {})
        resources["requests"] = dict(resources.get("requests") or {}, storage=str(wanted))
        ctx.store.patch_spec("PersistentVolumeClaim", meta["name"], ns, resources=resources)
        deadline = time.monotonic() + 120
        while _capacity(ctx.store.get("PersistentVolumeClaim", meta["name"], ns)) < wanted:
            if time.monotonic() > deadline:
                raise TimeoutError(f"claim {meta['name']} was not grown to {wanted} bytes within 120 s")
            time.sleep(0.1)
        from cloner import grow_disk_image

        grow_disk_image(att)
    except (OSError, kubelet.NotReady) as exc:
        kubelet.detach(ctx.store, ctx.csi, att.volume_id, node, owner)
        dvr.fail(ctx, dv, "ExpansionFailed", user_text(exc))
        return
    kubelet.detach(ctx.store, ctx.csi, att.volume_id, node, owner)
    _succeeded(ctx, dv, _saved(dv) or CSI_CLONE)


def _succeeded(ctx: Context, dv: Obj, strategy: str) -> None:
    meta = dv["metadata"]
    dvr.set_phase(ctx, dv, "Succeeded", progress="100.0%", running=(False, "Completed", ""), ready=True,
                  event=("Normal", "CloneSucceeded", f"pvc cloned into claim {meta['name']} by the {strategy} "
                                                     "clone strategy"))


def run_copy(ctx: Context, dv: Obj, source: dict, node: str | None = None) -> None:
    """The copy strategy's job: the disk streamed across on a node, verified, or the
    DataVolume failed with its claim (and so the half-written volume) deleted."""
    from cloner import ChecksumMismatch, TooSmall, host_assisted_copy
    from host.command import CommandError

    meta = dv["metadata"]
    ns = meta.get("namespace", "default")
    dvr.set_phase(ctx, dv, "CloneInProgress", running=(True, "Pod Running", "copy clone strategy (host-assisted)"),
                  progress="0.00%")
    try:
        written = host_assisted_copy(ctx, source["name"], source.get("namespace") or ns, meta["name"], ns,
                                     f"clone/{ns}/{meta['name']}", node)
    except ChecksumMismatch as exc:
        dvr.fail(ctx, dv, "CloneChecksumMismatch", str(exc))
        return
    except (CommandError, kubelet.NotReady, TooSmall, OSError) as exc:  # OSError: a disk.img that is a link, a FIFO
        dvr.fail(ctx, dv, "CloneFailed", user_text(exc))
        return
    dvr.set_phase(ctx, dv, "Succeeded", progress="100.0%", running=(False, "Completed", ""), ready=True,
                  event=("Normal", "CloneSucceeded", f"pvc cloned into claim {meta['name']} by the copy clone "
                                                     f"strategy (host-assisted; {written} bytes written, verified)"))
