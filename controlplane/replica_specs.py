"""KubeVirt's replicating kinds, as objects: a VirtualMachinePool (pool.kubevirt.io) and a
VirtualMachineInstanceReplicaSet (kubevirt.io/v1) — their admission (KubeVirt's webhooks:
the selector must select the template's labels, the template is a valid VM or VMI) and what
their controllers make of the template, pure:

- a pool's VM `i` is named `<pool>-<i>`; each of its dataVolumeTemplates is named
  `<template>-<i>` and the volumes naming it follow, so every VM gets DataVolumes of its own;
  the VM and its VMI template carry the label `kubevirt.io/vm-pool-revision-name`;
- a replica set's VMIs are named as the API server names a `generateName` of the template's
  name, else its generateName, else the replica set's name: that prefix and 5 random characters.
"""

from __future__ import annotations

import copy
import secrets
from typing import Callable

from controlplane.label_selectors import matches, requirements
from controlplane.store import Obj

POOL_GROUP = "pool.kubevirt.io"
POOL_API_VERSION = f"{POOL_GROUP}/v1beta1"
POOL_OLDER_VERSIONS = (f"{POOL_GROUP}/v1alpha1",)
POOL_KIND, REPLICA_SET_KIND = "VirtualMachinePool", "VirtualMachineInstanceReplicaSet"
REVISION_LABEL = "kubevirt.io/vm-pool-revision-name"
BURST_REPLICAS = 250  # at most this many made or deleted per pass (KubeVirt's --burst-replicas default)
SORT_POLICIES = ("AscendingOrder", "DescendingOrder", "Newest", "Oldest", "Random")
# the API server's generateName alphabet (no vowels, no look-alikes) and suffix length
_NAME_ALPHABET, _NAME_SUFFIX = "bcdfghjklmnpqrstvwxz2456789", 5


def replicas_of(spec: dict) -> int:
    """spec.replicas, 1 when not given (KubeVirt's default)."""
    replicas = spec.get("replicas")
    return 1 if replicas is None else replicas


MAX_REPLICAS = 2**31 - 1  # spec.replicas is an int32 in KubeVirt's API


def _check_replicas(spec: dict) -> None:
    replicas = spec.get("replicas")
    if replicas is not None and (not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0):
        raise ValueError(f"spec.replicas: must be an integer of 0 or more, not {replicas!r}")
    if replicas is not None and replicas > MAX_REPLICAS:
        raise ValueError(f"spec.replicas: {replicas} is more than an int32 holds (at most {MAX_REPLICAS})")


def _check_selector(spec: dict, template_labels: object, template_field: str) -> None:
    """KubeVirt's webhook rule: the selector is required and selects the template's labels."""
    if spec.get("selector") is None:
        raise ValueError("spec.selector is required")
    requirements(spec["selector"])  # well-formed first (operators, values)
    if not matches(spec["selector"], template_labels if isinstance(template_labels, dict) else {}):
        raise ValueError(f"spec.selector: selector does not match labels ({template_field}.metadata.labels)")


def owner_reference(owner: Obj) -> dict:
    """The controller reference KubeVirt's controllers put on what they make."""
    meta = owner["metadata"]
    return {"apiVersion": owner["apiVersion"], "kind": owner["kind"], "name": meta["name"], "uid": meta["uid"],
            "controller": True, "blockOwnerDeletion": True}


def controlled_by(obj: Obj, owner: Obj) -> bool:
    """Whether `owner` (by uid) is the object's controller."""
    return any(isinstance(r, dict) and r.get("controller") and r.get("uid") == owner["metadata"].get("uid")
               for r in obj["metadata"].get("ownerReferences") or [])


# ------------------------------------------------------------------ VirtualMachinePool


def pool_vm_name(pool_name: str, index: int) -> str:
    return f"{pool_name}-{index}"


def vm_index(name: str) -> int | None:
    """The index KubeVirt reads back from a pool VM's name (its last '-' part), None if none."""
    tail = name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else None


def indexed_vm_spec(pool_spec: dict, index: int) -> dict:
    """The VM spec of the pool's VM `index`: its dataVolumeTemplates renamed `<name>-<index>`,
    and the volumes (dataVolume, persistentVolumeClaim) naming them renamed alike."""
    spec = copy.deepcopy((pool_spec.get("virtualMachineTemplate") or {}).get("spec") or {})
    renamed = {}
    for template in spec.get("dataVolumeTemplates") or []:
        meta = template.setdefault("metadata", {})
        renamed[meta.get("name")] = meta["name"] = f"{meta.get('name')}-{index}"
    for volume in ((spec.get("template") or {}).get("spec") or {}).get("volumes") or []:
        if isinstance(volume.get("dataVolume"), dict) and volume["dataVolume"].get("name") in renamed:
            volume["dataVolume"]["name"] = renamed[volume["dataVolume"]["name"]]
        claim = volume.get("persistentVolumeClaim")
        if isinstance(claim, dict) and claim.get("claimName") in renamed:
            claim["claimName"] = renamed[claim["claimName"]]
    return spec


