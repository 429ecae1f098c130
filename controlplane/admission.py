"""What `pvlun apply` accepts: known kinds, each checked before anything is stored, with
the offending field named (as a Kubernetes admission webhook would answer)."""

from __future__ import annotations

import json
import re
from typing import Any, Callable

from controlplane.instancetypes import API_VERSION as INSTANCETYPE_API_VERSION
from controlplane.instancetypes import KINDS as INSTANCETYPE_KINDS
from controlplane.instancetypes import OLDER_API_VERSIONS as OLDER_INSTANCETYPE_API_VERSIONS
from controlplane.instancetypes import check_object as check_instancetype
from controlplane.instancetypes import expand, matchers_of, placeholder
from controlplane.label_selectors import requirements
from controlplane.manifest_yaml import ManifestError, load_all
from controlplane.object_types import conform
from controlplane.quantity import parse_quantity
from controlplane.replica_specs import POOL_API_VERSION, POOL_KIND, POOL_OLDER_VERSIONS, REPLICA_SET_KIND
from controlplane.replica_specs import check_pool, check_replica_set
from controlplane.user_text import one_line, quoted
from controlplane.vm_snapshot_spec import API_VERSION as VM_SNAPSHOT_API_VERSION
from controlplane.vm_snapshot_spec import check_content, check_restore, check_snapshot

KINDS = {
    "StorageClass": "storage.k8s.io/v1",
    "PersistentVolumeClaim": "v1",
    "Secret": "v1",
    "ConfigMap": "v1",
    "Namespace": "v1",  # embedded: namespaces are implicit; the object is kept so manifests apply unchanged
    "DataVolume": "cdi.kubevirt.io/v1beta1",
    "VolumeSnapshot": "snapshot.storage.k8s.io/v1",
    "VolumeSnapshotClass": "snapshot.storage.k8s.io/v1",
    "VolumeAttributesClass": "storage.k8s.io/v1",
    "VirtualMachine": "kubevirt.io/v1",
    "VirtualMachineInstance": "kubevirt.io/v1",
    "VirtualMachineInstanceMigration": "kubevirt.io/v1",
    "DataSource": "cdi.kubevirt.io/v1beta1",
    "DataImportCron": "cdi.kubevirt.io/v1beta1",
    "StorageProfile": "cdi.kubevirt.io/v1beta1",
    "VirtualMachineSnapshot": VM_SNAPSHOT_API_VERSION,
    "VirtualMachineSnapshotContent": VM_SNAPSHOT_API_VERSION,
    "VirtualMachineRestore": VM_SNAPSHOT_API_VERSION,
    "VirtualMachineExport": "export.kubevirt.io/v1beta1",
    POOL_KIND: POOL_API_VERSION,
    REPLICA_SET_KIND: "kubevirt.io/v1",
    # RBAC: the grants clones across namespaces need (datavolumes/source), evaluated as the API server does
    **dict.fromkeys(("Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"), "rbac.authorization.k8s.io/v1"),
    **dict.fromkeys(INSTANCETYPE_KINDS, INSTANCETYPE_API_VERSION),
}
# Create-only requests (CDI's upload API): answered by `pvlun apply` itself, never stored.
REQUEST_KINDS = {"UploadTokenRequest": ("upload.cdi.kubevirt.io/v1beta1", "upload.cdi.kubevirt.io/v1alpha1")}
# Older versions an API server still serves (or served: VolumeAttributesClass was v1beta1 until
# Kubernetes 1.34), accepted so existing YAML applies unchanged; objects are kept as they came.
OLDER_VERSIONS = {
    "VolumeAttributesClass": ("storage.k8s.io/v1beta1",),
    "VirtualMachine": ("kubevirt.io/v1alpha3",),
    "VirtualMachineInstance": ("kubevirt.io/v1alpha3",),
    "VirtualMachineInstanceMigration": ("kubevirt.io/v1alpha3",),
    POOL_KIND: POOL_OLDER_VERSIONS,
    REPLICA_SET_KIND: ("kubevirt.io/v1alpha3",),
    **dict.fromkeys(INSTANCETYPE_KINDS, OLDER_INSTANCETYPE_API_VERSIONS),
}


