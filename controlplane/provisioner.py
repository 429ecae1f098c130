"""The local provisioner: what external-provisioner does on a cluster. A claim gets a CSI
volume (CreateVolume, with a clone or snapshot source from dataSource) and a bound
PersistentVolume; a deleted claim's volume is deleted (reclaim policy Delete)."""

from __future__ import annotations

import contextlib

import grpc

from csi.proto import csi_pb2 as pb
from csi import DRIVER_NAME
from controlplane.context import Context
from controlplane.csi_client import capability
from controlplane.quantity import parse_quantity
from controlplane.rbac import may_clone_from
from controlplane.source_protection import CLONING, SNAPSHOT_AS_SOURCE, being_read, reading
from controlplane.secret_refs import OPERATIONS, SecretRefError, referenced, resolve, secret_data, split_parameters
from controlplane.store import Obj, remove_finalizer, set_condition
from controlplane.user_text import user_text

FINALIZER = "pvlun.dev/provisioner"
DEFAULT_CLASS = "pvlun"
DEFAULT_ANNOTATION = "storageclass.kubernetes.io/is-default-class"


def default_storage_class() -> Obj:
    """The class a claim without storageClassName gets in embedded mode."""
    return {"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
            "metadata": {"name": DEFAULT_CLASS, "annotations": {DEFAULT_ANNOTATION: "true"}},
            "provisioner": DRIVER_NAME, "reclaimPolicy": "Delete", "volumeBindingMode": "Immediate",
            "allowVolumeExpansion": True, "parameters": {}}


def ensure_default_storage_class(ctx: Context) -> None:
    """Store the built-in default class unless a class of that name exists, as a cluster's
    default class is installed: the pool's warnings go on it, and `pvlun get sc` shows it."""
    if ctx.store.get("StorageClass", DEFAULT_CLASS) is None:
        ctx.store.apply(default_storage_class())


def storage_class_for(ctx: Context, pvc: Obj) -> Obj | None:
    name = pvc["spec"].get("storageClassName")
    if name:
        return ctx.store.get("StorageClass", name)
    defaults = [sc for sc in ctx.store.list("StorageClass")
                if sc.get("metadata", {}).get("annotations", {}).get(DEFAULT_ANNOTATION) == "true"]
    if defaults:  # several: the newest, as Kubernetes chooses (a user's beats the built-in one)
        return max(defaults, key=lambda sc: (sc["metadata"].get("creationTimestamp") or "",
                                             sc["metadata"]["name"] != DEFAULT_CLASS))
    return default_storage_class()


def _fail(ctx: Context, pvc: Obj, reason: str, message: str) -> None:
    meta = pvc["metadata"]
    status = dict(pvc.get("status", {}), phase="Pending")
    set_condition(status, "Provisioned", False, reason, message)
    if status != pvc.get("status"):
        ctx.store.add_event(pvc, "Warning", reason, message)
    ctx.store.update_status("PersistentVolumeClaim", meta["name"], meta["namespace"], status)


def claim_populated(ctx: Context, pvc: Obj) -> bool:
    """Bound and, if a DataVolume fills it, filled: only then may it be cloned or snapshotted
    (CDI binds a populated claim only once the import is done; here the DataVolume says)."""
    if (pvc.get("status") or {}).get("phase") != "Bound":
        return False
    for ref in pvc["metadata"].get("ownerReferences", []):
        if ref.get("kind") == "DataVolume":
            dv = ctx.store.get("DataVolume", ref["name"], pvc["metadata"].get("namespace", "default"))
            return bool(dv) and (dv.get("status") or {}).get("phase") == "Succeeded"
    return True


class WaitingForSource(Exception):
    """The claim's dataSource is not ready yet (not bound, not ready to use): try again."""


ALLOW_MODE_CHANGE = "snapshot.storage.kubernetes.io/allow-volume-mode-change"