def pool_vm(pool: Obj, index: int, revision: str) -> Obj:
    """The VirtualMachine the pool makes as its VM `index` (KubeVirt's scale-out)."""
    meta, pool_spec = pool["metadata"], pool.get("spec") or {}
    template_meta = (pool_spec.get("virtualMachineTemplate") or {}).get("metadata") or {}
    spec = indexed_vm_spec(pool_spec, index)
    vmi_meta = (spec.setdefault("template", {})).setdefault("metadata", {}) or {}
    spec["template"]["metadata"] = vmi_meta
    vmi_meta.pop("creationTimestamp", None)
    vmi_meta["labels"] = {**(vmi_meta.get("labels") or {}), REVISION_LABEL: revision}
    vm_meta = {"name": pool_vm_name(meta["name"], index), "namespace": meta.get("namespace", "default"),
               "labels": {**(template_meta.get("labels") or {}), REVISION_LABEL: revision},
               "ownerReferences": [owner_reference(pool)]}
    if template_meta.get("annotations"):
        vm_meta["annotations"] = dict(template_meta["annotations"])
    return {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "metadata": vm_meta, "spec": spec}


def _check_unsupported(spec: dict) -> None:
    """What pvlun's pool controller deliberately leaves out, refused naming the field."""
    unsupported = [f"spec.{field}" for field in ("autohealing", "maxUnavailable") if spec.get(field) is not None]
    unsupported += [f"spec.nameGeneration.{k}" for k, v in (spec.get("nameGeneration") or {}).items() if v]
    for strategy in ("scaleInStrategy", "updateStrategy"):
        for mode, body in (spec.get(strategy) or {}).items():
            body = body if isinstance(body, dict) else {}
            if body.get("statePreservation") not in (None, "Disabled"):
                unsupported.append(f"spec.{strategy}.{mode}.statePreservation")
            if (body.get("selectionPolicy") or {}).get("selectors") is not None:
                unsupported.append(f"spec.{strategy}.{mode}.selectionPolicy.selectors")
    if unsupported:
        raise ValueError(f"{unsupported[0]}: not supported by pvlun's pool controller (remove it)")


def check_pool(obj: Obj, check_vm: Callable[[Obj], None]) -> None:
    """KubeVirt's VMPool webhook: a VM template that is a valid VM (checked as the pool's first
    VM, with its DataVolumes' names), a selector selecting its labels, replicas of 0 or more."""
    spec = obj.get("spec") or {}
    _check_replicas(spec)
    template = spec.get("virtualMachineTemplate")
    if not isinstance(template, dict) or not isinstance(template.get("spec"), dict):
        raise ValueError("spec.virtualMachineTemplate.spec is required (missing virtual machine template)")
    _check_selector(spec, (template.get("metadata") or {}).get("labels"), "spec.virtualMachineTemplate")
    policy = ((((spec.get("scaleInStrategy") or {}).get("proactive") or {}).get("selectionPolicy") or {})
              .get("sortPolicy"))
    if policy is not None and policy not in SORT_POLICIES:
        raise ValueError(f"spec.scaleInStrategy.proactive.selectionPolicy.sortPolicy: {policy!r} is not one of "
                         f"{', '.join(SORT_POLICIES)}")
    _check_unsupported(spec)
    first = pool_vm({**obj, "metadata": {**obj["metadata"], "uid": ""}}, 0, "admission")
    try:
        check_vm(first)
    except ValueError as exc:
        raise ValueError(f"spec.virtualMachineTemplate.{exc}") from None


# ------------------------------------------------------------------ VirtualMachineInstanceReplicaSet


def vmi_base_name(rs: Obj) -> str:
    """KubeVirt's prefix for a replica set's VMIs: the template's name, else its generateName,
    else the replica set's name."""
    meta = ((rs.get("spec") or {}).get("template") or {}).get("metadata") or {}
    return meta.get("name") or meta.get("generateName") or rs["metadata"]["name"]


def generated_name(base: str) -> str:
    """A name as the API server makes one from a generateName (5 random characters appended)."""
    return base + "".join(secrets.choice(_NAME_ALPHABET) for _ in range(_NAME_SUFFIX))


def replica_set_vmi(rs: Obj, name: str) -> Obj:
    """A VirtualMachineInstance of the replica set's template, named `name`, owned by it."""
    template = (rs.get("spec") or {}).get("template") or {}
    template_meta = template.get("metadata") or {}
    meta = {"name": name, "namespace": rs["metadata"].get("namespace", "default"),
            "labels": dict(template_meta.get("labels") or {}), "ownerReferences": [owner_reference(rs)]}
    if template_meta.get("annotations"):
        meta["annotations"] = dict(template_meta["annotations"])
    return {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance", "metadata": meta,
            "spec": copy.deepcopy(template.get("spec") or {})}


def check_replica_set(obj: Obj, check_vmi: Callable[[Obj], None]) -> None:
    """KubeVirt's VMIRS webhook: a template that is a valid VMI, a selector selecting its labels."""
    spec = obj.get("spec") or {}
    _check_replicas(spec)
    template = spec.get("template")
    if not isinstance(template, dict) or not isinstance(template.get("spec"), dict):
        raise ValueError("spec.template.spec is required (missing virtual machine template)")
    labels = (template.get("metadata") or {}).get("labels")
    if not labels:  # KubeVirt's controller ignores a replica set whose template has no labels
        raise ValueError("spec.template.metadata.labels is required (the selector selects the VMIs by them)")
    _check_selector(spec, labels, "spec.template")
    try:
        check_vmi(replica_set_vmi({**obj, "metadata": {**obj["metadata"], "uid": ""}},
                                  vmi_base_name(obj) + "x" * _NAME_SUFFIX))
    except ValueError as exc:
        raise ValueError(f"spec.template.{exc}") from None