def served_versions(kind: str) -> tuple[str, ...]:
    """The apiVersions `apply` takes a kind in, the current one first."""
    return (KINDS[kind], *OLDER_VERSIONS.get(kind, ()))


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
    "ns": "Namespace", "namespace": "Namespace", "namespaces": "Namespace",
    "virtualmachineinstance": "VirtualMachineInstance", "virtualmachineinstances": "VirtualMachineInstance",
    "vmim": "VirtualMachineInstanceMigration", "virtualmachineinstancemigration": "VirtualMachineInstanceMigration",
    "virtualmachineinstancemigrations": "VirtualMachineInstanceMigration",
    "volumesnapshot": "VolumeSnapshot", "volumesnapshots": "VolumeSnapshot", "vs": "VolumeSnapshot",
    "volumesnapshotclass": "VolumeSnapshotClass", "volumesnapshotclasses": "VolumeSnapshotClass",
    "vsclass": "VolumeSnapshotClass",
    "volumesnapshotcontent": "VolumeSnapshotContent", "volumesnapshotcontents": "VolumeSnapshotContent",
    "vsc": "VolumeSnapshotContent",
    "volumeattachment": "VolumeAttachment", "volumeattachments": "VolumeAttachment",
    "vac": "VolumeAttributesClass", "volumeattributesclass": "VolumeAttributesClass",
    "volumeattributesclasses": "VolumeAttributesClass",
    "das": "DataSource", "datasource": "DataSource", "datasources": "DataSource",
    "dic": "DataImportCron", "dics": "DataImportCron", "dataimportcron": "DataImportCron",
    "dataimportcrons": "DataImportCron",
    "storageprofile": "StorageProfile", "storageprofiles": "StorageProfile",
    # KubeVirt's short names for instance types and preferences
    **dict.fromkeys(("virtualmachineinstancetype", "virtualmachineinstancetypes", "vminstancetype",
                     "vminstancetypes", "vmf", "vmfs"), "VirtualMachineInstancetype"),
    **dict.fromkeys(("virtualmachineclusterinstancetype", "virtualmachineclusterinstancetypes",
                     "vmclusterinstancetype", "vmclusterinstancetypes", "vmcf", "vmcfs"),
                    "VirtualMachineClusterInstancetype"),
    **dict.fromkeys(("virtualmachinepreference", "virtualmachinepreferences", "vmpref", "vmprefs", "vmp", "vmps"),
                    "VirtualMachinePreference"),
    **dict.fromkeys(("virtualmachineclusterpreference", "virtualmachineclusterpreferences", "vmcp", "vmcps"),
                    "VirtualMachineClusterPreference"),
    **dict.fromkeys(("virtualmachinesnapshot", "virtualmachinesnapshots", "vmsnapshot", "vmsnapshots"),
                    "VirtualMachineSnapshot"),
    **dict.fromkeys(("virtualmachinesnapshotcontent", "virtualmachinesnapshotcontents", "vmsnapshotcontent",
                     "vmsnapshotcontents"), "VirtualMachineSnapshotContent"),
    **dict.fromkeys(("virtualmachinerestore", "virtualmachinerestores", "vmrestore", "vmrestores"),
                    "VirtualMachineRestore"),
    "controllerrevision": "ControllerRevision", "controllerrevisions": "ControllerRevision",
    **dict.fromkeys(("vmexport", "vmexports", "virtualmachineexport", "virtualmachineexports"), "VirtualMachineExport"),
    **dict.fromkeys(("vmpool", "vmpools", "virtualmachinepool", "virtualmachinepools"), POOL_KIND),
    **dict.fromkeys(("vmirs", "vmirss", "virtualmachineinstancereplicaset", "virtualmachineinstancereplicasets"),
                    REPLICA_SET_KIND),
    "role": "Role", "roles": "Role", "clusterrole": "ClusterRole", "clusterroles": "ClusterRole",
    "rolebinding": "RoleBinding", "rolebindings": "RoleBinding", "clusterrolebinding": "ClusterRoleBinding",
    "clusterrolebindings": "ClusterRoleBinding",
}


# Kubernetes object names: a DNS-1123 subdomain; namespaces, and the names of kinds whose
# name becomes a host name (a VirtualMachine's, as KubeVirt requires): a DNS-1123 label.
# Names reach paths (run dirs, publish targets), so nothing else is accepted.
_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
SUBDOMAIN_MAX, LABEL_MAX = 253, 63
LABEL_NAMED = {"VirtualMachine", "Namespace"}
MAX_OBJECT_BYTES = 3 << 19  # 1.5 MiB, etcd's limit on one object