def check_volume_mode(pvc: Obj, content: Obj, snapshot: str) -> None:
    """A snapshot restores only into its source's volume mode, unless its
    VolumeSnapshotContent allows the change (what the external-provisioner enforces from
    spec.sourceVolumeMode): a Block volume's bytes read as a Filesystem volume would be
    formatted over or mounted as whatever the guest wrote, and the reverse exposes a
    filesystem's raw blocks. Contents that do not know their source's mode allow it."""
    source_mode = (content.get("spec") or {}).get("sourceVolumeMode")
    mode = pvc["spec"].get("volumeMode") or "Filesystem"
    allowed = (content["metadata"].get("annotations") or {}).get(ALLOW_MODE_CHANGE) == "true"
    if source_mode and source_mode != mode and not allowed:
        name = content["metadata"]["name"]
        raise ValueError(
            f"snapshot {snapshot} was taken of a {source_mode} volume: it cannot be restored as volumeMode {mode}. "
            f"Ask for volumeMode {source_mode}, or, if the data is meant to be read the other way, allow it on the "
            f"snapshot's content: pvlun annotate volumesnapshotcontent {name} {ALLOW_MODE_CHANGE}=true")


def check_clone_mode(pvc: Obj, source: Obj, name: str) -> None:
    """A claim clones only a claim of its own volume mode, as the external-provisioner
    refuses it: a CSI clone copies the bytes as they are, so a Block volume a guest wrote
    would be mounted (or formatted over) on the host as a filesystem, and a filesystem's
    raw blocks handed to a guest. A DataVolume with a pvc source copies across modes
    (host-assisted: a blank claim and a conversion), never through this."""
    source_mode = source["spec"].get("volumeMode") or "Filesystem"
    mode = pvc["spec"].get("volumeMode") or "Filesystem"
    if source_mode != mode:
        raise ValueError(
            f"claim {name} is a {source_mode} volume: a clone of it must be volumeMode {source_mode}, not {mode} "
            "(a clone copies the bytes as they are). Ask for volumeMode " + source_mode + ", or clone it with a "
            "DataVolume (source: pvc), which copies the disk across volume modes")


def _content_source(ctx: Context, pvc: Obj) -> tuple[pb.VolumeContentSource | None, int]:
    """The CSI content source of a claim's dataSource, and the source's size (0 if none)."""
    source = pvc["spec"].get("dataSourceRef") or pvc["spec"].get("dataSource")
    if not source:
        return None, 0
    ns = source.get("namespace") or pvc["metadata"]["namespace"]
    if source.get("kind") in ("PersistentVolumeClaim", "VolumeSnapshot"):
        # another namespace's bytes only with its grant, as CDI asks it of a clone: create on
        # datavolumes/source there, for this namespace's service account
        denied = may_clone_from(ctx.store, ns, source.get("name", ""), pvc["metadata"]["namespace"], "default")
        if denied:
            raise ValueError(denied)
    if source.get("kind") == "PersistentVolumeClaim":
        src = ctx.store.get("PersistentVolumeClaim", source["name"], ns)
        if src and src["metadata"].get("deletionTimestamp"):  # as the external-provisioner refuses it
            raise ValueError(f"the source claim {ns}/{source['name']} is being deleted")
        if src:
            check_clone_mode(pvc, src, f"{ns}/{source['name']}")
        if not src or not claim_populated(ctx, src):
            raise WaitingForSource(f"waiting for source claim {ns}/{source['name']} to be bound and populated")
        pv = ctx.store.get("PersistentVolume", src["spec"]["volumeName"])
        size = int(src.get("status", {}).get("capacity", {}).get("storage", "0") or 0)
        return pb.VolumeContentSource(volume=pb.VolumeContentSource.VolumeSource(
            volume_id=pv["spec"]["csi"]["volumeHandle"])), size
    if source.get("kind") == "VolumeSnapshot":
        snap = ctx.store.get("VolumeSnapshot", source["name"], ns)
        if snap and snap["metadata"].get("deletionTimestamp"):
            raise ValueError(f"the source snapshot {ns}/{source['name']} is being deleted")
        status = (snap or {}).get("status") or {}
        if not status.get("snapshotHandle") or not status.get("readyToUse"):
            raise WaitingForSource(f"waiting for source snapshot {ns}/{source['name']} to be ready")
        content = ctx.store.get("VolumeSnapshotContent", status.get("boundVolumeSnapshotContentName") or "", "")
        if content is None:
            raise WaitingForSource(f"waiting for the VolumeSnapshotContent of snapshot {ns}/{source['name']}")
        check_volume_mode(pvc, content, f"{ns}/{source['name']}")
        return pb.VolumeContentSource(snapshot=pb.VolumeContentSource.SnapshotSource(
            snapshot_id=status["snapshotHandle"])), int(status.get("restoreSize", "0") or 0)
    return None, 0  # other populators (DataVolume, ...) fill the volume after it is made


