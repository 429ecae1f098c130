"""The instancetype and preference a VirtualMachine runs with, kept as KubeVirt keeps them:
the first time the VM is reconciled, a copy of each object goes into a ControllerRevision
(apps/v1) the VM owns, and the VM's status.instancetypeRef / status.preferenceRef name it.
From then on the VM runs from that copy, so editing (or deleting) the instancetype changes no
VM already using it; changing the VM's spec.instancetype (name or kind) takes the object
afresh. A VM naming an object that does not exist is refused with the field and the name.
"""

from __future__ import annotations

import copy
import hashlib

from controlplane.instancetypes import API_VERSION, Matcher, expand, matchers_of
from controlplane.store import Obj, ObjectStore
from controlplane.vm_ignored import REASON
from controlplane.vm_spec import VirtualMachine, parse_virtual_machine
from controlplane.vm_spec_fields import SUBDOMAIN, SpecError

REVISION_KIND = "ControllerRevision"
STATUS_FIELDS = {"spec.instancetype": "instancetypeRef", "spec.preference": "preferenceRef"}
KEPT_METADATA = ("name", "namespace", "uid", "generation", "resourceVersion", "labels", "annotations")


def revision_name(vm: Obj, obj: Obj) -> str:
    """KubeVirt's name for the copy: VM, object name, uid, generation (hashed when too long)."""
    meta = obj["metadata"]
    name = f"{vm['metadata']['name']}-{meta['name']}-{meta.get('uid', '')}-{meta.get('generation', 1)}"
    if len(name) <= 253:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:20]
    return f"{vm['metadata']['name']}-{digest}-{meta.get('generation', 1)}"


def recorded_copy(store: ObjectStore, vm: Obj, matcher: Matcher) -> Obj | None:
    """The copy of the object `matcher` names that the VM runs with (None: none recorded yet,
    or the VM now names another)."""
    ref = _object(_object(vm.get("status")).get(STATUS_FIELDS[matcher.field]))
    revision = _object(ref.get("controllerRevisionRef")).get("name")
    if not isinstance(revision, str) or not SUBDOMAIN.fullmatch(revision) or len(revision) > 253 \
            or (ref.get("kind"), ref.get("name")) != (matcher.kind, matcher.name):
        return None
    stored = store.get(REVISION_KIND, revision, vm["metadata"].get("namespace", "default"))
    data = _object(_object(stored).get("data"))
    return data if data.get("kind") == matcher.kind else None


def _object(value: object) -> dict:
    """A status or revision field as an object (anything else, as written by someone else: none)."""
    return value if isinstance(value, dict) else {}


def _record(store: ObjectStore, vm: Obj, matcher: Matcher, obj: Obj) -> dict:
    """A ControllerRevision holding `obj`, owned by the VM; the status ref naming it."""
    meta, ns = vm["metadata"], vm["metadata"].get("namespace", "default")
    data = {"apiVersion": obj.get("apiVersion", API_VERSION), "kind": obj["kind"],
            "metadata": {k: v for k, v in obj["metadata"].items() if k in KEPT_METADATA},
            "spec": copy.deepcopy(obj.get("spec") or {})}
    name = revision_name(vm, obj)
    if store.get(REVISION_KIND, name, ns) is None:
        store.apply({"apiVersion": "apps/v1", "kind": REVISION_KIND,
                     "metadata": {"name": name, "namespace": ns,
                                  "labels": {"instancetype.kubevirt.io/object-kind": obj["kind"],
                                             "instancetype.kubevirt.io/object-name": obj["metadata"]["name"],
                                             "instancetype.kubevirt.io/object-uid": obj["metadata"].get("uid", ""),
                                             "instancetype.kubevirt.io/object-generation":
                                                 str(obj["metadata"].get("generation", 1))},
                                  "ownerReferences": [{"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
                                                       "name": meta["name"], "uid": meta.get("uid", ""),
                                                       "controller": True, "blockOwnerDeletion": True}]},
                     "data": data, "revision": 1})
    return {"name": matcher.name, "kind": matcher.kind, "controllerRevisionRef": {"name": name}}


def resolved(store: ObjectStore, vm: Obj) -> tuple[Obj, list[str]]:
    """The VM as it runs: its instancetype and preference (the recorded copies, else the
    objects, recorded now) expanded into spec.template.spec; the warnings of what was not
    applied. SpecError names spec.instancetype.name (or preference) when the object is missing,
    or the VM field that conflicts with it."""
    matchers = [m for m in matchers_of(vm) if m is not None]
    if not matchers:
        return vm, []
    ns = vm["metadata"].get("namespace", "default")
    objects: dict[str, Obj] = {}
    refs: dict[str, dict] = {}
    for matcher in matchers:
        obj = recorded_copy(store, vm, matcher)
        if obj is None:
            obj = store.get(matcher.kind, matcher.name, matcher.namespace(ns))
            if obj is None:
                where = f"namespace {ns}" if matcher.namespace(ns) else "the cluster"
                raise SpecError(f"{matcher.field}.name", f"{matcher.kind} {matcher.name!r} not found in {where}")
            refs[STATUS_FIELDS[matcher.field]] = _record(store, vm, matcher, obj)
        objects[matcher.field] = obj
    expanded, warnings = expand(vm, objects.get("spec.instancetype"), objects.get("spec.preference"))
    if refs:  # recorded now: said once, not on every reconcile
        store.merge_status("VirtualMachine", vm["metadata"]["name"], ns, **refs)
        expanded["status"] = {**(vm.get("status") or {}), **refs}
        for warning in warnings:
            store.add_event(vm, "Warning", REASON, warning)
    return expanded, warnings


def vm_as_run(store: ObjectStore, vm: Obj) -> tuple[Obj, VirtualMachine]:
    """The VM with its instancetype and preference applied, and parsed: what the VM's
    reconcile builds its VMI from (both modes). SpecError names the field."""
    vm, _warnings = resolved(store, vm)
    return vm, parse_virtual_machine(vm)
