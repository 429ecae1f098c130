"""A VirtualMachineInstance → its launcher Pod (and a migration's target Pod), as pure functions.

KubeVirt's virt-controller renders one `virt-launcher-<vmi>-<suffix>` Pod per VMI
(pkg/virt-controller/services/template.go, rendervolumes.go); this is ours, with the same
shape and names: container `compute`, labels `kubevirt.io: virt-launcher`,
`kubevirt.io/created-by: <vmi uid>`, `vm.kubevirt.io/name`, a controller ownerReference to the
VMI, the VMI's nodeSelector, affinity and tolerations, a Block claim as a `volumeDevice`
(`/dev/pvlun/<volume>`), a Filesystem claim mounted at
`/var/run/kubevirt-private/vmi-disks/<volume>/` (QEMU opens `disk.img` there), cloud-init
seeds and emptyDisks made by the launcher in the `ephemeral-disks` emptyDir. The container runs
`pvlun launch` (pvlun/launch_cli.py), which reads the VMI from a file: a downward-API volume
of the Pod annotation `pvlun.dev/vmi` (at most MAX_VMI_BYTES of JSON). No string of the spec
is ever in the container's argv: the arguments are this module's constants.

The name is generateName's, computed here so that rendering stays pure and a retry renders the
same Pod: `virt-launcher-<vmi>-` cut to 58 characters, then 5 characters of Kubernetes'
generateName alphabet taken from a digest of the VMI's uid (and the migration's, for a target).

What the Pod asks for (see `memory_overhead`, `LAUNCHER_CAPABILITIES`): guest memory plus our
overhead; 100m of CPU per vCPU unless the VMI asks (KubeVirt's default cpuAllocationRatio 10);
`devices.kubevirt.io/kvm: 1` only when the caller says the node has KVM (otherwise QEMU runs
TCG and needs no device); KubeVirt's 50M of ephemeral storage for the run directory. An
emptyDisk's written bytes count against the node's ephemeral storage, as in KubeVirt.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Mapping

from controlplane.admission import check_name
from controlplane.object_links import MIGRATION_JOB
from controlplane.quantity import parse_quantity
from controlplane.vm_spec import SpecError, VmSpec, parse_virtual_machine_instance
from controlplane.vm_spec_fields import items, mapping, matching
from controlplane.vm_spec_fields import NAME
from virt.pod_layout import (BLOCK_DIR, DISK_DIR, DISK_IMG, EPHEMERAL_DIR, FILESYSTEM_DIR, MIGRATION_PORT,  # noqa: F401
                              PRIVATE_DIR, RUN_DIR, TOKEN_DIR, TOKEN_FILE, VMI_DIR, VMI_FILE)

CONTAINER = "compute"
APP_LABEL, CREATED_BY_LABEL, VM_NAME_LABEL = "kubevirt.io", "kubevirt.io/created-by", "vm.kubevirt.io/name"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"  # the controller watches only Pods with its name here
MIGRATION_JOB_LABEL = "kubevirt.io/migrationJobUID"
MIGRATION_JOB_ANNOTATION = MIGRATION_JOB  # kubevirt.io/migrationJobName: its change reaches the migration
DOMAIN_ANNOTATION, DEFAULT_CONTAINER_ANNOTATION = "kubevirt.io/domain", "kubectl.kubernetes.io/default-container"
VMI_ANNOTATION = "pvlun.dev/vmi"
HOSTNAME_KEY = "kubernetes.io/hostname"
KVM_RESOURCE = "devices.kubevirt.io/kvm"

TARGET_LISTEN_SECONDS = 300  # a migration target that does not listen by then is restarted (so fails: restartPolicy Never)
_NOT_COPIED = ("kubectl.kubernetes.io", "kubevirt.io/storage-observed-api-version",
               "kubevirt.io/latest-observed-api-version")  # VMI annotations KubeVirt keeps off the Pod
RESERVED_VOLUMES = ("private", "ephemeral-disks", "pvlun-vmi", "pvlun-migration")

MAX_VMI_BYTES = 128 << 10  # the VMI as the launcher reads it; half of what a Pod's annotations may hold
ANNOTATIONS_MAX = 256 << 10  # Kubernetes' TotalAnnotationSizeLimitB
EPHEMERAL_STORAGE = "50M"  # KubeVirt's ephemeralStorageOverheadSize
GRACE_PADDING = 30  # KubeVirt: the VMI's grace period + 15 s, + 15 s before the kubelet kills
GENERATE_NAME_MAX, SUFFIX_LENGTH = 58, 5  # apiserver's generateName: 63 - 5 random characters
SUFFIX_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # k8s.io/apimachinery/pkg/util/rand

MIB = 1 << 20
# Memory a launcher Pod holds besides guest RAM (KubeVirt's GetMemoryOverhead, ours):
OVERHEAD_FIXED = 96 * MIB  # measured: pvlun launch (Python, qemu.qmp) ~40Mi, QEMU itself ~45Mi, bwrap ~3Mi
OVERHEAD_PER_VCPU = 8 * MIB  # vCPU thread stacks and state (KubeVirt's figure)
OVERHEAD_PER_INTERFACE = 16 * MIB  # one passt per interface
OVERHEAD_TCG = 128 * MIB  # TCG's translation cache as a guest warms it (QEMU lets it grow to 1Gi)
PAGE_TABLE_DIVISOR = 512  # the guest's page tables: 1/512 of its RAM (KubeVirt's figure)
OVMF_OVERHEAD = 4 * MIB  # firmware and its variables, for efi guests
CPU_PER_VCPU_MILLI = 100  # KubeVirt's default cpuAllocationRatio of 10

# What the compute container may do, and why: QEMU runs in pvlun's bubblewrap sandbox
# (host/sandbox.py) as `nobody`, which root in the container builds. bwrap as root needs
# SYS_ADMIN (mount, pid, ipc, uts and net namespaces) and NET_ADMIN (the loopback of QEMU's
# empty network namespace); SETUID and SETGID switch to `nobody` (setpriv, passt's --runas);
# SETPCAP empties QEMU's capability bounding set (without it QEMU keeps the container's);
# MKNOD and CHOWN make the sandbox's private device nodes of the claims' block devices and of
# /dev/kvm; KILL ends QEMU, which runs as another user, when it does not quit. Nothing else: no
# DAC_OVERRIDE (the launcher opens only root's files: what the importer wrote, its own run
# directory), no privileged mode. tests/virt/test_launch_cli.py runs `pvlun launch` with exactly
# this bounding set. bwrap's mounts need an unconfined AppArmor profile (the runtime's default
# one denies mount); seccomp stays the runtime's default, which allows those calls to a holder
# of SYS_ADMIN.
LAUNCHER_CAPABILITIES = ("CHOWN", "KILL", "MKNOD", "NET_ADMIN", "SETGID", "SETPCAP", "SETUID", "SYS_ADMIN")
_CPU = re.compile(r"[0-9]{1,6}m|[0-9]{1,4}(\.[0-9]{1,3})?")
_UID = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")  # a label value: uids are labels here
_IMAGE = re.compile(r"[^\s]{1,512}")


def vmi_spec(vmi: Any) -> VmSpec:
    """The VMI as QEMU would run it, or SpecError naming the field: everything
    `parse_virtual_machine_instance` checks, and no containerDisk (another issue)."""
    spec = mapping(mapping(vmi, "", required=True).get("spec"), "spec", required=True)
    for i, volume in enumerate(items(spec.get("volumes"), "spec.volumes")):
        if isinstance(volume, dict) and "containerDisk" in volume:
            raise SpecError(f"spec.volumes[{i}].containerDisk", "containerDisk volumes cannot run in cluster mode "
                            "yet; import the image into a DataVolume (source registry) and use that")
    firmware = mapping(mapping(spec.get("domain"), "spec.domain").get("firmware"), "spec.domain.firmware")
    if "kernelBoot" in firmware:
        raise SpecError("spec.domain.firmware.kernelBoot", "kernelBoot cannot run in cluster mode yet (its kernel "
                        "comes from a container image); boot from a disk")
    return parse_virtual_machine_instance(vmi)


def volume_path(volume: str, block: bool) -> str:
    """Where the launcher finds a claim's bytes in the Pod: the Block claim's device, or the
    Filesystem claim's disk.img."""
    return f"{BLOCK_DIR}/{volume}" if block else f"{FILESYSTEM_DIR}/{volume}/{DISK_IMG}"