# CDI's claim annotations that ask its controllers to fill the claim (import, upload, clone)
CDI_CLAIM_ANNOTATIONS = ("cdi.kubevirt.io/storage.import.", "cdi.kubevirt.io/storage.upload.",
                         "k8s.io/CloneRequest")


def reconcile_pvc(ctx: Context, pvc: Obj) -> float | None:
    meta = pvc["metadata"]
    if meta.get("deletionTimestamp"):
        return _release(ctx, pvc)
    if pvc.get("status", {}).get("phase") == "Bound":
        _modify_if_needed(ctx, pvc)
        _expand_if_needed(ctx, pvc)
        return
    with _source_read(ctx, pvc):
        _provision(ctx, pvc)


def _source_read(ctx: Context, pvc: Obj):
    """The claim's clone or snapshot source, held while the volume is made from it (its
    deletion waits: source_protection)."""
    source = pvc["spec"].get("dataSourceRef") or pvc["spec"].get("dataSource") or {}
    ns = source.get("namespace") or pvc["metadata"]["namespace"]
    finalizer = {"PersistentVolumeClaim": CLONING, "VolumeSnapshot": SNAPSHOT_AS_SOURCE}.get(source.get("kind"))
    if finalizer is None or not source.get("name"):
        return contextlib.nullcontext()
    return reading(ctx, source["kind"], source["name"], ns, finalizer)


