"""What a VirtualMachineExport exports: the claims of its source, and whether they can be
exported now, as KubeVirt's export controller judges it (pvc-source, vm-source,
vmsnapshot-source).

- a PersistentVolumeClaim: exported once populated (bound, its DataVolume Succeeded) and not
  in use: KubeVirt waits while a Pod other than its exporter uses the claim; here, while a
  VirtualMachineInstance names it or another owner holds it attached (a VM, an import);
- a VirtualMachine: every claim and DataVolume of its volumes, once the VM is stopped (no
  VirtualMachineInstance);
- a VirtualMachineSnapshot: its VirtualMachineSnapshotContent's spec.volumeBackups, each
  restored from its VolumeSnapshot into a temporary claim the export owns (deleted with it).

Reasons as KubeVirt writes them: Ready False with Initializing, PVCPending, InUse; PVCReady
with PVCBound, PVCPending, PVCNotFound, Unknown.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from controlplane.store import Obj, ObjectStore
from controlplane.vm_export_spec import check_source

RESTORED_LABEL = "export.kubevirt.io/export-name"  # on the claims restored for a snapshot's export


@dataclass
class SourceVolumes:
    """(volume name in the URLs, claim name) pairs, and why they cannot be served yet."""
    volumes: list[tuple[str, str]] = field(default_factory=list)
    ready_reason: str = ""  # "" when every claim can be served now
    message: str = ""
    pvc_condition: tuple[bool, str, str] = (False, "Unknown", "")
    vm_name: str | None = None

    @property
    def available(self) -> bool:
        return not self.ready_reason and bool(self.volumes)


def source_volumes(store: ObjectStore, vme: Obj, ours: str) -> SourceVolumes:
    """The export's claims and whether they can be served; `ours` is the attachment owner of
    the export itself (its own attachments do not make a claim busy), or on a cluster `pod:NAME`,
    its exporter Pod (there Pods using a claim make it busy, as KubeVirt judges it)."""
    ns = vme["metadata"].get("namespace", "default")
    source = vme["spec"]["source"]
    kind = check_source(vme["spec"])
    if kind == "PersistentVolumeClaim":
        return _claims(store, ns, [(source["name"], source["name"])], ours)
    if kind == "VirtualMachine":
        return _vm(store, ns, source["name"], ours)
    return _restored(store, vme, ours)


def _claims(store: ObjectStore, ns: str, pairs: list[tuple[str, str]], ours: str) -> SourceVolumes:
    out = SourceVolumes(volumes=pairs)
    phases = []
    for _, claim in pairs:
        pvc = store.get("PersistentVolumeClaim", claim, ns)
        if pvc is None:
            out.volumes = []
            out.ready_reason, out.message = "Initializing", ""
            out.pvc_condition = (False, "PVCNotFound", f"PersistentVolumeClaim {ns}/{claim} not found")
            return out
        phases.append((pvc.get("status") or {}).get("phase") or "Pending")
        populated, why = _populated(store, pvc)
        if not populated and not out.ready_reason:
            out.ready_reason, out.message = "PVCPending", why
        elif not out.ready_reason and (user := _user(store, pvc, ours)):
            out.ready_reason, out.message = "InUse", f"PersistentVolumeClaim {ns}/{claim} is in use ({user})"
    if "Lost" in phases:
        out.pvc_condition = (False, "Unknown", "")
    elif "Pending" in phases:
        out.pvc_condition = (False, "PVCPending", "")
    else:
        out.pvc_condition = (True, "PVCBound", "")
    return out


def _populated(store: ObjectStore, pvc: Obj) -> tuple[bool, str]:
    meta = pvc["metadata"]
    where = f"{meta.get('namespace', 'default')}/{meta['name']}"
    if (pvc.get("status") or {}).get("phase") != "Bound":
        return False, f"PersistentVolumeClaim {where} is not populated"
    dv = store.get("DataVolume", meta["name"], meta.get("namespace", "default"))
    if dv is not None and (dv.get("status") or {}).get("phase") != "Succeeded":
        return False, f"PersistentVolumeClaim {where} is not populated"
    return True, ""


def _user(store: ObjectStore, pvc: Obj, ours: str) -> str:
    """Who else uses the claim now ("" for nobody): a VMI naming it, an attachment of another owner."""
    meta = pvc["metadata"]
    ns, name = meta.get("namespace", "default"), meta["name"]
    for vmi in store.list("VirtualMachineInstance", ns):
        if vmi.get("status", {}).get("phase") in ("Succeeded", "Failed"):
            continue
        for volume in ((vmi.get("spec") or {}).get("volumes") or []):
            if _claim_of(volume) == name:
                return f"VirtualMachineInstance {vmi['metadata']['name']} runs on it"
    if ours.startswith("pod:"):
        for pod in store.list("Pod", ns):
            if pod["metadata"]["name"] == ours[4:] or (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
                continue
            if any(((v or {}).get("persistentVolumeClaim") or {}).get("claimName") == name
                   for v in (pod.get("spec") or {}).get("volumes") or []):
                return f"Pod {pod['metadata']['name']} uses it"
        return ""
    pv_name = (pvc.get("spec") or {}).get("volumeName")
    for att in store.list("VolumeAttachment"):
        spec = att.get("spec") or {}
        owner = spec.get("owner", "")
        if (spec.get("source") or {}).get("persistentVolumeName") == pv_name and owner != ours:
            return f"attached for {owner}"
    return ""


def _claim_of(volume: object) -> str | None:
    if not isinstance(volume, dict):
        return None
    return ((volume.get("persistentVolumeClaim") or {}).get("claimName")
            or (volume.get("dataVolume") or {}).get("name"))


def _vm(store: ObjectStore, ns: str, name: str, ours: str) -> SourceVolumes:
    vm = store.get("VirtualMachine", name, ns)
    if vm is None:
        return SourceVolumes(ready_reason="Initializing", vm_name=name,
                             pvc_condition=(False, "Unknown", f"VirtualMachine {ns}/{name} not found"))
    volumes = (((vm.get("spec") or {}).get("template") or {}).get("spec") or {}).get("volumes") or []
    claims = [c for c in (_claim_of(v) for v in volumes) if c]
    out = _claims(store, ns, [(c, c) for c in claims], ours)
    out.vm_name = name
    vmi = store.get("VirtualMachineInstance", name, ns)
    if vmi is not None and (vmi.get("status") or {}).get("phase") not in ("Succeeded", "Failed"):
        out.ready_reason, out.message = "InUse", f"Virtual Machine {ns}/{name} is running"
    elif not claims:
        out.ready_reason, out.message = "Initializing", f"VirtualMachine {ns}/{name} has no volumes to export"
    return out


def restored_claim_name(export: str, claim: str) -> str:
    """The temporary claim a snapshot's volume is restored into (a DNS subdomain, bounded)."""
    import hashlib

    name = f"{export}-{claim}"
    if len(name) <= 253:
        return name
    return name[:240] + "-" + hashlib.sha256(name.encode()).hexdigest()[:12]


