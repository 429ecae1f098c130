"""KubeVirt's snapshot.kubevirt.io/v1beta1 kinds as `pvlun apply` admits them: what KubeVirt's
admission webhook checks of a VirtualMachineSnapshot and a VirtualMachineRestore (the source
and target are VirtualMachines, names given, durations and policies well formed), and the
names its controllers give what they make — so the objects and their names match upstream."""

from __future__ import annotations

import re

from controlplane.user_text import quoted
from controlplane.vm_export_spec import parse_duration as go_duration

API_VERSION = "snapshot.kubevirt.io/v1beta1"
KINDS = ("VirtualMachineSnapshot", "VirtualMachineSnapshotContent", "VirtualMachineRestore")
DEFAULT_FAILURE_DEADLINE = 300.0  # seconds (KubeVirt's DefaultFailureDeadline, 5m)
DEFAULT_GRACE_PERIOD = 300.0  # seconds a WaitGracePeriod restore waits for its target (DefaultGracePeriod)
READINESS_POLICIES = ("StopTarget", "WaitGracePeriod", "FailImmediate", "WaitEventually")
VOLUME_RESTORE_POLICIES = ("RandomizeNames", "PrefixTargetName")  # InPlace: not (yet) in pvlun
# Kubernetes label and annotation keys (a qualified name: [prefix/]name) and label values
_QUALIFIED = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_PREFIX = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
NAME_MAX, PREFIX_MAX = 63, 253


def parse_duration(text: object, field: str) -> float:
    """A Go duration (metav1.Duration: "5m", "1m30s", "250ms") in seconds, never negative;
    ValueError names the field."""
    try:
        seconds = go_duration(text).total_seconds()
    except ValueError as exc:
        raise ValueError(f"{field}: {exc}") from None
    if seconds < 0:
        raise ValueError(f"{field}: {quoted(text)} is negative")
    return seconds


def content_name(snapshot_uid: str) -> str:
    """KubeVirt's name of a snapshot's VirtualMachineSnapshotContent."""
    return f"vmsnapshot-content-{snapshot_uid}"


def volume_snapshot_name(snapshot_uid: str, volume: str) -> str:
    """KubeVirt's name of the VolumeSnapshot of one of the VM's volumes."""
    return f"vmsnapshot-{snapshot_uid}-volume-{volume}"


def restore_claim_name(restore: dict, volume: str, target: str) -> str:
    """KubeVirt's name of a restored volume's claim: restore-<restore uid>-<volume> by default,
    <target VM>-<volume> with volumeRestorePolicy PrefixTargetName, or the volume's override."""
    spec = restore.get("spec") or {}
    for override in spec.get("volumeRestoreOverrides") or []:
        if override.get("volumeName") == volume and override.get("restoreName"):
            return override["restoreName"]
    if spec.get("volumeRestorePolicy") == "PrefixTargetName":
        return f"{target}-{volume}"
    return f"restore-{restore['metadata']['uid']}-{volume}"


def restore_claim_names(restore: dict, volumes: list[str], target: str) -> dict[str, str]:
    """Every restored volume's claim name by volume; ValueError unless each volume gets its own
    claim (two volumes restored into one claim would leave one of them unrestored)."""
    names = {volume: restore_claim_name(restore, volume, target) for volume in volumes}
    taken: dict[str, str] = {}
    for volume, name in names.items():
        if name in taken:
            raise ValueError(f"volumes {quoted(taken[name])} and {quoted(volume)} would both be restored into claim "
                             f"{quoted(name)}: give each volume its own name (spec.volumeRestoreOverrides)")
        taken[name] = volume
    return names


def _qualified_key(key: object, field: str) -> None:
    """A label or annotation key as the API server takes it: [DNS-1123 subdomain/]name."""
    if not isinstance(key, str):
        raise ValueError(f"{field}: key {quoted(key)} must be a string")
    prefix, _, name = key.rpartition("/")
    if "/" in key and (not prefix or len(prefix) > PREFIX_MAX or not _PREFIX.fullmatch(prefix)):
        raise ValueError(f"{field}: key {quoted(key)} has an invalid prefix (a DNS-1123 subdomain before the '/')")
    if len(name) > NAME_MAX or not _QUALIFIED.fullmatch(name):
        raise ValueError(f"{field}: key {quoted(key)} is not a valid name (at most {NAME_MAX} letters, digits, "
                         "'-', '_' or '.', starting and ending with a letter or digit)")