def _check(value: object, what: str, label: bool) -> None:
    limit, pattern = (LABEL_MAX, _LABEL) if label else (SUBDOMAIN_MAX, _SUBDOMAIN)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string")
    if len(value) > limit:
        raise ValueError(f"{what} is {len(value)} characters long; at most {limit} are allowed")
    if not pattern.fullmatch(value):
        allowed = "lowercase letters, digits and '-'" if label else "lowercase letters, digits, '-' and '.'"
        raise ValueError(f"{what} {quoted(value)} is not a valid name ({allowed}, starting and ending with a "
                         "letter or digit)")


def check_name(name: object, namespace: object, kind: str = "") -> None:
    """A DNS-1123 subdomain (a label for LABEL_NAMED kinds) and, if given, a label namespace."""
    _check(name, "metadata.name", kind in LABEL_NAMED)
    if namespace is not None:
        _check(namespace, "metadata.namespace", True)


def _check_ref(ref: dict, field: str, *, name_key: str = "name") -> None:
    """A reference to another object: its name a DNS-1123 subdomain, its namespace (if given) a label."""
    if ref.get(name_key):
        _check(ref[name_key], f"{field}.{name_key}", False)
    if ref.get("namespace"):
        _check(ref["namespace"], f"{field}.namespace", True)


def _check_class(name: object, field: str) -> None:
    """A class name (storageClassName, ...) given: a DNS-1123 subdomain ("" means none, as in Kubernetes)."""
    if name not in (None, ""):
        _check(name, field, False)


# Kubernetes' qualified names (label keys: an optional DNS-1123 subdomain prefix and '/'), and label values
_QUALIFIED = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")


def check_labels(labels: dict) -> None:
    """metadata.labels as the API server takes them: qualified-name keys, values of at most 63
    characters (letters, digits, '-', '_', '.', starting and ending with a letter or digit)."""
    for key, value in labels.items():
        check_label_key(key, "metadata.labels: key")
        check_label_value(value, f"metadata.labels.{key}: value")


def check_label_key(key: str, what: str) -> None:
    """A qualified name (an optional DNS-1123 subdomain prefix and '/'), as label keys are."""
    prefix, slash, name = key.rpartition("/")
    if slash:
        _check(prefix, f"{what.rpartition(':')[0] or what}: the prefix of key {quoted(key)}", False)
    if len(name) > LABEL_MAX or not _QUALIFIED.fullmatch(name):
        raise ValueError(f"{what} {quoted(key)} is not a qualified name (an optional DNS subdomain prefix and '/', "
                         "then at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or "
                         "digit)")


def check_label_value(value: str, what: str) -> None:
    """A label value: empty, or at most 63 letters, digits, '-', '_', '.' starting and ending with a letter or digit."""
    if value and (len(value) > LABEL_MAX or not _QUALIFIED.fullmatch(value)):
        raise ValueError(f"{what} {quoted(value)} is not a valid label value (at most 63 letters, digits, '-', '_' or "
                         "'.', starting and ending with a letter or digit)")


def check_selector(selector: object, field: str = "spec.selector") -> None:
    """A metav1.LabelSelector as the API server validates one: its operators and value counts
    (controlplane/label_selectors.py), its keys qualified names and its values label values."""
    for i, (key, operator, values) in enumerate(requirements(selector, field)):
        where = f"{field}.matchLabels" if operator == "=" else f"{field}.matchExpressions"
        check_label_key(key, f"{where}: key")
        for value in values:
            check_label_value(value, f"{where}[{key}]: value")


class Refused(ValueError):
    """An object `apply` will not store; the message names the document and field."""


# Every kind the embedded store holds: what `apply` takes, and what the controllers make.
STORED_KINDS = (*KINDS, "PersistentVolume", "VolumeAttachment", "VolumeSnapshotContent", "ControllerRevision")


def kind_of(name: str) -> str:
    return ALIASES.get(name.lower(), name)


def known_kind(name: str) -> str:
    """The kind a CLI argument names (kubectl's short names too); Refused for any other."""
    kind = kind_of(name)
    if kind not in STORED_KINDS:
        raise Refused(f"the server doesn't have a resource type {quoted(name)} (pvlun has: "
                      f"{', '.join(sorted(k.lower() for k in STORED_KINDS))})")
    return kind


def _positive_size(request: object, field: str) -> None:
    """A size given must be more than nothing (the API server's rule: "0" would get a default size)."""
    if request is not None and parse_quantity(request) == 0:
        raise ValueError(f"{field}: must be greater than zero")


