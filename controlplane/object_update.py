"""What `pvlun apply` does to an object that exists: kubectl apply's merge, then the update
rules the API server (and CDI's and KubeVirt's webhooks) enforce.

- The merge is three-way, as kubectl's: a field the manifest sets is set; a field the last
  applied manifest set and this one leaves out is removed; a field neither ever set (a
  claim's volumeName and storageClassName, written by the provisioner; finalizers; status)
  is kept. The last applied manifest is kept where kubectl keeps it, in the
  `kubectl.kubernetes.io/last-applied-configuration` annotation. Lists are replaced as a
  whole, except metadata.finalizers, which a manifest can only add to.
- Then the update must be one the API server takes: a claim's spec changes only in
  resources.requests.storage (growing a bound claim) and volumeAttributesClassName; a
  DataVolume's spec never changes (CDI refuses it: an edited source would import over the
  data); a snapshot's source, a StorageClass's provisioner and parameters, a
  VolumeAttributesClass, a migration's spec and an immutable Secret's or ConfigMap's data
  are fixed. A VirtualMachine's spec may change; a VirtualMachineInstance's never does
  (KubeVirt's webhook: what runs is what was created). A refusal names the field, in one line.
"""

from __future__ import annotations

import copy
import json
from typing import Any, Callable

from controlplane.quantity import parse_quantity

Obj = dict[str, Any]
LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"
SET_LISTS = {("metadata", "finalizers")}  # lists merged as sets (a manifest only adds)


class UpdateRefused(ValueError):
    """The message names the field: `spec.storageClassName: field is immutable …`."""


def applied(old: Obj | None, new: Obj) -> Obj:
    """What to store for `new` (a checked manifest object): itself on creation, else merged
    into `old` and checked against the update rules (UpdateRefused). The manifest as given
    becomes the last applied configuration."""
    config = copy.deepcopy(new)
    annotations = config.get("metadata", {}).get("annotations") or {}
    annotations.pop(LAST_APPLIED, None)  # never the manifest's own say
    if old is None:
        merged = copy.deepcopy(config)
    else:
        merged = _merge(_last_applied(old), old, config, ())
        check_update(old, merged)
    merged["metadata"].setdefault("annotations", {})[LAST_APPLIED] = json.dumps(
        config, sort_keys=True, separators=(",", ":"))
    return merged


def _last_applied(obj: Obj) -> dict:
    text = ((obj.get("metadata") or {}).get("annotations") or {}).get(LAST_APPLIED)
    try:
        last = json.loads(text) if isinstance(text, str) else {}
    except ValueError:
        return {}
    return last if isinstance(last, dict) else {}


def _merge(last: Any, current: Any, new: Any, path: tuple[str, ...]) -> Any:
    if path in SET_LISTS and isinstance(current, list) and isinstance(new, list):
        dropped = [v for v in last or [] if v not in new] if isinstance(last, list) else []
        return [v for v in current if v not in dropped] + [v for v in new if v not in current]
    if not isinstance(current, dict) or not isinstance(new, dict):
        return copy.deepcopy(new)
    last = last if isinstance(last, dict) else {}
    out = {k: v for k, v in current.items() if k not in last or k in new}
    for key, value in new.items():
        out[key] = _merge(last.get(key), current[key], value, path + (key,)) if key in current else copy.deepcopy(value)
    return out


def first_difference(old: Any, new: Any, path: str) -> str | None:
    """The path of the first field that differs (the deepest object both have), or None."""
    if old == new:
        return None
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(old) + [k for k in new if k not in old]:
            where = first_difference(old.get(key), new.get(key), f"{path}.{key}" if path else key)
            if where:
                return where
    return path


def _storage(spec: dict) -> str | None:
    return ((spec.get("resources") or {}).get("requests") or {}).get("storage")


def _at(obj: Obj, path: str) -> Any:
    for part in path.split("."):
        obj = obj.get(part) if isinstance(obj, dict) else None
    return obj


def _fixed(old: Obj, new: Obj, fields: tuple[str, ...], why: str) -> None:
    """UpdateRefused naming the first of `fields` (dotted paths) that changed."""
    for field in fields:
        where = first_difference(_at(old, field), _at(new, field), field)
        if where:
            raise UpdateRefused(f"{where}: field is immutable ({why})")