def check_metadata_map(value: object, field: str, labels: bool) -> None:
    """Labels (labels=True) or annotations: string keys of label-key syntax to strings, label
    values of at most 63 characters in label-value syntax; ValueError names the field."""
    if not isinstance(value, dict):
        raise ValueError(f"{field}: must be a map of strings to strings, not {type(value).__name__}")
    for key, val in value.items():
        _qualified_key(key, field)
        if not isinstance(val, str):
            raise ValueError(f"{field}.{key}: must be a string, not {type(val).__name__}")
        if labels and val and (len(val) > NAME_MAX or not _QUALIFIED.fullmatch(val)):
            raise ValueError(f"{field}.{key}: {quoted(val)} is not a valid label value (at most {NAME_MAX} "
                             "letters, digits, '-', '_' or '.', starting and ending with a letter or digit)")


def _check_overrides(overrides: object) -> None:
    if not isinstance(overrides, list):
        raise ValueError(f"spec.volumeRestoreOverrides: must be a list, not {type(overrides).__name__}")
    volumes: dict[object, int] = {}
    claims: dict[object, int] = {}
    for i, override in enumerate(overrides):
        field = f"spec.volumeRestoreOverrides[{i}]"
        if not isinstance(override, dict) or not isinstance(override.get("volumeName"), str) \
                or not override["volumeName"]:
            raise ValueError(f"{field}.volumeName is required")
        if override["volumeName"] in volumes:
            raise ValueError(f"{field}.volumeName: {quoted(override['volumeName'])} is overridden twice "
                             f"(also spec.volumeRestoreOverrides[{volumes[override['volumeName']]}])")
        volumes[override["volumeName"]] = i
        name = override.get("restoreName")
        if name is not None and not isinstance(name, str):
            raise ValueError(f"{field}.restoreName: must be a string")
        if name in claims:
            raise ValueError(f"{field}.restoreName: {quoted(name)} is also spec.volumeRestoreOverrides"
                             f"[{claims[name]}].restoreName: two volumes cannot be restored into one claim")
        if name:
            claims[name] = i
        for key, labels in (("labels", True), ("annotations", False)):
            if override.get(key) is not None:
                check_metadata_map(override[key], f"{field}.{key}", labels)


def _vm_reference(ref: object, field: str) -> None:
    if not isinstance(ref, dict):
        raise ValueError(f"{field} is required (kind VirtualMachine, apiGroup kubevirt.io, and a name)")
    if ref.get("kind") != "VirtualMachine":
        raise ValueError(f"{field}.kind: {quoted(ref.get('kind'))} is not supported (VirtualMachine only)")
    if ref.get("apiGroup") not in (None, "kubevirt.io"):
        raise ValueError(f"{field}.apiGroup: {quoted(ref.get('apiGroup'))} is not supported (kubevirt.io only)")
    if not isinstance(ref.get("name"), str) or not ref["name"]:
        raise ValueError(f"{field}.name is required")


def check_snapshot(obj: dict) -> None:
    spec = obj.get("spec") or {}
    _vm_reference(spec.get("source"), "spec.source")
    if spec.get("deletionPolicy") not in (None, "Delete", "Retain"):
        raise ValueError(f"spec.deletionPolicy: {quoted(spec['deletionPolicy'])} is not one of Delete, Retain")
    if spec.get("failureDeadline") is not None:
        parse_duration(spec["failureDeadline"], "spec.failureDeadline")
    if spec.get("snapshotMode") not in (None, "Direct"):
        raise ValueError(f"spec.snapshotMode: {quoted(spec['snapshotMode'])} is not supported (Direct only)")


def check_restore(obj: dict) -> None:
    spec = obj.get("spec") or {}
    _vm_reference(spec.get("target"), "spec.target")
    if not isinstance(spec.get("virtualMachineSnapshotName"), str) or not spec["virtualMachineSnapshotName"]:
        raise ValueError("spec.virtualMachineSnapshotName is required")
    for field, allowed in (("targetReadinessPolicy", READINESS_POLICIES),
                           ("volumeRestorePolicy", VOLUME_RESTORE_POLICIES)):
        if spec.get(field) not in (None, *allowed):
            raise ValueError(f"spec.{field}: {quoted(spec[field])} is not one of {', '.join(allowed)}")
    if spec.get("volumeOwnershipPolicy") not in (None, "Vm", "None"):
        raise ValueError(f"spec.volumeOwnershipPolicy: {quoted(spec['volumeOwnershipPolicy'])} is not one of Vm, None")
    from controlplane.vm_restore_patches import check_patches  # it checks labels with this module's rules

    check_patches(spec.get("patches"))
    _check_overrides(spec.get("volumeRestoreOverrides") or [])


def check_content(obj: dict) -> None:
    spec = obj.get("spec") or {}
    if not isinstance((spec.get("source") or {}).get("virtualMachine"), dict):
        raise ValueError("spec.source.virtualMachine is required")
