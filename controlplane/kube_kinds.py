"""Where each kind pvlun uses lives on a Kubernetes API server, and the paths of its REST
resources (the API server's own layout: /api/v1 for the core group, /apis/GROUP/VERSION
otherwise; namespaced kinds under /namespaces/NS).

A name or namespace reaches a URL path, so it is checked first, as the API server checks
it: a namespace is a DNS label, a name a path segment (no "/", no "%", not "." or "..").
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

Obj = dict[str, Any]


@dataclass(frozen=True)
class KubeKind:
    kind: str
    group: str  # "" for the core group
    version: str
    plural: str
    namespaced: bool
    status: bool  # served with a /status subresource (writes of the object ignore its status)

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(self, namespace: str | None = None, name: str | None = None, subresource: str = "") -> str:
        """The collection (`name` None) or one object; all namespaces when `namespace` is None."""
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if self.namespaced and namespace is not None:
            base += f"/namespaces/{checked_namespace(namespace)}"
        base += f"/{self.plural}"
        if name is not None:
            base += "/" + quote(checked_name(name), safe="")
            if subresource:
                base += f"/{subresource}"
        return base


def _kinds(*rows: tuple[str, str, str, str, bool, bool]) -> dict[str, KubeKind]:
    return {row[0]: KubeKind(*row) for row in rows}


NS, CLUSTER, STATUS, PLAIN = True, False, True, False
KINDS: dict[str, KubeKind] = _kinds(
    ("PersistentVolumeClaim", "", "v1", "persistentvolumeclaims", NS, STATUS),
    ("PersistentVolume", "", "v1", "persistentvolumes", CLUSTER, STATUS),
    ("Secret", "", "v1", "secrets", NS, PLAIN),
    ("ConfigMap", "", "v1", "configmaps", NS, PLAIN),
    ("Pod", "", "v1", "pods", NS, STATUS),
    ("Service", "", "v1", "services", NS, STATUS),
    ("Node", "", "v1", "nodes", CLUSTER, STATUS),
    ("Namespace", "", "v1", "namespaces", CLUSTER, STATUS),
    ("Event", "events.k8s.io", "v1", "events", NS, PLAIN),
    ("Lease", "coordination.k8s.io", "v1", "leases", NS, PLAIN),
    ("StorageClass", "storage.k8s.io", "v1", "storageclasses", CLUSTER, PLAIN),
    ("VolumeAttachment", "storage.k8s.io", "v1", "volumeattachments", CLUSTER, STATUS),
    ("VolumeAttributesClass", "storage.k8s.io", "v1", "volumeattributesclasses", CLUSTER, PLAIN),
    ("VolumeSnapshot", "snapshot.storage.k8s.io", "v1", "volumesnapshots", NS, STATUS),
    ("VolumeSnapshotContent", "snapshot.storage.k8s.io", "v1", "volumesnapshotcontents", CLUSTER, STATUS),
    ("VolumeSnapshotClass", "snapshot.storage.k8s.io", "v1", "volumesnapshotclasses", CLUSTER, PLAIN),
    ("DataVolume", "cdi.kubevirt.io", "v1beta1", "datavolumes", NS, STATUS),
    ("DataSource", "cdi.kubevirt.io", "v1beta1", "datasources", NS, STATUS),
    ("DataImportCron", "cdi.kubevirt.io", "v1beta1", "dataimportcrons", NS, STATUS),
    ("StorageProfile", "cdi.kubevirt.io", "v1beta1", "storageprofiles", CLUSTER, STATUS),
    ("VirtualMachine", "kubevirt.io", "v1", "virtualmachines", NS, STATUS),
    ("VirtualMachineInstance", "kubevirt.io", "v1", "virtualmachineinstances", NS, STATUS),
    ("VirtualMachineInstanceMigration", "kubevirt.io", "v1", "virtualmachineinstancemigrations", NS, STATUS),
    ("VirtualMachineInstanceReplicaSet", "kubevirt.io", "v1", "virtualmachineinstancereplicasets", NS, STATUS),
    ("VirtualMachinePool", "pool.kubevirt.io", "v1beta1", "virtualmachinepools", NS, STATUS),
    ("VirtualMachineInstancetype", "instancetype.kubevirt.io", "v1beta1", "virtualmachineinstancetypes", NS, PLAIN),
    ("VirtualMachineClusterInstancetype", "instancetype.kubevirt.io", "v1beta1", "virtualmachineclusterinstancetypes",
     CLUSTER, PLAIN),
    ("VirtualMachinePreference", "instancetype.kubevirt.io", "v1beta1", "virtualmachinepreferences", NS, PLAIN),
    ("VirtualMachineClusterPreference", "instancetype.kubevirt.io", "v1beta1", "virtualmachineclusterpreferences",
     CLUSTER, PLAIN),
    ("ControllerRevision", "apps", "v1", "controllerrevisions", NS, PLAIN),
    ("VirtualMachineSnapshot", "snapshot.kubevirt.io", "v1beta1", "virtualmachinesnapshots", NS, STATUS),
    ("VirtualMachineSnapshotContent", "snapshot.kubevirt.io", "v1beta1", "virtualmachinesnapshotcontents", NS, STATUS),
    ("VirtualMachineRestore", "snapshot.kubevirt.io", "v1beta1", "virtualmachinerestores", NS, STATUS),
    ("VirtualMachineExport", "export.kubevirt.io", "v1beta1", "virtualmachineexports", NS, STATUS),
    ("Role", "rbac.authorization.k8s.io", "v1", "roles", NS, PLAIN),
    ("ClusterRole", "rbac.authorization.k8s.io", "v1", "clusterroles", CLUSTER, PLAIN),
    ("RoleBinding", "rbac.authorization.k8s.io", "v1", "rolebindings", NS, PLAIN),
    ("ClusterRoleBinding", "rbac.authorization.k8s.io", "v1", "clusterrolebindings", CLUSTER, PLAIN),
)

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


class ApiError(Exception):
    """A refusal of the API server, as its Status object says it: code, reason, message."""

    def __init__(self, code: int, reason: str, message: str):
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message


def kind_info(kind: str) -> KubeKind:
    try:
        return KINDS[kind]
    except (KeyError, TypeError):
        raise ValueError(f"kind {str(kind)[:64]!r} is not one pvlun keeps on a Kubernetes API "
                         f"(it knows: {', '.join(sorted(KINDS))})") from None


def checked_namespace(namespace: str) -> str:
    if not isinstance(namespace, str) or not _DNS_LABEL.fullmatch(namespace):
        raise ValueError(f"namespace {str(namespace)[:64]!r} is not a DNS label (lower-case letters, digits "
                         "and '-', at most 63)")
    return namespace


def checked_name(name: str) -> str:
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "%" in name or len(name) > 253:
        raise ValueError(f"name {str(name)[:64]!r} cannot be an object's name (empty, '.', '..', or has '/' or '%', "
                         "or longer than 253)")
    return name


def namespace_for(info: KubeKind, namespace: str | None) -> str:
    """The namespace part of a store key: "" for cluster-scoped kinds, else the namespace
    ("default" when none is given, as SQLiteStore has it)."""
    return checked_namespace(namespace or "default") if info.namespaced else ""
