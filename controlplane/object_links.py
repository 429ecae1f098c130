"""Which objects wait on which: when one changes, the ones linked to it are reconciled too.

A DataVolume waits on its claim, a claim on its volume, its StorageClass and its data
source, a VirtualMachine on its DataVolumes, claims and VMI, a migration on its VMI, a
claim being deleted on the VolumeAttachments of its volume... Links come from
ownerReferences and the fields that name another object. `LinkIndex` keeps the last seen
body of every object (as an informer's cache does), so a deleted object's links are still
known, and the reverse links, so a change reaches the objects that name the changed one.
"""

from __future__ import annotations

from typing import Iterable

from controlplane.instancetypes import INSTANCETYPE_KINDS, PREFERENCE_KINDS
from controlplane.store import CLUSTER_SCOPED, Key, Obj, namespace_of

# Kinds nobody reconciles whose changes matter one step further: a VolumeAttachment names a
# PersistentVolume, whose claim waits for its attachments to go; a restore waits on the
# VolumeSnapshotContent of its snapshot (its annotation may allow a change of volume mode).
PASS_THROUGH = {"PersistentVolume", "VolumeSnapshotContent"}
# VolumeAttachment owners (kubelet.attach's `owner`) → the kind of object that made them
MIGRATION_JOB = "kubevirt.io/migrationJobName"  # the annotation naming a target Pod's migration
IMPORT_CRON_LABEL = "cdi.kubevirt.io/dataImportCron"  # on a DataImportCron's DataVolumes and DataSource
ATTACHMENT_OWNERS = {"import": "DataVolume", "clone": "DataVolume", "upload": "DataVolume", "vm": "VirtualMachine",
                     "vmexport": "VirtualMachineExport"}


def key(kind: str, namespace: str, name: object) -> Key | None:
    if not isinstance(name, str) or not name or not isinstance(kind, str):
        return None
    return (kind, "" if kind in CLUSTER_SCOPED else (namespace or "default"), name)


def key_of(obj: Obj) -> Key:
    return (obj["kind"], namespace_of(obj), obj["metadata"]["name"])


def _dict(value: object) -> dict:
    return value if isinstance(value, dict) else {}


def _list(value: object) -> list:
    return value if isinstance(value, list) else []


def _claim(ns: str, name: object) -> list[Key | None]:
    """A claim and the DataVolume that fills it (same name), for whoever reads either."""
    return [key("PersistentVolumeClaim", ns, name), key("DataVolume", ns, name)]


def _data_source(source: object, ns: str) -> list[Key | None]:
    source = _dict(source)
    src_ns = source.get("namespace") or ns
    if source.get("kind") == "PersistentVolumeClaim":
        return _claim(src_ns, source.get("name"))
    return [key(source.get("kind", ""), src_ns, source.get("name"))]


def _instancetype_links(spec: dict, ns: str) -> list[Key | None]:
    out: list[Key | None] = []
    for field, kinds in (("instancetype", INSTANCETYPE_KINDS), ("preference", PREFERENCE_KINDS)):
        matcher = _dict(spec.get(field))
        kind = matcher.get("kind") or kinds[0]  # the cluster kind by default, as KubeVirt has it
        if kind in kinds:
            out.append(key(kind, ns, matcher.get("name")))
    return out