def generated_name(base: str, seed: str) -> str:
    """What the API server's generateName would make of `base`, with the random part drawn
    from `seed` instead: the same object renders the same name."""
    digest = hashlib.sha256(seed.encode()).digest()
    return base[:GENERATE_NAME_MAX] + "".join(SUFFIX_ALPHABET[b % len(SUFFIX_ALPHABET)]
                                             for b in digest[:SUFFIX_LENGTH])


def memory_overhead(spec: VmSpec, kvm: bool) -> int:
    """Bytes the launcher Pod needs besides the guest's RAM (see the constants above)."""
    total = OVERHEAD_FIXED + spec.vcpus * OVERHEAD_PER_VCPU + len(spec.interfaces) * OVERHEAD_PER_INTERFACE
    total += -(-spec.memory // PAGE_TABLE_DIVISOR) + (0 if kvm else OVERHEAD_TCG)
    return total + (OVMF_OVERHEAD if spec.firmware == "efi" else 0)


def _mebibytes(n: int) -> str:
    return f"{-(-n // MIB)}Mi"


def _cpu(value: Any, path: str) -> str:
    return matching(str(value) if isinstance(value, int) and not isinstance(value, bool) else value, path,
                    _CPU, "a CPU quantity (e.g. 500m, 2)")


def _resources(vmi: dict, spec: VmSpec, kvm: bool) -> dict:
    """requests and limits of the compute container (KubeVirt's ResourceRenderer, ours)."""
    where = "spec.domain.resources"
    res = mapping(mapping(vmi["spec"].get("domain"), "spec.domain").get("resources"), where)
    req, lim = mapping(res.get("requests"), f"{where}.requests"), mapping(res.get("limits"), f"{where}.limits")
    overhead = memory_overhead(spec, kvm)
    try:
        asked = parse_quantity(req["memory"]) if "memory" in req else spec.memory
    except ValueError as exc:
        raise SpecError(f"{where}.requests.memory", str(exc)) from None
    requests = {"cpu": _cpu(req["cpu"], f"{where}.requests.cpu") if "cpu" in req
                else f"{spec.vcpus * CPU_PER_VCPU_MILLI}m",
                "memory": _mebibytes(max(asked, spec.memory) + overhead), "ephemeral-storage": EPHEMERAL_STORAGE}
    limits: dict[str, str] = {}
    if "cpu" in lim:
        limits["cpu"] = _cpu(lim["cpu"], f"{where}.limits.cpu")
    if "memory" in lim:
        try:
            limits["memory"] = _mebibytes(parse_quantity(lim["memory"]) + overhead)
        except ValueError as exc:
            raise SpecError(f"{where}.limits.memory", str(exc)) from None
    if kvm:
        requests[KVM_RESOURCE] = limits[KVM_RESOURCE] = "1"
    return {"requests": requests, "limits": limits} if limits else {"requests": requests}


def _hostname(vmi: dict, name: str) -> str:
    """KubeVirt's dns.SanitizeHostname: spec.hostname, else the name's first label (63 at most)."""
    given = vmi["spec"].get("hostname")
    return given if isinstance(given, str) and given else name.split(".")[0][:63].rstrip("-")


def _placement(vmi: dict) -> dict:
    """nodeSelector, affinity and tolerations of the VMI, type-checked (the API server checks
    the rest when the Pod is created)."""
    spec, out = vmi["spec"], {}
    selector = mapping(spec.get("nodeSelector"), "spec.nodeSelector")
    for key, value in selector.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise SpecError("spec.nodeSelector", "keys and values must be strings")
    if selector:
        out["nodeSelector"] = dict(selector)
    if spec.get("affinity") is not None:
        out["affinity"] = json.loads(json.dumps(mapping(spec["affinity"], "spec.affinity")))
    tolerations = [dict(mapping(t, f"spec.tolerations[{i}]", required=True))
                   for i, t in enumerate(items(spec.get("tolerations"), "spec.tolerations"))]
    if tolerations:
        out["tolerations"] = json.loads(json.dumps(tolerations))
    return out


def _volumes(spec: VmSpec, claims: Mapping[str, dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """(pod volumes, volumeMounts, volumeDevices) of the VMI's claims (rendervolumes.go)."""
    volumes, mounts, devices = [], [], []
    for i, volume in enumerate(spec.volumes):
        if volume.name in RESERVED_VOLUMES:
            raise SpecError(f"spec.volumes[{i}].name", f"{volume.name!r} is the name of one of the launcher Pod's "
                            f"own volumes ({', '.join(RESERVED_VOLUMES)}); rename the volume")
        if volume.source not in ("dataVolume", "persistentVolumeClaim"):
            continue  # cloud-init and emptyDisk: made by the launcher in the ephemeral-disks emptyDir
        claim = claims.get(volume.claim_name or "")
        if not isinstance(claim, dict):
            raise ValueError(f"claim {volume.claim_name!r} of volume {volume.name!r} is not known (yet)")
        mode = mapping(claim.get("spec"), "claim.spec").get("volumeMode") or "Filesystem"
        if mode not in ("Block", "Filesystem"):
            raise ValueError(f"claim {volume.claim_name!r} has volumeMode {str(mode)[:20]!r} (Block or Filesystem)")
        source: dict = {"claimName": volume.claim_name}
        if volume.readonly:
            source["readOnly"] = True
        volumes.append({"name": volume.name, "persistentVolumeClaim": source})
        if mode == "Block":
            devices.append({"name": volume.name, "devicePath": volume_path(volume.name, True)})
        else:
            mounts.append({"name": volume.name, "mountPath": f"{FILESYSTEM_DIR}/{volume.name}"})
    return volumes, mounts, devices


def _vmi_annotation(vmi: dict, name: str, namespace: str, uid: str) -> str:
    """The VMI as `pvlun launch` reads it: compact JSON, bounded."""
    meta = vmi.get("metadata") or {}
    body = {"apiVersion": vmi.get("apiVersion"), "kind": "VirtualMachineInstance",
            "metadata": {"name": name, "namespace": namespace, "uid": uid,
                         **({"labels": meta["labels"]} if isinstance(meta.get("labels"), dict) else {})},
            "spec": vmi["spec"]}
    try:  # first: what is copied into the Pod below (affinity, tolerations) is then plain, shallow JSON
        text = json.dumps(body, separators=(",", ":"), sort_keys=True)
    except (RecursionError, TypeError, ValueError):
        raise SpecError("spec", "is not plain JSON, or is nested too deeply") from None
    if len(text.encode()) > MAX_VMI_BYTES:
        raise ValueError(f"the VMI is {len(text.encode())} bytes as JSON; a launcher Pod carries at most "
                         f"{MAX_VMI_BYTES}")
    return text


def _uid(obj: dict, what: str) -> str:
    uid = (obj.get("metadata") or {}).get("uid")
    if not isinstance(uid, str) or not uid:
        raise ValueError(f"the {what} has no metadata.uid: launcher Pods are made for objects the API server stored")
    return matching(uid, f"{what} metadata.uid", _UID, "a uid (at most 63 letters, digits, '-', '_' or '.')")


def _render(vmi: dict, claims: Mapping[str, dict], image: str, namespace: str, service_account: str, kvm: bool,
            incoming: tuple[int, str | None] | None) -> dict:
    """The launcher Pod; `incoming` (port, token Secret) makes it a migration target's."""
    spec = vmi_spec(vmi)
    meta = vmi["metadata"]
    name, uid = meta.get("name"), _uid(vmi, "VMI")
    check_name(name, namespace, "VirtualMachineInstance")
    if meta.get("namespace", namespace) != namespace:
        raise ValueError(f"the VMI is in namespace {str(meta.get('namespace'))[:63]!r}, not {namespace!r}")
    check_name(service_account, None)
    matching(image, "image", _IMAGE, "a container image reference")
    hostname = _hostname(vmi, name)
    volumes, mounts, devices = _volumes(spec, claims)
    annotations = {k: v for k, v in (meta.get("annotations") or {}).items()
                   if isinstance(k, str) and isinstance(v, str) and not k.startswith(_NOT_COPIED)}
    annotations.update({DOMAIN_ANNOTATION: name, DEFAULT_CONTAINER_ANNOTATION: CONTAINER,
                        VMI_ANNOTATION: _vmi_annotation(vmi, name, namespace, uid)})
    labels = {k: v for k, v in (meta.get("labels") or {}).items() if isinstance(k, str) and isinstance(v, str)}
    labels.update({APP_LABEL: "virt-launcher", CREATED_BY_LABEL: uid, VM_NAME_LABEL: hostname,
                   MANAGED_BY_LABEL: "pvlun-controller"})

    args = ["launch", "--vmi-file", VMI_FILE, "--run-dir", RUN_DIR, "--disk-dir", DISK_DIR,
            "--accel", "kvm" if kvm else "tcg"]
    pod_volumes = [{"name": "private", "emptyDir": {}}, {"name": "ephemeral-disks", "emptyDir": {}},
                   {"name": "pvlun-vmi", "downwardAPI": {"items": [
                       {"path": VMI_FILE.rsplit("/", 1)[1],
                        "fieldRef": {"fieldPath": f"metadata.annotations['{VMI_ANNOTATION}']"}}]}}]
    pod_mounts = [{"name": "private", "mountPath": PRIVATE_DIR},
                  {"name": "ephemeral-disks", "mountPath": EPHEMERAL_DIR},
                  {"name": "pvlun-vmi", "mountPath": VMI_DIR, "readOnly": True}]
    container: dict[str, Any] = {"name": CONTAINER, "image": image, "imagePullPolicy": "IfNotPresent",
                                 "command": ["pvlun"], "args": args,
                                 "env": [{"name": "NODE_NAME",  # for the launcher's reports
                                          "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}]}
    if incoming is not None:
        port, token_secret = incoming
        args += ["--incoming", str(port)]
        container["ports"] = [{"name": "migration", "containerPort": port, "protocol": "TCP"}]
        # Ready once the launcher listens (the kubelet's one successful connect; the launcher
        # passes over a connection that sends nothing), so the controller starts the stream
        # only then; never probed again, so the Pod stays Ready as the VMI's launcher after.
        container["startupProbe"] = {"tcpSocket": {"port": port}, "periodSeconds": 1, "timeoutSeconds": 1,
                                     "failureThreshold": TARGET_LISTEN_SECONDS}
        if token_secret is not None:
            args += ["--token-file", TOKEN_FILE]
            pod_volumes.append({"name": "pvlun-migration", "secret": {"secretName": token_secret,
                                                                      "defaultMode": 0o400}})
            pod_mounts.append({"name": "pvlun-migration", "mountPath": TOKEN_DIR, "readOnly": True})
    container["resources"] = _resources(vmi, spec, kvm)
    container["securityContext"] = {"privileged": False, "runAsUser": 0, "runAsNonRoot": False,
                                    "capabilities": {"drop": ["ALL"], "add": list(LAUNCHER_CAPABILITIES)},
                                    "appArmorProfile": {"type": "Unconfined"},
                                    "seccompProfile": {"type": "RuntimeDefault"}}
    container["volumeMounts"] = pod_mounts + mounts
    if devices:
        container["volumeDevices"] = devices
    pod_spec: dict[str, Any] = {
        "hostname": hostname,
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": spec.termination_grace_period + GRACE_PADDING,
        "serviceAccountName": service_account,
        "automountServiceAccountToken": False,  # the launcher never talks to the API server
        "enableServiceLinks": False,
        "containers": [container],
        "volumes": pod_volumes + volumes,
        **_placement(vmi),
    }
    subdomain = vmi["spec"].get("subdomain")
    if subdomain is not None:
        pod_spec["subdomain"] = matching(subdomain, "spec.subdomain", NAME, "a DNS label")
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": generated_name(f"virt-launcher-{name}-", uid), "namespace": namespace,
                         "labels": labels, "annotations": annotations,
                         "ownerReferences": [{"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
                                              "name": name, "uid": uid, "controller": True,
                                              "blockOwnerDeletion": True}]},
            "spec": pod_spec}


def _keep_off(spec: dict, node: str) -> None:
    """KubeVirt's node anti-affinity of a migration target: every required node selector term
    (they are ORed) also says `kubernetes.io/hostname NotIn [node]`."""
    away = {"key": HOSTNAME_KEY, "operator": "NotIn", "values": [node]}
    where = "spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution"
    affinity = spec.setdefault("affinity", {})
    node_affinity = affinity["nodeAffinity"] = mapping(affinity.get("nodeAffinity"), "spec.affinity.nodeAffinity")
    required = node_affinity["requiredDuringSchedulingIgnoredDuringExecution"] = mapping(
        node_affinity.get("requiredDuringSchedulingIgnoredDuringExecution"), where)
    terms = required["nodeSelectorTerms"] = items(required.get("nodeSelectorTerms"), f"{where}.nodeSelectorTerms")
    for i, term in enumerate(terms):
        term = mapping(term, f"{where}.nodeSelectorTerms[{i}]", required=True)
        term["matchExpressions"] = items(term.get("matchExpressions"),
                                         f"{where}.nodeSelectorTerms[{i}].matchExpressions") + [away]
    if not terms:
        terms.append({"matchExpressions": [away]})


def _check_annotations(pod: dict) -> dict:
    annotations = pod["metadata"]["annotations"]
    if sum(len(k.encode()) + len(v.encode()) for k, v in annotations.items()) > ANNOTATIONS_MAX:
        raise ValueError(f"the launcher Pod's annotations would exceed Kubernetes' {ANNOTATIONS_MAX} bytes; "
                         "the VMI's own annotations are too large")
    return pod


def launcher_pod(vmi: dict, claims: Mapping[str, dict], image: str, *, namespace: str,
                 service_account: str = "default", kvm: bool = False) -> dict:
    """The launcher Pod of `vmi` (a VirtualMachineInstance as the API server returns it, with
    its uid). `claims`: the PVCs its dataVolume/persistentVolumeClaim volumes name, by claim
    name (their volumeMode decides device or mount). `kvm`: the node has /dev/kvm (the caller
    decides from the node and the VMI); else QEMU runs TCG. Raises SpecError naming the field,
    or ValueError (a claim not known yet, a VMI too large), instead of a Pod that cannot run."""
    return _check_annotations(_render(vmi, claims, image, namespace, service_account, kvm, None))


def migration_target_pod(vmi: dict, migration: dict, claims: Mapping[str, dict], image: str, *,
                         source_node: str, namespace: str, service_account: str = "default",
                         kvm: bool = False, port: int = MIGRATION_PORT, token_secret: str | None = None) -> dict:
    """The Pod a VirtualMachineInstanceMigration's target QEMU runs in: the VMI's launcher Pod,
    waiting for the migration stream on `port` (with the shared token of Secret
    `token_secret`, key `token`, when given), kept off `source_node` (KubeVirt's node
    anti-affinity), on the nodes the migration's `addedNodeSelector` adds, labelled and
    annotated with the migration (`kubevirt.io/migrationJobUID`, `kubevirt.io/migrationJobName`)
    and named apart from the source Pod."""
    mig_uid = _uid(migration, "migration")
    mig_name = (migration.get("metadata") or {}).get("name")
    check_name(mig_name, None)
    vmi_name = mapping(migration.get("spec"), "spec", required=True).get("vmiName")
    if vmi_name != (vmi.get("metadata") or {}).get("name"):
        raise ValueError(f"migration {mig_name} is for VMI {str(vmi_name)[:63]!r}, not this one")
    check_name(source_node, None)
    if token_secret is not None:
        check_name(token_secret, None)
    if not isinstance(port, int) or isinstance(port, bool) or not 1024 <= port <= 65535:
        raise ValueError(f"migration port {port!r} is not within 1024..65535")
    pod = _render(vmi, claims, image, namespace, service_account, kvm, (port, token_secret))
    meta, spec = pod["metadata"], pod["spec"]
    meta["name"] = generated_name(f"virt-launcher-{vmi_name}-", f"{meta['labels'][CREATED_BY_LABEL]}/{mig_uid}")
    meta["labels"][MIGRATION_JOB_LABEL] = mig_uid
    meta["annotations"][MIGRATION_JOB_ANNOTATION] = mig_name
    added = mapping(migration["spec"].get("addedNodeSelector"), "spec.addedNodeSelector")
    selector = spec.setdefault("nodeSelector", {})
    for key, value in added.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise SpecError("spec.addedNodeSelector", "keys and values must be strings")
        if selector.get(key, value) != value:
            raise SpecError(f"spec.addedNodeSelector.{key[:63]}", "conflicts with the VMI's own nodeSelector")
        selector[key] = value
    if not selector:
        del spec["nodeSelector"]
    _keep_off(spec, source_node)
    return _check_annotations(pod)