def _same_object(ref_name: object, ref_namespace: object, obj: dict) -> bool:
    meta = obj.get("metadata") or {}
    return ref_name == meta.get("name") and (ref_namespace or None) in (None, meta.get("namespace") or None)


def _check_pvc(obj: dict) -> None:
    """What the field types (object_types) cannot say: which fields go together."""
    spec = obj.get("spec") or {}
    sources = [(f, spec[f]) for f in ("dataSource", "dataSourceRef") if spec.get(f)]
    request = (spec.get("resources") or {}).get("requests", {}).get("storage")
    if request is None and not sources:
        raise ValueError("spec.resources.requests.storage is required")
    _positive_size(request, "spec.resources.requests.storage")
    _check_class(spec.get("storageClassName"), "spec.storageClassName")
    for field, source in sources:
        for key in ("kind", "name"):
            if not source.get(key):
                raise ValueError(f"spec.{field}.{key} is required")
        _check_ref(source, f"spec.{field}")
        if source.get("kind") == "PersistentVolumeClaim" and _same_object(source["name"], source.get("namespace"), obj):
            raise ValueError(f"spec.{field}.name: a claim cannot be cloned from itself")


# What each DataVolume source needs to be anything at all (else it waits or fails forever).
SOURCE_REQUIRED = {"http": "url", "registry": "url", "s3": "url", "pvc": "name", "snapshot": "name"}


def _check_dv(obj: dict) -> None:
    from controlplane.dv_spec import validate

    kind, source, _size, _mode, _access, storage_class = validate(obj)
    spec = obj.get("spec") or {}
    field = "spec.storage" if spec.get("storage") is not None else "spec.pvc"
    _check_class(storage_class, f"{field}.storageClassName")
    if kind in ("pvc", "snapshot", "sourceRef"):
        _check_ref(source, "spec.sourceRef" if kind == "sourceRef" else f"spec.source.{kind}")
    _positive_size(((spec.get("storage") or spec.get("pvc") or {}).get("resources") or {}).get("requests", {})
                   .get("storage"), f"{field}.resources.requests.storage")
    required = SOURCE_REQUIRED.get(kind)
    if required and not source.get(required):
        raise ValueError(f"spec.source.{kind}.{required} is required")
    if kind == "pvc" and _same_object(source["name"], source.get("namespace"), obj):
        raise ValueError("spec.source.pvc.name: a DataVolume cannot be cloned from itself (its claim is the target)")


def _check_data_source(obj: dict) -> None:
    source = (obj.get("spec") or {}).get("source") or {}
    given = [k for k in source if source[k] is not None]
    if len(given) > 1:
        raise ValueError("spec.source: name one of pvc, snapshot, not both")
    for kind in given:
        if kind not in ("pvc", "snapshot"):
            raise ValueError(f"spec.source.{kind}: unknown source (one of pvc, snapshot)")
        if not (source[kind] or {}).get("name"):
            raise ValueError(f"spec.source.{kind}.name is required")


def _check_import_cron(obj: dict) -> None:
    from datetime import datetime, timezone

    from controlplane.cron_schedule import CronSchedule

    spec = obj.get("spec") or {}
    if not spec.get("managedDataSource"):
        raise ValueError("spec.managedDataSource is required")
    _check(spec["managedDataSource"], "spec.managedDataSource", False)
    if len(spec["managedDataSource"]) > SUBDOMAIN_MAX - 13:  # its imports are named <it>-<12 hex digits>
        raise ValueError(f"spec.managedDataSource is too long: at most {SUBDOMAIN_MAX - 13} characters (its "
                         "imports are named after it with a 13-character suffix)")
    try:
        CronSchedule(spec.get("schedule")).next_after(datetime.now(timezone.utc))  # "0 0 31 2 *" never does
    except ValueError as exc:
        raise ValueError(f"spec.schedule: {exc}") from None
    if spec.get("importsToKeep") is not None and spec["importsToKeep"] < 0:
        raise ValueError("spec.importsToKeep: must be 0 or more")
    template = spec.get("template") or {}
    source = (template.get("spec") or {}).get("source") or {}
    if list(source) != ["registry"]:
        raise ValueError("spec.template.spec.source: a DataImportCron imports from a registry (source.registry)")
    if not (source["registry"] or {}).get("url"):
        raise ValueError("spec.template.spec.source.registry.url is required (pvlun polls docker:// URLs, "
                         "not imageStream)")
    try:  # it becomes DataVolumes: the same rules
        _check_dv({"kind": "DataVolume", "metadata": {"name": spec["managedDataSource"]}, "spec": template["spec"]})
    except ValueError as exc:
        raise ValueError(f"spec.template.{exc}") from None