def _restored(store: ObjectStore, vme: Obj, ours: str) -> SourceVolumes:
    """A snapshot's volumes, each restored into a claim the export owns (made here when missing)."""
    meta = vme["metadata"]
    ns, export = meta.get("namespace", "default"), meta["name"]
    snap_name = vme["spec"]["source"]["name"]
    snap = store.get("VirtualMachineSnapshot", snap_name, ns)
    if snap is None:
        return SourceVolumes(ready_reason="Initializing", pvc_condition=(
            False, "Unknown", f"VirtualMachineSnapshot {ns}/{snap_name} not found"))
    status = snap.get("status") or {}
    vm_name = ((snap.get("spec") or {}).get("source") or {}).get("name")
    content_name = status.get("virtualMachineSnapshotContentName")
    content = store.get("VirtualMachineSnapshotContent", content_name, ns) if content_name else None
    if status.get("readyToUse") is not True or content is None:
        return SourceVolumes(ready_reason="Initializing", vm_name=vm_name, message=(
            f"VirtualMachineSnapshot {ns}/{snap_name} is not ready to use"), pvc_condition=(False, "Unknown", ""))
    pairs = []
    for backup in (content.get("spec") or {}).get("volumeBackups") or []:
        claim_meta = ((backup.get("persistentVolumeClaim") or {}).get("metadata") or {})
        source_claim, snapshot = claim_meta.get("name"), backup.get("volumeSnapshotName")
        if not source_claim or not snapshot:
            continue
        restored = restored_claim_name(export, source_claim)
        if store.get("PersistentVolumeClaim", restored, ns) is None:
            store.create(_restore_claim(vme, restored, backup, snapshot))
        pairs.append((source_claim, restored))
    if not pairs:
        return SourceVolumes(ready_reason="Initializing", vm_name=vm_name, message=(
            f"VirtualMachineSnapshot {ns}/{snap_name} holds no volume backups"))
    out = _claims(store, ns, pairs, ours)
    out.vm_name = vm_name
    return out


def _restore_claim(vme: Obj, name: str, backup: Obj, snapshot: str) -> Obj:
    meta = vme["metadata"]
    claim_spec = dict(((backup.get("persistentVolumeClaim") or {}).get("spec")) or {})
    for k in ("volumeName", "dataSource", "dataSourceRef", "selector"):
        claim_spec.pop(k, None)
    claim_spec["dataSource"] = {"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": snapshot}
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": name, "namespace": meta.get("namespace", "default"),
                         "labels": {RESTORED_LABEL: meta["name"]},
                         "ownerReferences": [{"apiVersion": "export.kubevirt.io/v1beta1",
                                              "kind": "VirtualMachineExport", "name": meta["name"],
                                              "uid": meta.get("uid", ""), "controller": True}]},
            "spec": claim_spec}


def restored_claims(store: ObjectStore, vme: Obj) -> list[str]:
    """The temporary claims restored for this export (deleted with it)."""
    ns, name = vme["metadata"].get("namespace", "default"), vme["metadata"]["name"]
    return [p["metadata"]["name"] for p in store.list("PersistentVolumeClaim", ns)
            if (p["metadata"].get("labels") or {}).get(RESTORED_LABEL) == name]