def _provision(ctx: Context, pvc: Obj) -> None:
    meta = pvc["metadata"]
    sc = storage_class_for(ctx, pvc)
    if sc is None:
        _fail(ctx, pvc, "ProvisioningFailed", f"storageclass {pvc['spec'].get('storageClassName')!r} not found")
        return
    if sc.get("provisioner") != DRIVER_NAME:
        _fail(ctx, pvc, "ExternalProvisioning", f"waiting for provisioner {sc.get('provisioner')!r}")
        return
    spec = pvc["spec"]
    try:
        source, source_size = _content_source(ctx, pvc)
        # a clone or restore without a size gets its source's size (CSI: required_bytes 0)
        requested = spec.get("resources", {}).get("requests", {}).get("storage", "0" if source else "1Gi")
        size = parse_quantity(requested)
    except WaitingForSource as exc:
        _fail(ctx, pvc, "WaitingForDataSource", str(exc))
        return
    except (ValueError, LookupError) as exc:
        _fail(ctx, pvc, "ProvisioningFailed", str(exc))
        return
    if source is not None and size and size < source_size:  # as the external-provisioner refuses it
        _fail(ctx, pvc, "ProvisioningFailed",
              f"requested {size} bytes is smaller than the source's {source_size} bytes")
        return
    volume_mode = spec.get("volumeMode", "Filesystem")
    access_modes = spec.get("accessModes") or ["ReadWriteOnce"]
    mount_options = [str(o) for o in sc.get("mountOptions") or []]  # the driver checks them
    pv_name = f"pvc-{meta['uid']}"
    try:  # the secrets the class names: CreateVolume's now, the others in the PersistentVolume
        params, secret_templates = split_parameters({k: str(v) for k, v in (sc.get("parameters") or {}).items()})
        refs = {op: resolve(op, t, pvc, pv_name) for op, t in secret_templates.items()}
        create_secrets = (secret_data(ctx.store, refs["provisioner"]["name"], refs["provisioner"]["namespace"],
                                      "provisioner secret") if "provisioner" in refs else {})
    except SecretRefError as exc:
        _fail(ctx, pvc, "ProvisioningFailed", str(exc))
        return
    fs_type = params.pop("csi.storage.k8s.io/fstype", params.pop("fsType", ""))
    if FINALIZER not in meta.get("finalizers", []):
        ctx.store.patch_metadata("PersistentVolumeClaim", meta["name"], meta["namespace"],
                                 finalizers=meta.get("finalizers", []) + [FINALIZER])
    vac_name = spec.get("volumeAttributesClassName")
    try:
        mutable = _attributes(ctx, vac_name)
    except LookupError as exc:
        _fail(ctx, pvc, "ProvisioningFailed", str(exc))
        return
    request = pb.CreateVolumeRequest(
        name=f"pvc-{meta['uid']}", capacity_range=pb.CapacityRange(required_bytes=size),
        volume_capabilities=[capability(volume_mode, m, fs_type, mount_options) for m in access_modes],
        parameters=params, secrets=create_secrets,
        mutable_parameters=mutable)
    if source is not None:
        request.volume_content_source.CopyFrom(source)
    try:
        volume = ctx.csi.controller.CreateVolume(request).volume
    except grpc.RpcError as exc:
        _fail(ctx, pvc, "ProvisioningFailed", user_text(exc))
        return
    csi_source = {"driver": DRIVER_NAME, "volumeHandle": volume.volume_id, "fsType": fs_type,
                  "volumeAttributes": dict(volume.volume_context)}
    csi_source.update({OPERATIONS[op]: ref for op, ref in refs.items() if OPERATIONS[op]})
    ctx.store.apply({
        "apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": pv_name},
        "spec": {"capacity": {"storage": str(volume.capacity_bytes)}, "accessModes": access_modes,
                 "volumeMode": volume_mode, "persistentVolumeReclaimPolicy": sc.get("reclaimPolicy", "Delete"),
                 "storageClassName": sc["metadata"]["name"],
                 "claimRef": {"kind": "PersistentVolumeClaim", "namespace": meta["namespace"], "name": meta["name"],
                              "uid": meta["uid"]},
                 "mountOptions": mount_options,
                 "csi": csi_source},
    })
    ctx.store.update_status("PersistentVolume", pv_name, "", {"phase": "Bound"})
    # only the fields it owns: a `pvlun apply` of the claim meanwhile is not undone
    ctx.store.patch_spec("PersistentVolumeClaim", meta["name"], meta["namespace"], volumeName=pv_name,
                         storageClassName=sc["metadata"]["name"])
    status = {"phase": "Bound", "accessModes": access_modes, "capacity": {"storage": str(volume.capacity_bytes)}}
    if vac_name:
        status["currentVolumeAttributesClassName"] = vac_name
    set_condition(status, "Provisioned", True, "Provisioned", f"volume {volume.volume_id}")
    ctx.store.update_status("PersistentVolumeClaim", meta["name"], meta["namespace"], status)
    ctx.store.add_event(pvc, "Normal", "ProvisioningSucceeded", f"provisioned volume {pv_name}")
    by_dv = any(o.get("kind") == "DataVolume" for o in meta.get("ownerReferences") or [])
    for key in sorted(meta.get("annotations") or {} if not by_dv else {}):
        if key.startswith(CDI_CLAIM_ANNOTATIONS):  # CDI's older API: a claim annotated to be filled
            ctx.store.add_event(pvc, "Warning", "AnnotationIgnored",
                                f"metadata.annotations[{key}]: CDI's claim annotations do not fill a volume here; "
                                "the claim is left empty (use a DataVolume with spec.source instead)")


def _attributes(ctx: Context, name: str | None) -> dict[str, str]:
    if not name:
        return {}
    vac = ctx.store.get("VolumeAttributesClass", name)
    if vac is None:
        raise LookupError(f"volumeattributesclass {name!r} not found")
    return {k: str(v) for k, v in (vac.get("parameters") or {}).items()}


def _modify_if_needed(ctx: Context, pvc: Obj) -> None:
    """A bound claim whose volumeAttributesClassName changed: ControllerModifyVolume, as
    the external-resizer does."""
    meta, spec, status = pvc["metadata"], pvc["spec"], pvc.get("status") or {}
    wanted = spec.get("volumeAttributesClassName")
    if not wanted or wanted == status.get("currentVolumeAttributesClassName"):
        return
    pv = ctx.store.get("PersistentVolume", spec.get("volumeName", ""))
    try:
        params = _attributes(ctx, wanted)
        ctx.csi.controller.ControllerModifyVolume(pb.ControllerModifyVolumeRequest(
            volume_id=pv["spec"]["csi"]["volumeHandle"], mutable_parameters=params))
    except (LookupError, grpc.RpcError) as exc:
        text = user_text(exc)
        ctx.store.merge_status("PersistentVolumeClaim", meta["name"], meta["namespace"],
                               modifyVolumeStatus={"status": "Infeasible", "targetVolumeAttributesClassName": wanted,
                                                   "message": text})
        return
    ctx.store.merge_status("PersistentVolumeClaim", meta["name"], meta["namespace"],
                           currentVolumeAttributesClassName=wanted, modifyVolumeStatus=None)
    ctx.store.add_event(pvc, "Normal", "VolumeModifySuccessful", f"volume attributes class {wanted} applied")


