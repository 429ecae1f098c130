"""The types of the fields pvlun reads, per kind: what the API server's OpenAPI schema checks
before an object is stored, so that no reconciler ever meets `accessModes: ReadWriteOnce`
(a string where a list belongs) or `spec: []` and fails on it forever.

`conform(obj)` checks an object field by field and returns it normalised as Kubernetes
would store it: a null field is an absent one (an empty object where an object belongs),
server-set metadata and `status` are dropped. Fields pvlun does not read are left alone.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

from controlplane.quantity import parse_quantity
from controlplane.user_text import quoted

ACCESS_MODES = ("ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod")
SERVER_SET = ("uid", "resourceVersion", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds",
              "generation", "managedFields", "selfLink")
_DATA_KEY = re.compile(r"[-._a-zA-Z0-9]{1,253}")  # Secret and ConfigMap keys


class FieldError(ValueError):
    def __init__(self, path: str, message: str):
        super().__init__(f"{path}: {message}" if path else message)


_TYPE_NAMES = {str: "a string", int: "an integer", bool: "true or false", float: "a number", list: "a list",
               dict: "an object", type(None): "null"}


def _kind_of(value: Any) -> str:
    return _TYPE_NAMES.get(type(value), type(value).__name__)


class Type:
    empty: Any = None  # what a null becomes (None: the field is dropped)

    def conform(self, value: Any, path: str) -> Any:
        raise NotImplementedError


class Scalar(Type):
    def __init__(self, kind: type, name: str):
        self.kind, self.name = kind, name

    def conform(self, value: Any, path: str) -> Any:
        if not isinstance(value, self.kind) or (self.kind is int and isinstance(value, bool)):
            raise FieldError(path, f"must be {self.name}, not {_kind_of(value)}")
        return value


STR, INT, BOOL = Scalar(str, "a string"), Scalar(int, "an integer"), Scalar(bool, "true or false")


class OneOf(Type):
    def __init__(self, *values: str):
        self.values = values

    def conform(self, value: Any, path: str) -> Any:
        if value not in self.values or not isinstance(value, str):
            raise FieldError(path, f"{quoted(value)} is not one of {', '.join(self.values)}")
        return value


class Quantity(Type):
    def conform(self, value: Any, path: str) -> Any:
        try:
            parse_quantity(value)
        except ValueError as exc:
            raise FieldError(path, str(exc)) from None
        return value


class Base64(Type):
    def conform(self, value: Any, path: str) -> Any:
        try:
            base64.b64decode(STR.conform(value, path), validate=True)
        except binascii.Error:
            raise FieldError(path, "is not valid base64") from None
        return value


class ListOf(Type):
    def __init__(self, item: Type):
        self.item = item

    def conform(self, value: Any, path: str) -> list:
        if not isinstance(value, list):
            raise FieldError(path, f"must be a list, not {_kind_of(value)}")
        return [self.item.conform(v, f"{path}[{i}]") for i, v in enumerate(value)]


class MapOf(Type):
    """An object with string keys (matching `keys`, if given) and values of one type."""

    empty: Any = {}

    def __init__(self, value: Type, keys: re.Pattern | None = None):
        self.value, self.keys = value, keys

    def conform(self, value: Any, path: str) -> dict:
        if not isinstance(value, dict):
            raise FieldError(path, f"must be an object, not {_kind_of(value)}")
        out = {}
        for k, v in value.items():
            if not isinstance(k, str) or (self.keys is not None and not self.keys.fullmatch(k)):
                raise FieldError(path, f"{quoted(k)} is not a valid key")
            out[k] = self.value.conform(v, f"{path}.{k}")
        return out


class Fields(Type):
    """An object whose named fields have these types (others are kept as they are)."""

    empty: Any = {}

    def __init__(self, **fields: Type):
        self.fields = fields

    def conform(self, value: Any, path: str) -> dict:
        if not isinstance(value, dict):
            raise FieldError(path, f"must be an object, not {_kind_of(value)}")
        out = dict(value)
        for name, kind in self.fields.items():
            if name not in out:
                continue
            where = f"{path}.{name}" if path else name
            if out[name] is None:
                if kind.empty is None:
                    del out[name]
                else:
                    out[name] = dict(kind.empty)
                continue
            out[name] = kind.conform(out[name], where)
        return out


ANY_MAP = MapOf(Scalar(object, "anything"))
REF = Fields(apiGroup=STR, kind=STR, name=STR, namespace=STR)
OWNER_REF = Fields(apiVersion=STR, kind=STR, name=STR, uid=STR, controller=BOOL, blockOwnerDeletion=BOOL)
METADATA = Fields(name=STR, namespace=STR, labels=MapOf(STR), annotations=MapOf(STR), finalizers=ListOf(STR),
                  ownerReferences=ListOf(OWNER_REF))
CLAIM_SPEC = Fields(accessModes=ListOf(OneOf(*ACCESS_MODES)), volumeMode=OneOf("Filesystem", "Block"),
                    resources=Fields(requests=MapOf(Quantity()), limits=MapOf(Quantity())),
                    storageClassName=STR, volumeName=STR, volumeAttributesClassName=STR,
                    dataSource=REF, dataSourceRef=REF, selector=ANY_MAP)
_URL_SOURCE = dict(url=STR, secretRef=STR, certConfigMap=STR)
DATA_VOLUME_SPEC = Fields(
    source=Fields(http=Fields(**_URL_SOURCE, extraHeaders=ListOf(STR), secretExtraHeaders=ListOf(STR), checksum=STR,
                              insecureSkipVerify=BOOL),
                  registry=Fields(**_URL_SOURCE, pullMethod=STR, checksum=STR, insecureSkipVerify=BOOL), s3=Fields(**_URL_SOURCE, checksum=STR),
                  upload=ANY_MAP, blank=ANY_MAP, pvc=Fields(name=STR, namespace=STR),
                  snapshot=Fields(name=STR, namespace=STR)),
    sourceRef=Fields(kind=STR, name=STR, namespace=STR), storage=CLAIM_SPEC, pvc=CLAIM_SPEC, contentType=STR,
    preallocation=BOOL)
POLICY_RULE = Fields(apiGroups=ListOf(STR), resources=ListOf(STR), verbs=ListOf(STR), resourceNames=ListOf(STR),
                     nonResourceURLs=ListOf(STR))
ROLE_REF = Fields(apiGroup=STR, kind=OneOf("Role", "ClusterRole"), name=STR)
SUBJECT = Fields(kind=OneOf("User", "Group", "ServiceAccount"), name=STR, namespace=STR, apiGroup=STR)
CLAIM_PROPERTY_SET = Fields(accessModes=ListOf(OneOf(*ACCESS_MODES)), volumeMode=OneOf("Filesystem", "Block"))
VMI_TEMPLATE = Fields(metadata=Fields(labels=MapOf(STR), annotations=MapOf(STR)), spec=ANY_MAP)
VM_SPEC = Fields(running=BOOL, runStrategy=STR, template=VMI_TEMPLATE,
                 dataVolumeTemplates=ListOf(Fields(metadata=METADATA, spec=DATA_VOLUME_SPEC)))
LABEL_SELECTOR = Fields(matchLabels=MapOf(STR), matchExpressions=ListOf(Fields(key=STR, operator=STR,
                                                                               values=ListOf(STR))))

SPECS: dict[str, Fields] = {
    "StorageClass": Fields(provisioner=STR, parameters=MapOf(STR), reclaimPolicy=OneOf("Delete", "Retain"),
                           volumeBindingMode=STR, allowVolumeExpansion=BOOL, mountOptions=ListOf(STR)),
    "PersistentVolumeClaim": Fields(spec=CLAIM_SPEC),
    "DataVolume": Fields(spec=DATA_VOLUME_SPEC),
    "Secret": Fields(data=MapOf(Base64(), _DATA_KEY), stringData=MapOf(STR, _DATA_KEY), type=STR, immutable=BOOL),
    "ConfigMap": Fields(data=MapOf(STR, _DATA_KEY), binaryData=MapOf(Base64(), _DATA_KEY), immutable=BOOL),
    "Namespace": Fields(spec=Fields(finalizers=ListOf(STR))),
    "VolumeSnapshot": Fields(spec=Fields(source=Fields(persistentVolumeClaimName=STR, volumeSnapshotContentName=STR),
                                         volumeSnapshotClassName=STR)),
    "VolumeSnapshotClass": Fields(driver=STR, parameters=MapOf(STR), deletionPolicy=OneOf("Delete", "Retain")),
    "VolumeAttributesClass": Fields(driverName=STR, parameters=MapOf(STR)),
    "VirtualMachine": Fields(spec=VM_SPEC),
    "VirtualMachinePool": Fields(spec=Fields(replicas=INT, paused=BOOL, selector=LABEL_SELECTOR,
                                             virtualMachineTemplate=Fields(metadata=Fields(labels=MapOf(STR),
                                                                                           annotations=MapOf(STR)),
                                                                           spec=VM_SPEC))),
    "VirtualMachineInstanceReplicaSet": Fields(spec=Fields(replicas=INT, paused=BOOL, selector=LABEL_SELECTOR,
                                                           template=VMI_TEMPLATE)),
    "VirtualMachineInstance": Fields(spec=ANY_MAP),
    "VirtualMachineInstanceMigration": Fields(spec=Fields(vmiName=STR, addedNodeSelector=MapOf(STR))),
    "DataSource": Fields(spec=Fields(source=Fields(pvc=Fields(name=STR, namespace=STR),
                                                   snapshot=Fields(name=STR, namespace=STR)))),
    "DataImportCron": Fields(spec=Fields(template=Fields(metadata=METADATA, spec=DATA_VOLUME_SPEC), schedule=STR,
                                         managedDataSource=STR, garbageCollect=OneOf("Outdated", "Never"),
                                         importsToKeep=INT, retentionPolicy=OneOf("All", "None"))),
    "VirtualMachineSnapshotContent": Fields(spec=Fields(
        virtualMachineSnapshotName=STR, source=Fields(virtualMachine=ANY_MAP),
        volumeBackups=ListOf(Fields(volumeName=STR, volumeSnapshotName=STR, persistentVolumeClaim=ANY_MAP)))),
    "VirtualMachineExport": Fields(spec=Fields(source=Fields(apiGroup=STR, kind=STR, name=STR), tokenSecretRef=STR,
                                               ttlDuration=STR)),
    "Role": Fields(rules=ListOf(POLICY_RULE)),
    "ClusterRole": Fields(rules=ListOf(POLICY_RULE), aggregationRule=ANY_MAP),
    "RoleBinding": Fields(roleRef=ROLE_REF, subjects=ListOf(SUBJECT)),
    "ClusterRoleBinding": Fields(roleRef=ROLE_REF, subjects=ListOf(SUBJECT)),
    "StorageProfile": Fields(spec=Fields(claimPropertySets=ListOf(CLAIM_PROPERTY_SET),
                                         cloneStrategy=OneOf("snapshot", "copy", "csi-clone"),
                                         dataImportCronSourceFormat=OneOf("pvc"),  # pvlun's crons keep claims
                                         snapshotClass=STR)),
}


def conform(obj: dict) -> dict:
    """The object checked field by field and normalised; FieldError names the first bad field."""
    top = Fields(apiVersion=STR, kind=STR, metadata=METADATA).conform(obj, "")
    top.pop("status", None)  # written by controllers only (the status subresource)
    meta = top.get("metadata") or {}
    top["metadata"] = {k: v for k, v in meta.items() if k not in SERVER_SET}
    spec = SPECS.get(top.get("kind", ""))
    return spec.conform(top, "") if spec is not None else top