def links(obj: Obj) -> set[Key]:
    """The objects this one names (its owners, its claim, its source, ...)."""
    kind, meta, ns = obj.get("kind"), _dict(obj.get("metadata")), namespace_of(obj)
    spec, name = _dict(obj.get("spec")), meta.get("name")
    out: list[Key | None] = [key(_dict(r).get("kind", ""), ns, _dict(r).get("name"))
                             for r in _list(meta.get("ownerReferences"))]
    if kind == "PersistentVolumeClaim":
        out += _claim(ns, name) + _data_source(spec.get("dataSourceRef") or spec.get("dataSource"), ns)
        out += [key("PersistentVolume", "", spec.get("volumeName")), key("StorageClass", "", spec.get("storageClassName")),
                key("VolumeAttributesClass", "", spec.get("volumeAttributesClassName"))]
    elif kind == "PersistentVolume":
        ref = _dict(spec.get("claimRef"))
        out += _claim(ref.get("namespace", ""), ref.get("name"))
    elif kind == "DataVolume":
        out += _claim(ns, name)
        ref = _dict(spec.get("sourceRef"))
        out.append(key("DataSource", ref.get("namespace") or ns, ref.get("name")))
        out.append(key("DataImportCron", ns, _dict(meta.get("labels")).get(IMPORT_CRON_LABEL)))  # one of its imports
        for source_kind, body in _dict(spec.get("source")).items():
            body = _dict(body)
            if source_kind == "pvc":
                out += _claim(body.get("namespace") or ns, body.get("name"))
            elif source_kind == "snapshot":
                out.append(key("VolumeSnapshot", body.get("namespace") or ns, body.get("name")))
    elif kind == "VolumeSnapshot":
        out += _claim(ns, _dict(spec.get("source")).get("persistentVolumeClaimName"))
    elif kind == "DataSource":  # CDI's: it is Ready when what it points at is
        source = _dict(spec.get("source"))
        pvc, snapshot = _dict(source.get("pvc")), _dict(source.get("snapshot"))
        out += _claim(pvc.get("namespace") or ns, pvc.get("name"))
        out.append(key("VolumeSnapshot", snapshot.get("namespace") or ns, snapshot.get("name")))
    elif kind == "DataImportCron":  # its managed DataSource (its DataVolumes name it as their owner)
        out.append(key("DataSource", ns, spec.get("managedDataSource")))
    elif kind == "StorageProfile":  # kept by its StorageClass's reconcile
        out.append(key("StorageClass", "", name))
    elif kind == "VolumeSnapshotContent":
        ref = _dict(spec.get("volumeSnapshotRef"))
        out.append(key("VolumeSnapshot", ref.get("namespace", ""), ref.get("name")))
    elif kind in ("VirtualMachine", "VirtualMachineInstance"):
        out += [key("VirtualMachine", ns, name), key("VirtualMachineInstance", ns, name)]
        template = _dict(_dict(spec.get("template")).get("spec")) if kind == "VirtualMachine" else spec
        for volume in _list(template.get("volumes")):
            volume = _dict(volume)
            out += _claim(ns, _dict(volume.get("dataVolume")).get("name"))
            out += _claim(ns, _dict(volume.get("persistentVolumeClaim")).get("claimName"))
        for t in _list(spec.get("dataVolumeTemplates")):
            out.append(key("DataVolume", ns, _dict(_dict(t).get("metadata")).get("name")))
        if kind == "VirtualMachine":  # a VM waits for the instancetype and preference it names
            out += _instancetype_links(spec, ns)
    elif kind == "VirtualMachineInstanceMigration":
        vmi = spec.get("vmiName")
        out += [key("VirtualMachineInstance", ns, vmi), key("VirtualMachine", ns, vmi)]
    elif kind == "Pod":  # an importer Pod is its claim's (so its DataVolume's), a launcher its VMI's (so its VM's)
        for ref in _list(meta.get("ownerReferences")):
            ref = _dict(ref)
            if ref.get("kind") == "PersistentVolumeClaim":
                out += _claim(ns, ref.get("name"))
            elif ref.get("kind") == "VirtualMachineInstance":
                out.append(key("VirtualMachine", ns, ref.get("name")))
        # a migration's target Pod is its migration's too (KubeVirt's kubevirt.io/migrationJobName)
        out.append(key("VirtualMachineInstanceMigration", ns, _dict(meta.get("annotations")).get(MIGRATION_JOB)))
    elif kind == "VirtualMachineExport":  # waits on its source (a claim, a VM and its VMI, a VM snapshot)
        source = _dict(spec.get("source"))
        if source.get("kind") == "PersistentVolumeClaim":
            out += _claim(ns, source.get("name"))
        else:
            out.append(key(str(source.get("kind", "")), ns, source.get("name")))
        if source.get("kind") == "VirtualMachine":
            out.append(key("VirtualMachineInstance", ns, source.get("name")))
    elif kind == "VolumeAttachment":
        out.append(key("PersistentVolume", "", _dict(spec.get("source")).get("persistentVolumeName")))
        parts = str(spec.get("owner", "")).split("/")
        if len(parts) >= 3 and parts[0] in ATTACHMENT_OWNERS:
            out.append(key(ATTACHMENT_OWNERS[parts[0]], parts[1], parts[2]))
    mine = key_of(obj) if isinstance(name, str) else None
    return {k for k in out if k is not None and k != mine}


class LinkIndex:
    """The last seen body of every object and who names whom (not thread-safe: one watcher)."""

    def __init__(self) -> None:
        self.objects: dict[Key, Obj] = {}
        self._links: dict[Key, set[Key]] = {}
        self._named_by: dict[Key, set[Key]] = {}

    def update(self, k: Key, obj: Obj | None) -> set[Key]:
        """Record the object's new body (None: deleted); return the keys its change concerns:
        itself, what it named before and now, what names it, and one step past PASS_THROUGH
        kinds (on either side)."""
        old = self._links.pop(k, set())
        for target in old:
            names = self._named_by.get(target)
            if names is not None:
                names.discard(k)
                if not names:
                    del self._named_by[target]
        new: set[Key] = set()
        if obj is None:
            self.objects.pop(k, None)
        else:
            self.objects[k] = obj
            new = links(obj)
            self._links[k] = new
            for target in new:
                self._named_by.setdefault(target, set()).add(k)
        touched = {k} | old | new | self._named_by.get(k, set())
        if k[0] in PASS_THROUGH:  # its change is a change of what it names, for whoever waits on that
            touched |= self.around(old | new)
        return touched | self.around(t for t in touched if t[0] in PASS_THROUGH)

    def around(self, keys: Iterable[Key]) -> set[Key]:
        """What the given objects name and what names them."""
        out: set[Key] = set()
        for k in keys:
            out |= self._links.get(k, set()) | self._named_by.get(k, set())
        return out