def _claim(old: Obj, new: Obj) -> None:
    before, after = copy.deepcopy(old.get("spec") or {}), copy.deepcopy(new.get("spec") or {})
    bound = (old.get("status") or {}).get("phase") == "Bound"
    grown = _storage(after)
    if _storage(before) != grown and grown is not None and _storage(before) is not None:
        if parse_quantity(grown) < parse_quantity(_storage(before)):
            raise UpdateRefused("spec.resources.requests.storage: field can not be less than previous value "
                                f"({_storage(before)}): a volume does not shrink")
        if bound:  # growing a bound claim is what the spec may change for
            after["resources"]["requests"]["storage"] = _storage(before)
    for field in ("volumeName", "storageClassName"):  # set once (the provisioner binds and defaults them)
        if not before.get(field) and after.get(field):
            before[field] = after[field]
    before.pop("volumeAttributesClassName", None)
    after.pop("volumeAttributesClassName", None)
    where = first_difference(before, after, "spec")
    if where:
        raise UpdateRefused(f"{where}: field is immutable (a claim's spec may change only in "
                            "resources.requests.storage, to grow a bound claim, and volumeAttributesClassName)")


def _data_volume(old: Obj, new: Obj) -> None:
    where = first_difference(old.get("spec"), new.get("spec"), "spec")
    if where:
        raise UpdateRefused(f"{where}: a DataVolume's spec cannot be changed once it exists (as CDI refuses it; "
                            "its volume holds the data of the first): delete it and create it again")


def _vmi(old: Obj, new: Obj) -> None:
    where = first_difference(old.get("spec"), new.get("spec"), "spec")
    if where:
        raise UpdateRefused(f"{where}: update of VMI object is restricted (as KubeVirt refuses it: a "
                            "VirtualMachineInstance runs the spec it was created with): delete it and create it "
                            "again, or run it from a VirtualMachine, whose spec may change")


def _data(old: Obj, new: Obj) -> None:
    if old.get("immutable") is True:
        _fixed(old, new, ("data", "binaryData", "stringData", "immutable"), "the object is marked immutable")


RULES: dict[str, Callable[[Obj, Obj], None]] = {
    "PersistentVolumeClaim": _claim,
    "DataVolume": _data_volume,
    "VolumeSnapshot": lambda old, new: _fixed(old, new, ("spec.source",), "a snapshot stays of what it was taken of"),
    "StorageClass": lambda old, new: _fixed(old, new, ("provisioner", "parameters", "reclaimPolicy", "volumeBindingMode"),
                                            "a class's volumes were made with it"),
    "VolumeAttributesClass": lambda old, new: _fixed(old, new, ("driverName", "parameters"),
                                                     "make a new class and point the claims at it"),
    "VirtualMachineInstance": _vmi,
    "VirtualMachineInstanceMigration": lambda old, new: _fixed(old, new, ("spec",), "a migration is not redirected"),
    "Secret": _data,
    "ConfigMap": _data,
    # KubeVirt's webhook: "spec is immutable after creation"
    "VirtualMachineSnapshot": lambda old, new: _fixed(old, new, ("spec",), "a VM snapshot is taken once, as asked"),
    "VirtualMachineSnapshotContent": lambda old, new: _fixed(old, new, ("spec",), "a snapshot's content is what it took"),
    "VirtualMachineRestore": lambda old, new: _fixed(old, new, ("spec",), "a restore is done once, as asked"),
    "VirtualMachineExport": lambda old, new: _fixed(old, new, ("spec",), "an export serves what it was made for"),
    # KubeVirt's VMPool webhook: "selector is immutable after creation"
    "VirtualMachinePool": lambda old, new: _fixed(old, new, ("spec.selector",), "selector is immutable after creation"),
}


def check_update(old: Obj, new: Obj) -> None:
    """UpdateRefused, naming the field, when `new` changes what may not change in `old`."""
    RULES.get(old.get("kind", ""), lambda o, n: None)(old, new)