def _expand_if_needed(ctx: Context, pvc: Obj) -> None:
    """A bound claim asking for more storage: ControllerExpandVolume (external-resizer),
    then NodeExpandVolume wherever the volume is attached (kubelet)."""
    meta, spec, status = pvc["metadata"], pvc["spec"], pvc.get("status") or {}
    try:
        wanted = parse_quantity(spec.get("resources", {}).get("requests", {}).get("storage", "0"))
    except ValueError:
        return
    current = int(status.get("capacity", {}).get("storage", "0") or 0)
    if wanted <= current:
        return
    sc = storage_class_for(ctx, pvc)
    if sc is not None and not sc.get("allowVolumeExpansion", False):
        if status.get("resizeStatus") != "Infeasible":
            ctx.store.merge_status("PersistentVolumeClaim", meta["name"], meta["namespace"], resizeStatus="Infeasible")
            ctx.store.add_event(pvc, "Warning", "ExternalExpanding",
                                f"storageclass {sc['metadata']['name']} does not allow volume expansion")
        return
    pv = ctx.store.get("PersistentVolume", spec.get("volumeName", ""))
    handle = pv["spec"]["csi"]["volumeHandle"]
    try:
        secrets = referenced(ctx.store, pv["spec"]["csi"].get("controllerExpandSecretRef"), "controller-expand secret")
        grown = ctx.csi.controller.ControllerExpandVolume(pb.ControllerExpandVolumeRequest(
            volume_id=handle, capacity_range=pb.CapacityRange(required_bytes=wanted), secrets=secrets))
        if grown.node_expansion_required:
            for att in ctx.store.list("VolumeAttachment"):
                if att["spec"]["volumeId"] == handle:
                    ctx.csi.node(att["spec"]["nodeName"]).NodeExpandVolume(pb.NodeExpandVolumeRequest(
                        volume_id=handle, volume_path=att["spec"]["targetPath"],
                        staging_target_path=att["spec"]["stagingPath"],
                        capacity_range=pb.CapacityRange(required_bytes=wanted)))
    except (grpc.RpcError, SecretRefError) as exc:
        ctx.store.merge_status("PersistentVolumeClaim", meta["name"], meta["namespace"], resizeStatus="Failed")
        ctx.store.add_event(pvc, "Warning", "VolumeResizeFailed", user_text(exc))
        return
    size = str(grown.capacity_bytes)
    pv["spec"]["capacity"]["storage"] = size
    ctx.store.apply(pv)
    ctx.store.merge_status("PersistentVolumeClaim", meta["name"], meta["namespace"],
                           capacity={"storage": size}, resizeStatus=None)
    ctx.store.add_event(pvc, "Normal", "VolumeResizeSuccessful", f"volume grown to {size} bytes")


DELETE_RETRY_SECONDS = 5.0  # a DeleteVolume that failed is tried again (the external-provisioner retries too)


def _release(ctx: Context, pvc: Obj) -> float | None:
    """A deleted claim: delete its volume unless something still has it attached."""
    pv_name = pvc["spec"].get("volumeName")
    pv = ctx.store.get("PersistentVolume", pv_name) if pv_name else None
    if pv:
        handle = pv["spec"]["csi"]["volumeHandle"]
        users = [a for a in ctx.store.list("VolumeAttachment") if a["spec"]["volumeId"] == handle]
        if users:
            return None  # kubernetes.io/pvc-protection: wait until nothing uses it
        if being_read(ctx, pvc):
            return None  # a clone or snapshot of it is being made: its end brings the claim back here
        if pv["spec"].get("persistentVolumeReclaimPolicy", "Delete") == "Delete":
            try:
                ctx.csi.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=handle))
            except grpc.RpcError as exc:
                ctx.store.add_event(pvc, "Warning", "VolumeFailedDelete", user_text(exc))
                return DELETE_RETRY_SECONDS  # e.g. ABORTED while the driver still copies from it
            ctx.store.delete("PersistentVolume", pv_name, "")
    remove_finalizer(ctx.store, pvc, FINALIZER)
    return None
