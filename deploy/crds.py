"""pvlun's CustomResourceDefinitions, written to deploy/full/crds/ (`make crds`; the files are
committed and tests/test_deploy_crds.py fails when they drift from this module).

CDI's DataVolume, DataSource, DataImportCron and StorageProfile and KubeVirt's VirtualMachine, VirtualMachineInstance,
VirtualMachineInstanceMigration, VirtualMachineSnapshot(Content), VirtualMachineRestore and VirtualMachineExport in the
groups, versions, names, short names and printer columns
upstream gives them, so users' YAML applies unchanged. The schemas are structural and our own:
every field a user writes is typed where the whole upstream type is small (a DataVolume's spec, a
VirtualMachine's, a migration's, a VMI spec's first level); where upstream's type is huge (a VMI's
domain, affinity, probes) the known fields pvlun reads are typed and the rest is kept as written
(x-kubernetes-preserve-unknown-fields), as KubeVirt's own CRD does for embedded object metadata.
Statuses are written only by pvlun's controllers (through the status subresource, which KubeVirt's
VMI lacks and ours has): their fields are typed and kept open for the controllers' own bookkeeping
(a VM's manualRunning, a VMI's launcher), which the API server would otherwise prune.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

OUT_DIR = Path(__file__).resolve().parent / "full" / "crds"
Schema = dict

# ------------------------------------------------------------------ schema building blocks


def string(description: str = "", **kw) -> Schema:
    return _described({"type": "string", **kw}, description)


def integer(description: str = "", **kw) -> Schema:
    return _described({"type": "integer", "format": "int64", **kw}, description)


def boolean(description: str = "") -> Schema:
    return _described({"type": "boolean"}, description)


def number(description: str = "") -> Schema:
    return _described({"type": "number"}, description)


def array(items: Schema, description: str = "", **kw) -> Schema:
    return _described({"type": "array", "items": items, **kw}, description)


def obj(properties: dict[str, Schema] | None = None, description: str = "", required: tuple[str, ...] = (),
        keep_unknown: bool = False, **kw) -> Schema:
    """An object with these fields; keep_unknown keeps fields not listed (upstream's open types)."""
    out: Schema = {"type": "object"}
    if properties:
        out["properties"] = properties
    if required:
        out["required"] = list(required)
    if keep_unknown:
        out["x-kubernetes-preserve-unknown-fields"] = True
    return _described({**out, **kw}, description)


def map_of(values: Schema, description: str = "") -> Schema:
    return _described({"type": "object", "additionalProperties": values}, description)


def opaque(description: str = "") -> Schema:
    """An upstream type pvlun does not read (or Kubernetes' own, like affinity): kept as written."""
    return obj(description=description, keep_unknown=True)


def _described(schema: Schema, description: str) -> Schema:
    return {"description": description, **schema} if description else schema


QUANTITY = {"anyOf": [{"type": "integer"}, {"type": "string"}], "x-kubernetes-int-or-string": True,
            "pattern": r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"}
TIME = string(format="date-time", nullable=True)
EMBEDDED_METADATA = obj(nullable=True, keep_unknown=True)  # ObjectMeta inside a template, as upstream keeps it
CONDITIONS = array(obj({"type": string(), "status": string(), "reason": string(), "message": string(),
                        "lastTransitionTime": TIME, "lastProbeTime": TIME, "lastHeartbeatTime": TIME},
                       required=("type", "status")))
AGE = {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}
READY = {"name": "Ready", "type": "string", "jsonPath": ".status.conditions[?(@.type=='Ready')].status"}

# ------------------------------------------------------------------ CDI: DataVolume

LABEL_SELECTOR = obj({
    "matchLabels": map_of(string()),
    "matchExpressions": array(obj({"key": string(), "operator": string(), "values": array(string())},
                                  required=("key", "operator"))),
})
CLAIM_FIELDS = {
    "accessModes": array(string()),
    "selector": LABEL_SELECTOR,
    "resources": obj({"limits": map_of(QUANTITY), "requests": map_of(QUANTITY)}),
    "volumeName": string(),
    "storageClassName": string(),
    "volumeMode": string(enum=["Filesystem", "Block"]),
    "dataSource": obj({"apiGroup": string(), "kind": string(), "name": string()}, required=("kind", "name")),
    "dataSourceRef": obj({"apiGroup": string(), "kind": string(), "name": string(), "namespace": string()},
                         required=("kind", "name")),
    "volumeAttributesClassName": string(),
}
_URL = {"url": string(), "secretRef": string(), "certConfigMap": string()}
_CHECKSUM = string("md5|sha1|sha256|sha512:<hex digest>: what the source's bytes must hash to (empty: none)")
_INSECURE = boolean("true: the server's certificate is not checked (a self-signed one)")
_NAMED = obj({"namespace": string(), "name": string()}, required=("name",))
DATA_VOLUME_SOURCE = obj({
    "http": obj({**_URL, "extraHeaders": array(string()), "secretExtraHeaders": array(string()),
                 "checksum": _CHECKSUM, "insecureSkipVerify": _INSECURE}, required=("url",)),
    "s3": obj({**_URL, "checksum": _CHECKSUM}, required=("url",)),
    "gcs": obj({"url": string(), "secretRef": string()}, required=("url",)),
    "registry": obj({**_URL, "imageStream": string(), "pullMethod": string(enum=["pod", "node"]),
                     "platform": obj({"architecture": string()}), "checksum": _CHECKSUM,
                     "insecureSkipVerify": _INSECURE}),
    "pvc": _NAMED,
    "snapshot": _NAMED,
    "upload": obj(),
    "blank": obj(),
    "imageio": obj({**_URL, "diskId": string(), "insecureSkipVerify": boolean()}, required=("url", "diskId")),
    "vddk": obj({"url": string(), "uuid": string(), "backingFile": string(), "thumbprint": string(),
                 "secretRef": string(), "initImageURL": string(), "extraArgs": string()}),
}, "Where the data comes from: exactly one source.")
DATA_VOLUME_SPEC = obj({
    "source": DATA_VOLUME_SOURCE,
    "sourceRef": obj({"kind": string(enum=["DataSource"]), "namespace": string(), "name": string()},
                     required=("kind", "name")),
    "pvc": obj(CLAIM_FIELDS, "The claim to make, as written (no size adjustment)."),
    "storage": obj(CLAIM_FIELDS, "The claim to make; a Filesystem claim grows by the filesystem's overhead."),
    "priorityClassName": string(),
    "contentType": string(enum=["kubevirt", "archive"]),
    "checkpoints": array(obj({"previous": string(), "current": string()}, required=("previous", "current"))),
    "finalCheckpoint": boolean(),
    "preallocation": boolean(),
})
DATA_VOLUME_STATUS = obj({
    "claimName": string(),
    "phase": string(),
    "progress": string(),
    "restartCount": integer(),
    "observedGeneration": integer(),
    "conditions": CONDITIONS,
}, keep_unknown=True)

# ------------------------------------------------------------------ CDI: golden images

_PVC_REF = obj({"namespace": string(), "name": string()}, required=("namespace", "name"))
DATA_SOURCE_SPEC = obj({"source": obj({"pvc": _PVC_REF, "snapshot": _PVC_REF})}, required=("source",))
DATA_SOURCE_STATUS = obj({"source": obj({"pvc": _PVC_REF, "snapshot": _PVC_REF}), "conditions": CONDITIONS},
                         keep_unknown=True)
DATA_IMPORT_CRON_SPEC = obj({
    "template": obj({"metadata": EMBEDDED_METADATA, "spec": DATA_VOLUME_SPEC}, required=("spec",)),
    "schedule": string("When to look for a new image: 5-field cron (minute hour day-of-month month day-of-week)"),
    "garbageCollect": string(enum=["Outdated", "Never"]),
    "importsToKeep": integer(minimum=0),
    "managedDataSource": string("The DataSource (in this namespace) that names the newest import"),
    "retentionPolicy": string(enum=["All", "None"]),
}, required=("template", "schedule", "managedDataSource"))
DATA_IMPORT_CRON_STATUS = obj({
    "currentImports": array(obj({"DataVolumeName": string(), "Digest": string()}, required=("DataVolumeName", "Digest"))),
    "lastImportedPVC": _PVC_REF,
    "lastExecutionTimestamp": TIME,
    "lastImportTimestamp": TIME,
    "sourceFormat": string(),
    "conditions": CONDITIONS,
}, keep_unknown=True)
CLAIM_PROPERTY_SETS = array(obj({"accessModes": array(string()), "volumeMode": string(enum=["Filesystem", "Block"])}))
CLONE_STRATEGY = string(enum=["copy", "snapshot", "csi-clone"])
STORAGE_PROFILE_SPEC = obj({"claimPropertySets": CLAIM_PROPERTY_SETS, "cloneStrategy": CLONE_STRATEGY,
                            "dataImportCronSourceFormat": string(enum=["pvc", "snapshot"]),
                            "snapshotClass": string()})
STORAGE_PROFILE_STATUS = obj({"storageClass": string(), "provisioner": string(), "claimPropertySets": CLAIM_PROPERTY_SETS,
                              "cloneStrategy": CLONE_STRATEGY, "dataImportCronSourceFormat": string(),
                              "snapshotClass": string()}, keep_unknown=True)

# ------------------------------------------------------------------ KubeVirt: a VMI spec

DISK = obj({
    "name": string(),
    "disk": obj({"bus": string(), "readonly": boolean(), "pciAddress": string()}),
    "cdrom": obj({"bus": string(), "readonly": boolean(), "tray": string()}),
    "lun": obj({"bus": string(), "readonly": boolean(), "reservation": boolean()}),
    "bootOrder": integer(),
    "serial": string(),
}, required=("name",), keep_unknown=True)
INTERFACE = obj({
    "name": string(),
    "masquerade": obj(), "bridge": obj(), "sriov": obj(), "slirp": obj(), "passt": obj(),
    "binding": obj({"name": string()}, required=("name",)),
    "model": string(),
    "macAddress": string(),
    "ports": array(obj({"name": string(), "protocol": string(), "port": integer()}, required=("port",))),
    "bootOrder": integer(),
}, required=("name",), keep_unknown=True)
DOMAIN = obj({
    "resources": obj({"requests": map_of(QUANTITY), "limits": map_of(QUANTITY),
                      "overcommitGuestOverhead": boolean()}),
    "cpu": obj({"cores": integer(), "sockets": integer(), "threads": integer(), "model": string()},
               keep_unknown=True),
    "memory": obj({"guest": QUANTITY}, keep_unknown=True),
    "machine": obj({"type": string()}),
    "firmware": obj({"uuid": string(), "serial": string(),
                     "bootloader": obj({"bios": opaque(), "efi": obj({"secureBoot": boolean(), "persistent": boolean()})})},
                    keep_unknown=True),
    "devices": obj({"disks": array(DISK), "interfaces": array(INTERFACE), "autoattachPodInterface": boolean()},
                   keep_unknown=True),
}, "The virtual hardware; the fields pvlun reads are typed, the rest of KubeVirt's kept as written.",
    keep_unknown=True)
VOLUME = obj({
    "name": string(),
    "dataVolume": obj({"name": string(), "hotpluggable": boolean()}, required=("name",)),
    "persistentVolumeClaim": obj({"claimName": string(), "readOnly": boolean(), "hotpluggable": boolean()},
                                 required=("claimName",)),
    "cloudInitNoCloud": obj({"userData": string(), "userDataBase64": string(), "networkData": string(),
                             "networkDataBase64": string(), "secretRef": opaque(), "networkDataSecretRef": opaque()}),
    "emptyDisk": obj({"capacity": QUANTITY}, required=("capacity",)),
    **{source: opaque() for source in (
        "containerDisk", "ephemeral", "cloudInitConfigDrive", "sysprep", "hostDisk", "configMap", "secret",
        "serviceAccount", "downwardAPI", "downwardMetrics", "memoryDump")},
}, required=("name",))
VMI_SPEC = obj({
    "domain": DOMAIN,
    "volumes": array(VOLUME, maxItems=256),
    "networks": array(obj({"name": string(), "pod": obj({"vmNetworkCIDR": string(), "vmIPv6NetworkCIDR": string()}),
                           "multus": obj({"networkName": string(), "default": boolean()}, required=("networkName",))},
                          required=("name",)), maxItems=256),
    "terminationGracePeriodSeconds": integer(),
    "hostname": string(),
    "subdomain": string(),
    "nodeSelector": map_of(string()),
    "tolerations": array(obj({"key": string(), "operator": string(), "value": string(), "effect": string(),
                              "tolerationSeconds": integer()})),
    "evictionStrategy": string(),
    "startStrategy": string(),
    "priorityClassName": string(),
    "schedulerName": string(),
    "serviceAccountName": string(),
    "architecture": string(),
    "dnsPolicy": string(),
    "dnsConfig": obj({"nameservers": array(string()), "searches": array(string()),
                      "options": array(obj({"name": string(), "value": string()}))}),
    **{field: opaque() for field in ("affinity", "livenessProbe", "readinessProbe")},
    **{field: array(opaque()) for field in ("topologySpreadConstraints", "accessCredentials", "resourceClaims",
                                             "utilityVolumes")},
}, "What one QEMU process runs.", required=("domain",))
VMI_STATUS = obj({
    "phase": string(),
    "reason": string(),
    "nodeName": string(),
    "conditions": CONDITIONS,
    "phaseTransitionTimestamps": array(obj({"phase": string(), "phaseTransitionTimestamp": TIME})),
    "interfaces": array(obj({"name": string(), "ipAddress": string(), "ipAddresses": array(string()),
                             "mac": string(), "interfaceName": string(), "infoSource": string()}, keep_unknown=True)),
    "volumeStatus": array(obj({"name": string(), "target": string(), "phase": string(), "reason": string(),
                               "message": string(), "size": integer()}, keep_unknown=True)),
    "migrationState": opaque(),
    "migrationMethod": string(),
    "activePods": map_of(string()),
    "guestOSInfo": opaque(),
    "qosClass": string(),
    "paused": boolean("pvlun: the guest is paused (also the Paused condition)"),
    "launcher": opaque("pvlun: the QEMU process that runs the VMI and what it forwards"),
}, keep_unknown=True)

# ------------------------------------------------------------------ KubeVirt: VM and migration

_MATCHER = obj({"name": string(), "kind": string(), "revisionName": string(), "inferFromVolume": string(),
                "inferFromVolumeFailurePolicy": string()})
VM_SPEC = obj({
    "runStrategy": string(enum=["Always", "Halted", "Manual", "RerunOnFailure", "Once", "WaitAsReceiver"]),
    "running": boolean("Deprecated by KubeVirt: runStrategy Always (true) or Halted (false)."),
    "template": obj({"metadata": EMBEDDED_METADATA, "spec": VMI_SPEC}),
    "dataVolumeTemplates": array(obj({"apiVersion": string(), "kind": string(), "metadata": EMBEDDED_METADATA,
                                      "spec": DATA_VOLUME_SPEC, "status": obj(nullable=True)}, required=("spec",))),
    "instancetype": _MATCHER,
    "preference": _MATCHER,
    "updateVolumesStrategy": string(enum=["Migration", "Replacement"]),
}, required=("template",))
_STATUS_REF = obj({"name": string(), "kind": string(), "controllerRevisionRef": obj({"name": string()}),
                   "inferFromVolume": string(), "inferFromVolumeFailurePolicy": string()},
                  "The instancetype (or preference) the VM runs with: its copy in a ControllerRevision")
VM_STATUS = obj({
    "printableStatus": string(),
    "ready": boolean(),
    "created": boolean(),
    "conditions": CONDITIONS,
    "runStrategy": string(),
    "observedGeneration": integer(),
    "desiredGeneration": integer(),
    "stateChangeRequests": array(opaque()),
    "volumeSnapshotStatuses": array(opaque()),
    "startFailure": opaque(),
    "instancetypeRef": _STATUS_REF,
    "preferenceRef": _STATUS_REF,
    "manualRunning": boolean("pvlun: a Manual VM was last asked to start (true) or stop (false)"),
    "startRequestedAt": number("pvlun: when the VM was last asked to start (seconds since the epoch)"),
}, keep_unknown=True)
MIGRATION_SPEC = obj({
    "vmiName": string("The VirtualMachineInstance to migrate, in the migration's namespace."),
    "addedNodeSelector": map_of(string()),
    "priority": string(enum=["system-critical", "user-triggered", "system-maintenance"]),
    "sendTo": obj({"migrationID": string(), "connectURL": string()}, required=("migrationID", "connectURL")),
    "receive": obj({"migrationID": string()}, required=("migrationID",)),
})
MIGRATION_STATUS = obj({
    "phase": string(),
    "conditions": CONDITIONS,
    "phaseTransitionTimestamps": array(obj({"phase": string(), "phaseTransitionTimestamp": TIME})),
    "migrationState": opaque(),
    "synchronizationAddresses": array(string()),
}, keep_unknown=True)

# ------------------------------------------------------------------ KubeVirt: instance types and preferences

# What a VM's expansion reads (controlplane/instancetypes.py) is typed; the rest of upstream's types is kept.
INSTANCETYPE_SPEC = obj({
    "cpu": obj({"guest": integer("vCPUs the guest gets", minimum=1), "model": string(),
                "dedicatedCPUPlacement": boolean(), "isolateEmulatorThread": boolean(), "numa": opaque(),
                "realtime": opaque(), "maxSockets": integer()}, required=("guest",)),
    "memory": obj({"guest": QUANTITY, "hugepages": obj({"pageSize": string()}), "overcommitPercent": integer(
        minimum=0, maximum=100), "maxGuest": QUANTITY}, required=("guest",)),
    "ioThreadsPolicy": string(), "nodeSelector": map_of(string()), "schedulerName": string(),
    "annotations": map_of(string()), "gpus": array(opaque()), "hostDevices": array(opaque()),
    "launchSecurity": opaque(),
}, "What a VM naming this instancetype gets: its vCPUs and memory (the VM may not set them itself).",
    required=("cpu", "memory"))
PREFERENCE_SPEC = obj({
    "cpu": obj({"preferredCPUTopology": string(), "spreadOptions": obj({"across": string(), "ratio": integer()}),
                "preferredCPUFeatures": array(opaque())}),
    "devices": obj({"preferredDiskBus": string(), "preferredCdromBus": string(), "preferredInterfaceModel": string(),
                    "preferredRng": opaque()}, keep_unknown=True),
    "features": opaque(), "firmware": opaque(), "clock": opaque(), "volumes": opaque(),
    "machine": obj({"preferredMachineType": string()}),
    "requirements": obj({"cpu": obj({"guest": integer()}), "memory": obj({"guest": QUANTITY})}),
    "preferredTerminationGracePeriodSeconds": integer(), "preferredSubdomain": string(),
    "preferSpreadSocketToCoreRatio": integer(), "preferredArchitecture": string(), "annotations": map_of(string()),
}, "Defaults for what a VM naming this preference leaves out.")
# ------------------------------------------------------------------ KubeVirt: VM snapshots and restores

_VM_REF = obj({"apiGroup": string(), "kind": string(), "name": string()}, required=("kind", "name"))
_ERROR = obj({"time": TIME, "message": string()})
VM_SNAPSHOT_SPEC = obj({
    "source": _VM_REF,
    "deletionPolicy": string(enum=["Delete", "Retain"]),
    "failureDeadline": string("How long the snapshot may take (a duration, default 5m; 0s: no limit)"),
    "snapshotMode": string(enum=["Direct", "External"]),
}, required=("source",))
VM_SNAPSHOT_STATUS = obj({
    "sourceUID": string(), "virtualMachineSnapshotContentName": string(), "creationTime": TIME,
    "phase": string(), "readyToUse": boolean(), "error": _ERROR, "conditions": CONDITIONS,
    "indications": array(string()),
    "sourceIndications": array(obj({"indication": string(), "message": string()}, required=("indication", "message"))),
    "snapshotVolumes": obj({"includedVolumes": array(string()), "excludedVolumes": array(string())}),
})
VM_SNAPSHOT_CONTENT_SPEC = obj({
    "virtualMachineSnapshotName": string(),
    "source": obj({"virtualMachine": opaque("The VirtualMachine as it was (metadata, spec)")}),
    "volumeBackups": array(obj({"volumeName": string(), "persistentVolumeClaim": opaque(),
                                "volumeSnapshotName": string()}, required=("volumeName", "persistentVolumeClaim"))),
}, required=("source",))
VM_SNAPSHOT_CONTENT_STATUS = obj({
    "creationTime": TIME, "readyToUse": boolean(), "error": _ERROR, "snapshotMode": string(),
    "volumeSnapshotStatus": array(obj({"volumeSnapshotName": string(), "creationTime": TIME, "readyToUse": boolean(),
                                       "error": _ERROR}, required=("volumeSnapshotName",))),
})
VM_RESTORE_SPEC = obj({
    "target": _VM_REF,
    "virtualMachineSnapshotName": string(),
    "targetReadinessPolicy": string(enum=["StopTarget", "WaitGracePeriod", "FailImmediate", "WaitEventually"]),
    "volumeRestorePolicy": string(enum=["RandomizeNames", "InPlace", "PrefixTargetName"]),
    "volumeOwnershipPolicy": string(enum=["Vm", "None"]),
    "volumeRestoreOverrides": array(obj({"volumeName": string(), "restoreName": string(),
                                         "labels": map_of(string()), "annotations": map_of(string())})),
    "patches": array(string()),
}, required=("target", "virtualMachineSnapshotName"))
VM_RESTORE_STATUS = obj({
    "restores": array(obj({"volumeName": string(), "persistentVolumeClaim": string(), "volumeSnapshotName": string(),
                           "dataVolumeName": string()}, required=("volumeName", "persistentVolumeClaim"))),
    "restoreTime": TIME, "deletedDataVolumes": array(string()), "complete": boolean(), "conditions": CONDITIONS,
})
_ERROR_COLUMN = {"name": "Error", "type": "string", "jsonPath": ".status.error.message"}
_CREATION_COLUMN = {"name": "CreationTime", "type": "date", "jsonPath": ".status.creationTime"}
_READY_TO_USE = {"name": "ReadyToUse", "type": "boolean", "jsonPath": ".status.readyToUse"}

INSTANCETYPE_VERSIONS = ("v1beta1", "v1alpha2", "v1alpha1")  # the alphas: still served by KubeVirt, deprecated

# ------------------------------------------------------------------ the CRDs


# ------------------------------------------------------------------ KubeVirt: VirtualMachineExport

_EXPORT_LINK = obj({
    "cert": string("The PEM of the export server's certificate"),
    "volumes": array(obj({"name": string(), "formats": array(obj({"format": string(), "url": string()},
                                                                  required=("format", "url")))},
                         required=("name",))),
    "manifests": array(obj({"type": string(), "url": string()}, required=("type", "url"))),
}, required=("cert",))
VM_EXPORT_SPEC = obj({
    "source": obj({"apiGroup": string(), "kind": string(), "name": string()}, required=("kind", "name")),
    "tokenSecretRef": string("The Secret (key `token`) whose token a download must send; made when not given"),
    "ttlDuration": string("How long the export lives from its creation (default 2h)"),
}, required=("source",))
VM_EXPORT_STATUS = obj({
    "phase": string(), "links": obj({"internal": _EXPORT_LINK, "external": _EXPORT_LINK}),
    "tokenSecretRef": string(), "ttlExpirationTime": TIME, "serviceName": string(), "virtualMachineName": string(),
    "conditions": CONDITIONS,
}, keep_unknown=True)


# ------------------------------------------------------------------ KubeVirt: pools and replica sets

VM_POOL_SPEC = obj({
    "replicas": integer("How many VMs (default 1)", minimum=0),
    "selector": LABEL_SELECTOR,
    "virtualMachineTemplate": obj({"metadata": EMBEDDED_METADATA, "spec": VM_SPEC}, required=("spec",)),
    "paused": boolean("true: the pool's controller leaves its VMs alone"),
    "nameGeneration": obj({"appendIndexToConfigMapRefs": boolean(), "appendIndexToSecretRefs": boolean()}),
    "maxUnavailable": {"anyOf": [{"type": "integer"}, {"type": "string"}], "x-kubernetes-int-or-string": True},
    "scaleInStrategy": opaque("Which VMs a scale-in removes (proactive.selectionPolicy.sortPolicy)"),
    "updateStrategy": opaque(),
    "autohealing": opaque(),
}, required=("selector", "virtualMachineTemplate"))
REPLICA_STATUS = obj({
    "replicas": integer(), "readyReplicas": integer(), "labelSelector": string(), "conditions": CONDITIONS,
}, keep_unknown=True)
VMIRS_SPEC = obj({
    "replicas": integer("How many VMIs (default 1)", minimum=0),
    "selector": LABEL_SELECTOR,
    "template": obj({"metadata": EMBEDDED_METADATA, "spec": VMI_SPEC}),
    "paused": boolean("true: the replica set's controller leaves its VMIs alone"),
}, required=("template",))
REPLICA_COLUMNS = [{"name": "Desired", "type": "integer", "jsonPath": ".spec.replicas"},
                   {"name": "Current", "type": "integer", "jsonPath": ".status.replicas"},
                   {"name": "Ready", "type": "integer", "jsonPath": ".status.readyReplicas"}, AGE]
SCALE = {"specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas",
         "labelSelectorPath": ".status.labelSelector"}


def root(description: str, spec: Schema, status: Schema | None, spec_required: bool = True) -> Schema:
    fields = {"apiVersion": string(), "kind": string(), "metadata": obj(), "spec": spec}
    return obj(fields | ({"status": status} if status is not None else {}), description,
               required=("spec",) if spec_required else ())


def crd(group: str, kind: str, plural: str, short: list[str], schema: Schema, columns: list[dict],
        versions: tuple[str, ...], deprecated: tuple[str, ...] = (), scope: str = "Namespaced",
        categories: tuple[str, ...] = ("all",), status: bool = True, scale: dict | None = None) -> dict:
    """One CRD serving `versions` (the first stored) with the same schema (a status subresource
    unless `status` is False: upstream's kinds that have no status)."""
    served = []
    for i, version in enumerate(versions):
        entry = {"name": version, "served": True, "storage": i == 0}
        if version in deprecated:
            entry.update(deprecated=True, deprecationWarning=f"{group}/{version} {kind} is deprecated; use "
                                                             f"{group}/{versions[0]}")
        subresources = ({"status": {}} if status else {}) | ({"scale": scale} if scale else {})
        entry.update(schema={"openAPIV3Schema": schema}, **({"subresources": subresources} if subresources else {}),
                     additionalPrinterColumns=columns)
        served.append(entry)
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{group}", "labels": {"app.kubernetes.io/part-of": "pvlun"}},
        "spec": {"group": group, "scope": scope,
                 "names": {"kind": kind, "listKind": f"{kind}List", "plural": plural, "singular": kind.lower(),
                           **({"shortNames": short} if short else {}),
                           **({"categories": list(categories)} if categories else {})},
                 "versions": served},
    }


def instancetype_crd(kind: str, plural: str, short: list[str], description: str, spec: Schema,
                     scope: str = "Namespaced") -> dict:
    """KubeVirt's: in category "all" when namespaced, no status, no columns but Age."""
    return crd("instancetype.kubevirt.io", kind, plural, short, root(description, spec, None), [],
               INSTANCETYPE_VERSIONS, deprecated=INSTANCETYPE_VERSIONS[1:], scope=scope,
               categories=("all",) if scope == "Namespaced" else (), status=False)


KUBEVIRT_VERSIONS = ("v1", "v1alpha3")  # v1alpha3: still served by KubeVirt, deprecated
CRDS = {
    "datavolumes.cdi.kubevirt.io": crd(
        "cdi.kubevirt.io", "DataVolume", "datavolumes", ["dv", "dvs"],
        root("A volume filled from a source (CDI's DataVolume).", DATA_VOLUME_SPEC, DATA_VOLUME_STATUS),
        [{"name": "Phase", "type": "string", "jsonPath": ".status.phase", "description": "Where the data volume is"},
         {"name": "Progress", "type": "string", "jsonPath": ".status.progress",
          "description": "How much was transferred, in percent (N/A when unknown)"},
         {"name": "Restarts", "type": "integer", "jsonPath": ".status.restartCount",
          "description": "How often the transfer started over"},
         AGE],
        ("v1beta1",)),
    "datasources.cdi.kubevirt.io": crd(
        "cdi.kubevirt.io", "DataSource", "datasources", ["das"],
        root("What a DataVolume's sourceRef clones: a claim or a snapshot (CDI's DataSource).", DATA_SOURCE_SPEC,
             DATA_SOURCE_STATUS), [], ("v1beta1",)),
    "dataimportcrons.cdi.kubevirt.io": crd(
        "cdi.kubevirt.io", "DataImportCron", "dataimportcrons", ["dic", "dics"],
        root("A golden image imported again from a registry on a schedule (CDI's DataImportCron).",
             DATA_IMPORT_CRON_SPEC, DATA_IMPORT_CRON_STATUS), [], ("v1beta1",)),
    "storageprofiles.cdi.kubevirt.io": crd(
        "cdi.kubevirt.io", "StorageProfile", "storageprofiles", [],
        root("What a StorageClass's claims get by default, and how its clones are made (CDI's StorageProfile).",
             STORAGE_PROFILE_SPEC, STORAGE_PROFILE_STATUS, spec_required=False), [], ("v1beta1",),
        scope="Cluster", categories=()),
    "virtualmachines.kubevirt.io": crd(
        "kubevirt.io", "VirtualMachine", "virtualmachines", ["vm", "vms"],
        root("A virtual machine that runs (or not) as its runStrategy says.", VM_SPEC, VM_STATUS),
        [AGE, {"name": "Status", "type": "string", "jsonPath": ".status.printableStatus",
               "description": "Human readable status"}, READY],
        KUBEVIRT_VERSIONS, deprecated=("v1alpha3",)),
    "virtualmachineinstances.kubevirt.io": crd(
        "kubevirt.io", "VirtualMachineInstance", "virtualmachineinstances", ["vmi", "vmis"],
        root("A running virtual machine: one QEMU process.", VMI_SPEC, VMI_STATUS),
        [AGE, {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
         {"name": "IP", "type": "string", "jsonPath": ".status.interfaces[0].ipAddress"},
         {"name": "NodeName", "type": "string", "jsonPath": ".status.nodeName"}, READY,
         {"name": "Live-Migratable", "type": "string", "priority": 1,
          "jsonPath": ".status.conditions[?(@.type=='LiveMigratable')].status"},
         {"name": "Paused", "type": "string", "priority": 1,
          "jsonPath": ".status.conditions[?(@.type=='Paused')].status"}],
        KUBEVIRT_VERSIONS, deprecated=("v1alpha3",)),
    "virtualmachineinstancemigrations.kubevirt.io": crd(
        "kubevirt.io", "VirtualMachineInstanceMigration", "virtualmachineinstancemigrations", ["vmim", "vmims"],
        root("A live migration of a VirtualMachineInstance to another node.", MIGRATION_SPEC, MIGRATION_STATUS),
        [{"name": "Phase", "type": "string", "jsonPath": ".status.phase",
          "description": "Where the migration is"},
         {"name": "VMI", "type": "string", "jsonPath": ".spec.vmiName",
          "description": "The VirtualMachineInstance being migrated"}],
        KUBEVIRT_VERSIONS, deprecated=("v1alpha3",)),
    "virtualmachinesnapshots.snapshot.kubevirt.io": crd(
        "snapshot.kubevirt.io", "VirtualMachineSnapshot", "virtualmachinesnapshots", ["vmsnapshot", "vmsnapshots"],
        root("A snapshot of a VirtualMachine: its spec and all its disks, taken at one instant.", VM_SNAPSHOT_SPEC,
             VM_SNAPSHOT_STATUS),
        [{"name": "SourceKind", "type": "string", "jsonPath": ".spec.source.kind"},
         {"name": "SourceName", "type": "string", "jsonPath": ".spec.source.name"},
         {"name": "Phase", "type": "string", "jsonPath": ".status.phase"}, _READY_TO_USE, _CREATION_COLUMN,
         _ERROR_COLUMN],
        ("v1beta1",)),
    "virtualmachinesnapshotcontents.snapshot.kubevirt.io": crd(
        "snapshot.kubevirt.io", "VirtualMachineSnapshotContent", "virtualmachinesnapshotcontents",
        ["vmsnapshotcontent", "vmsnapshotcontents"],
        root("What a VirtualMachineSnapshot holds: the VM as it was and the VolumeSnapshots of its disks.",
             VM_SNAPSHOT_CONTENT_SPEC, VM_SNAPSHOT_CONTENT_STATUS),
        [_READY_TO_USE, _CREATION_COLUMN, _ERROR_COLUMN], ("v1beta1",)),
    "virtualmachinerestores.snapshot.kubevirt.io": crd(
        "snapshot.kubevirt.io", "VirtualMachineRestore", "virtualmachinerestores", ["vmrestore", "vmrestores"],
        root("A VirtualMachine restored from a snapshot: its own (stopped), or a new one.", VM_RESTORE_SPEC,
             VM_RESTORE_STATUS),
        [{"name": "TargetKind", "type": "string", "jsonPath": ".spec.target.kind"},
         {"name": "TargetName", "type": "string", "jsonPath": ".spec.target.name"},
         {"name": "Complete", "type": "boolean", "jsonPath": ".status.complete"},
         {"name": "RestoreTime", "type": "date", "jsonPath": ".status.restoreTime"}, _ERROR_COLUMN],
        ("v1beta1",)),
    "virtualmachineexports.export.kubevirt.io": crd(
        "export.kubevirt.io", "VirtualMachineExport", "virtualmachineexports", ["vmexport", "vmexports"],
        root("The volumes of a VM, a VM snapshot or a claim, served over HTTPS with a token.", VM_EXPORT_SPEC,
             VM_EXPORT_STATUS),
        [{"name": "SourceKind", "type": "string", "jsonPath": ".spec.source.kind"},
         {"name": "SourceName", "type": "string", "jsonPath": ".spec.source.name"},
         {"name": "Phase", "type": "string", "jsonPath": ".status.phase"}],
        ("v1beta1",)),
    "virtualmachinepools.pool.kubevirt.io": crd(
        "pool.kubevirt.io", "VirtualMachinePool", "virtualmachinepools", ["vmpool", "vmpools"],
        root("VirtualMachines made from one template, as many as spec.replicas: `<pool>-<index>`.", VM_POOL_SPEC,
             REPLICA_STATUS), REPLICA_COLUMNS, ("v1beta1", "v1alpha1"), deprecated=("v1alpha1",), scale=SCALE),
    "virtualmachineinstancereplicasets.kubevirt.io": crd(
        "kubevirt.io", "VirtualMachineInstanceReplicaSet", "virtualmachineinstancereplicasets", ["vmirs", "vmirss"],
        root("VirtualMachineInstances made from one template, as many as spec.replicas.", VMIRS_SPEC,
             REPLICA_STATUS), REPLICA_COLUMNS, KUBEVIRT_VERSIONS, deprecated=("v1alpha3",), scale=SCALE),
    "virtualmachineinstancetypes.instancetype.kubevirt.io": instancetype_crd(
        "VirtualMachineInstancetype", "virtualmachineinstancetypes",
        ["vminstancetype", "vminstancetypes", "vmf", "vmfs"],
        "The vCPUs and memory of the VMs naming it, in its namespace.", INSTANCETYPE_SPEC),
    "virtualmachineclusterinstancetypes.instancetype.kubevirt.io": instancetype_crd(
        "VirtualMachineClusterInstancetype", "virtualmachineclusterinstancetypes",
        ["vmclusterinstancetype", "vmclusterinstancetypes", "vmcf", "vmcfs"],
        "The vCPUs and memory of the VMs naming it, in any namespace.", INSTANCETYPE_SPEC, scope="Cluster"),
    "virtualmachinepreferences.instancetype.kubevirt.io": instancetype_crd(
        "VirtualMachinePreference", "virtualmachinepreferences", ["vmpref", "vmprefs", "vmp", "vmps"],
        "Defaults (buses, models, firmware) for the VMs naming it, in its namespace.", PREFERENCE_SPEC),
    "virtualmachineclusterpreferences.instancetype.kubevirt.io": instancetype_crd(
        "VirtualMachineClusterPreference", "virtualmachineclusterpreferences", ["vmcp", "vmcps"],
        "Defaults (buses, models, firmware) for the VMs naming it, in any namespace.", PREFERENCE_SPEC,
        scope="Cluster"),
}
HEADER = "# Generated by deploy/crds.py (make crds): edit that, not this.\n"


class _NoAliases(yaml.SafeDumper):
    """Shared schema parts are written out in full: kubectl and kustomize need no anchors."""

    def ignore_aliases(self, data) -> bool:
        return True


def render(name: str) -> str:
    return HEADER + yaml.dump(CRDS[name], Dumper=_NoAliases, sort_keys=False, width=120)


def write(out_dir: Path = OUT_DIR) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in CRDS:
        path = out_dir / f"{name}.yaml"
        path.write_text(render(name))
        paths.append(path)
    return paths


if __name__ == "__main__":
    for written in write(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT_DIR):
        print(written)
