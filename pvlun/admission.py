"""What `pvlun apply` accepts: known kinds, each checked before anything is stored, with
the offending field named (as a Kubernetes admission webhook would answer)."""

from __future__ import annotations

import re
from typing import Any, Callable

import yaml

from pvlun.quantity import parse_quantity

KINDS = {
    "StorageClass": "storage.k8s.io/v1",
    "PersistentVolumeClaim": "v1",
    "Secret": "v1",
    "ConfigMap": "v1",
    "DataVolume": "cdi.kubevirt.io/v1beta1",
    "VolumeSnapshot": "snapshot.storage.k8s.io/v1",
    "VolumeAttributesClass": "storage.k8s.io/v1beta1",
    "VirtualMachine": "kubevirt.io/v1",
    "VirtualMachineInstanceMigration": "kubevirt.io/v1",
}
# Short names as kubectl knows them.
ALIASES = {
    "sc": "StorageClass", "storageclass": "StorageClass", "storageclasses": "StorageClass",
    "pvc": "PersistentVolumeClaim", "pvcs": "PersistentVolumeClaim", "persistentvolumeclaim": "PersistentVolumeClaim",
    "persistentvolumeclaims": "PersistentVolumeClaim",
    "pv": "PersistentVolume", "pvs": "PersistentVolume", "persistentvolume": "PersistentVolume",
    "persistentvolumes": "PersistentVolume",
    "dv": "DataVolume", "dvs": "DataVolume", "datavolume": "DataVolume", "datavolumes": "DataVolume",
    "secret": "Secret", "secrets": "Secret", "configmap": "ConfigMap", "configmaps": "ConfigMap", "cm": "ConfigMap",
    "vm": "VirtualMachine", "vms": "VirtualMachine", "virtualmachine": "VirtualMachine",
    "virtualmachines": "VirtualMachine",
    "vmi": "VirtualMachineInstance", "vmis": "VirtualMachineInstance",
    "virtualmachineinstance": "VirtualMachineInstance", "virtualmachineinstances": "VirtualMachineInstance",
    "vmim": "VirtualMachineInstanceMigration", "virtualmachineinstancemigration": "VirtualMachineInstanceMigration",
    "virtualmachineinstancemigrations": "VirtualMachineInstanceMigration",
    "volumesnapshot": "VolumeSnapshot", "volumesnapshots": "VolumeSnapshot", "vs": "VolumeSnapshot",
    "volumesnapshotcontent": "VolumeSnapshotContent", "volumesnapshotcontents": "VolumeSnapshotContent",
    "vsc": "VolumeSnapshotContent",
    "volumeattachment": "VolumeAttachment", "volumeattachments": "VolumeAttachment",
    "vac": "VolumeAttributesClass", "volumeattributesclass": "VolumeAttributesClass",
    "volumeattributesclasses": "VolumeAttributesClass",
}


# Kubernetes object names: a DNS-1123 subdomain; namespaces: a DNS-1123 label. Names reach
# paths (run dirs, publish targets), so nothing else is accepted.
_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def check_name(name: object, namespace: object) -> None:
    if not isinstance(name, str) or len(name) > 253 or not _SUBDOMAIN.fullmatch(name):
        raise ValueError(f"metadata.name {name!r} is not a valid name (lowercase letters, digits, '-' and '.', "
                         "starting and ending with a letter or digit)")
    if namespace is not None and (not isinstance(namespace, str) or len(namespace) > 63
                                  or not _LABEL.fullmatch(namespace)):
        raise ValueError(f"metadata.namespace {namespace!r} is not a valid namespace (lowercase letters, digits "
                         "and '-')")


class Refused(ValueError):
    """An object `apply` will not store; the message names the document and field."""


def kind_of(name: str) -> str:
    return ALIASES.get(name.lower(), name)


def _check_pvc(obj: dict) -> None:
    spec = obj.get("spec") or {}
    storage = (spec.get("resources") or {}).get("requests", {}).get("storage")
    if storage is None and not (spec.get("dataSource") or spec.get("dataSourceRef")):
        raise ValueError("spec.resources.requests.storage is required")
    if storage is not None:
        try:
            parse_quantity(storage)
        except ValueError as exc:
            raise ValueError(f"spec.resources.requests.storage: {exc}") from None
    mode = spec.get("volumeMode", "Filesystem")
    if mode not in ("Filesystem", "Block"):
        raise ValueError(f"spec.volumeMode: {mode!r} is not Filesystem or Block")
    for i, m in enumerate(spec.get("accessModes") or []):
        if m not in ("ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"):
            raise ValueError(f"spec.accessModes[{i}]: unknown access mode {m!r}")


def _check_dv(obj: dict) -> None:
    from importer.dv_spec import validate

    validate(obj)


def _check_vm(obj: dict) -> None:
    from virt.spec import parse_virtual_machine

    parse_virtual_machine(obj)


def _check_migration(obj: dict) -> None:
    from virt.spec import parse_migration

    parse_migration(obj)


def _check_storage_class(obj: dict) -> None:
    if not obj.get("provisioner"):
        raise ValueError("provisioner is required")


def _check_attributes_class(obj: dict) -> None:
    from csi.errors import CsiError
    from csi.validation import check_mutable

    if not obj.get("driverName"):
        raise ValueError("driverName is required")
    try:
        check_mutable({k: str(v) for k, v in (obj.get("parameters") or {}).items()})
    except CsiError as exc:
        raise ValueError(f"parameters: {exc.message}") from None


CHECKS: dict[str, Callable[[dict], None]] = {
    "VolumeAttributesClass": _check_attributes_class,
    "PersistentVolumeClaim": _check_pvc,
    "DataVolume": _check_dv,
    "VirtualMachine": _check_vm,
    "VirtualMachineInstanceMigration": _check_migration,
    "StorageClass": _check_storage_class,
}


def load_documents(text: str) -> list[dict[str, Any]]:
    """Every non-empty YAML document, checked; Refused names the first bad one."""
    try:
        docs = [d for d in yaml.safe_load_all(text) if d]
    except yaml.YAMLError as exc:
        raise Refused(f"not valid YAML: {exc}") from None
    out = []
    for i, doc in enumerate(docs):
        if isinstance(doc, dict) and doc.get("kind") == "List":
            docs.extend(doc.get("items") or [])
            continue
        where = f"document {i + 1}"
        if not isinstance(doc, dict) or "kind" not in doc:
            raise Refused(f"{where}: not a Kubernetes object (no kind)")
        kind = doc["kind"]
        name = (doc.get("metadata") or {}).get("name")
        where = f"{kind}/{name}" if name else where
        if kind not in KINDS:
            raise Refused(f"{where}: kind {kind!r} is not one pvlun serves ({', '.join(sorted(KINDS))})")
        if not name:
            raise Refused(f"{where}: metadata.name is required")
        try:
            check_name(name, (doc.get("metadata") or {}).get("namespace"))
            CHECKS.get(kind, lambda o: None)(doc)
        except ValueError as exc:
            raise Refused(f"{kind} {name!r} is invalid: {exc}") from None
        out.append(doc)
    return out