def _check_vm(obj: dict) -> None:
    from controlplane.vm_spec import parse_virtual_machine

    instancetype, preference = matchers_of(obj)
    if instancetype or preference:  # the VM's own fields checked against what any instancetype sets
        obj, _warnings = expand(obj, instancetype and placeholder(instancetype.kind),
                                preference and placeholder(preference.kind))
    parse_virtual_machine(obj)
    for i, template in enumerate((obj.get("spec") or {}).get("dataVolumeTemplates") or []):
        where = f"spec.dataVolumeTemplates[{i}]"
        try:
            _check((template.get("metadata") or {}).get("name"), "metadata.name", False)
            _check_dv(template)  # it becomes a DataVolume: the same rules
        except ValueError as exc:
            raise ValueError(f"{where}.{exc}") from None


def _check_vmi(obj: dict) -> None:
    """A VMI applied by a user (KubeVirt serves it so: a VM without its VirtualMachine)."""
    from controlplane.vm_spec import parse_virtual_machine_instance

    parse_virtual_machine_instance(obj)


def _check_pool(obj: dict) -> None:
    """Its VMs' names (a label each) and specs get the VM's own checks."""
    def check_vm(vm: dict) -> None:
        check_name(vm["metadata"]["name"], vm["metadata"].get("namespace"), "VirtualMachine")
        _check_vm(vm)

    check_selector((obj.get("spec") or {}).get("selector"))
    check_pool(obj, check_vm)


def _check_replica_set(obj: dict) -> None:
    def check_vmi(vmi: dict) -> None:
        check_name(vmi["metadata"]["name"], vmi["metadata"].get("namespace"), "VirtualMachineInstance")
        _check_vmi(vmi)

    check_selector((obj.get("spec") or {}).get("selector"))
    check_replica_set(obj, check_vmi)


def _check_migration(obj: dict) -> None:
    from controlplane.vm_spec import parse_migration

    parse_migration(obj)


def _check_vm_export(obj: dict) -> None:
    from controlplane.vm_export_spec import check_source, parse_duration

    spec = obj.get("spec") or {}
    check_source(spec)
    _check(spec["source"]["name"], "spec.source.name", False)
    if spec.get("tokenSecretRef") is not None:
        _check(spec["tokenSecretRef"], "spec.tokenSecretRef", False)
    if spec.get("ttlDuration") is not None:
        try:
            parse_duration(spec["ttlDuration"])
        except ValueError as exc:
            raise ValueError(f"spec.ttlDuration: {exc}") from None


def _check_storage_class(obj: dict) -> None:
    if not obj.get("provisioner"):
        raise ValueError("provisioner is required")


def _check_snapshot_class(obj: dict) -> None:
    for field in ("driver", "deletionPolicy"):
        if not obj.get(field):
            raise ValueError(f"{field} is required")


def _check_attributes_class(obj: dict) -> None:
    from csi.errors import CsiError
    from csi.validation import check_mutable

    if not obj.get("driverName"):
        raise ValueError("driverName is required")
    try:
        check_mutable({k: str(v) for k, v in (obj.get("parameters") or {}).items()})
    except CsiError as exc:
        raise ValueError(f"parameters: {exc.message}") from None


def _check_vm_restore(obj: dict) -> None:
    """KubeVirt's rules, and the names it will give what it makes: a new VM's (a label), the
    restored claims' (subdomains): they reach paths."""
    check_restore(obj)
    spec = obj.get("spec") or {}
    _check(spec["target"]["name"], "spec.target.name", True)
    for i, override in enumerate(spec.get("volumeRestoreOverrides") or []):
        if override.get("restoreName") is not None:
            _check(override["restoreName"], f"spec.volumeRestoreOverrides[{i}].restoreName", False)


def _check_upload_token_request(obj: dict) -> None:
    """CDI's UploadTokenRequest names the claim (a DataVolume's) an upload token is for."""
    _check((obj.get("spec") or {}).get("pvcName"), "spec.pvcName", False)


CHECKS: dict[str, Callable[[dict], None]] = {
    "UploadTokenRequest": _check_upload_token_request,
    "VolumeAttributesClass": _check_attributes_class,
    "PersistentVolumeClaim": _check_pvc,
    "DataVolume": _check_dv,
    "VirtualMachine": _check_vm,
    "VirtualMachineInstance": _check_vmi,
    "VirtualMachineInstanceMigration": _check_migration,
    POOL_KIND: _check_pool,
    REPLICA_SET_KIND: _check_replica_set,
    "StorageClass": _check_storage_class,
    "VolumeSnapshotClass": _check_snapshot_class,
    "DataSource": _check_data_source,
    "DataImportCron": _check_import_cron,
    "VirtualMachineSnapshot": check_snapshot,
    "VirtualMachineSnapshotContent": check_content,
    "VirtualMachineRestore": _check_vm_restore,
    "VirtualMachineExport": _check_vm_export,
    **dict.fromkeys(INSTANCETYPE_KINDS, check_instancetype),
}


def load_documents(text: str) -> list[dict[str, Any]]:
    """Every object of a manifest (Lists unpacked), checked and normalised; Refused names the
    first bad document and field, in one line. Nothing is stored here."""
    try:
        documents = load_all(text)
    except ManifestError as exc:
        raise Refused(str(exc)) from None
    out: list[dict[str, Any]] = []
    todo = [(f"document {n}", doc) for n, doc in reversed(documents)]
    while todo:
        where, doc = todo.pop()
        if isinstance(doc, dict) and doc.get("kind") == "List":
            items = doc.get("items")
            if not isinstance(items, list) and items is not None:
                raise Refused(f"{where}: items of a List must be a list, not {type(items).__name__}")
            todo += [(f"{where}, item {i + 1}", item) for i, item in reversed(list(enumerate(items or [])))]
            continue
        out.append(admit(doc, where))
    return out


def admit(doc: object, where: str) -> dict[str, Any]:
    """One object checked field by field, as a fresh tree (no YAML alias shares a part of it)."""
    if not isinstance(doc, dict):
        raise Refused(f"{where}: not a Kubernetes object (a {type(doc).__name__}, not a mapping)")
    kind = doc.get("kind")
    if not isinstance(kind, str) or not kind:
        raise Refused(f"{where}: not a Kubernetes object (no kind)")
    if kind not in KINDS and kind not in REQUEST_KINDS:
        raise Refused(f"{where}: kind {quoted(kind)} is not one pvlun serves ({', '.join(sorted(KINDS))})")
    versions = REQUEST_KINDS.get(kind) or served_versions(kind)
    if doc.get("apiVersion") not in versions:  # as kubectl answers it, naming what would do
        what = "apiVersion not set" if doc.get("apiVersion") is None else \
            f"no matches for kind {quoted(kind)} in version {quoted(doc.get('apiVersion'))}"
        raise Refused(f"{where}: {what} (pvlun serves {kind} as {' or '.join(versions)})")
    meta = doc.get("metadata")
    name = meta.get("name") if isinstance(meta, dict) else None
    label = f"{kind} {quoted(name)}" if isinstance(name, str) and name else f"{where} ({kind})"
    try:
        doc = conform(doc)
        if not name:
            raise ValueError("metadata.name is required")
        check_name(name, doc["metadata"].get("namespace"), kind)
        check_labels(doc["metadata"].get("labels") or {})
        CHECKS.get(kind, lambda o: None)(doc)
        body = json.dumps(doc)
    except (ValueError, TypeError) as exc:
        raise Refused(one_line(f"{label} is invalid: {exc}")) from None
    if len(body) > MAX_OBJECT_BYTES:
        raise Refused(f"{label} is {len(body)} bytes long; one object may have at most {MAX_OBJECT_BYTES} bytes")
    return json.loads(body)


def admit_update(old: dict | None, new: dict) -> dict:
    """What `pvlun apply` stores for an admitted object (store.apply's merge, run in its
    transaction): kubectl's merge into what exists, the update rules, and the kind's checks
    on the result; Refused names the field."""
    from controlplane.object_update import applied

    label = f"{new['kind']} {quoted(new['metadata']['name'])}"
    try:
        merged = applied(old, new)
        if old is not None:
            CHECKS.get(new["kind"], lambda o: None)(merged)
    except (ValueError, TypeError) as exc:
        raise Refused(one_line(f"{label} is invalid: {exc}")) from None
    return merged
