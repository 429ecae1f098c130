"""KubeVirt's `VirtualMachineRestore.spec.patches`: JSON patches (RFC 6902) that give a VM a
restore creates its own identity (a MAC address, a firmware UUID, labels) before it is made.

KubeVirt's admission takes each patch whose path lies under /spec/, /metadata/labels/ or
/metadata/annotations/ (so never the VM's name, namespace, kind or status), and its restore
controller applies them to the restored VM only when the restore creates it. Here each patch is
parsed as one operation object (KubeVirt's admission splits the text on ',' and ':', so a patch
whose value holds either — a MAC address — is refused there; here it is taken), the same rule
holds for a move's or copy's `from`, and the count and size are bounded.

A patch may not touch what the restore owns: which claim each volume is (the claims this
restore made, one per volume), the dataVolumeTemplates, and KubeVirt's restore.kubevirt.io/
annotations (the restore's mark on its VM): a patched VM that differs there is refused.
"""

from __future__ import annotations

import copy
import json
import re

import jsonpatch

from controlplane.admission import MAX_OBJECT_BYTES  # copies could double the VM with each patch
from controlplane.user_text import one_line, quoted
from controlplane.vm_snapshot_spec import check_metadata_map

OPS = ("add", "remove", "replace", "move", "copy", "test")
ALLOWED_PREFIXES = ("/spec/", "/metadata/labels/", "/metadata/annotations/")  # KubeVirt's admission rule
MAX_PATCHES = 64
MAX_PATCH_CHARS = 16384
RESTORE_ANNOTATIONS = "restore.kubevirt.io/"  # KubeVirt's restore controller's own


def _pointer(value: object, field: str) -> None:
    if not isinstance(value, str):
        raise ValueError(f"{field} is required (a JSON pointer such as /spec/template/spec/domain)")
    if not value.startswith(ALLOWED_PREFIXES):
        raise ValueError(f"{field}: {quoted(value)} may not be patched (only paths under "
                         f"{', '.join(ALLOWED_PREFIXES)})")
    try:
        jsonpatch.JsonPointer(value)
    except jsonpatch.JsonPointerException as exc:
        raise ValueError(f"{field}: {quoted(value)} is not a JSON pointer: {exc}") from None


def _no_constants(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def parse_patch(text: object, field: str) -> dict:
    """One patch of spec.patches: a string holding one JSON patch operation object, its path
    (and from) under what a restore may patch; ValueError names the field."""
    if not isinstance(text, str):
        raise ValueError(f"{field}: must be a string holding one JSON patch operation, not {type(text).__name__}")
    if len(text) > MAX_PATCH_CHARS:
        raise ValueError(f"{field} is {len(text)} characters long; at most {MAX_PATCH_CHARS} are allowed")
    try:
        op = json.loads(text, parse_constant=_no_constants)
    except (ValueError, RecursionError) as exc:
        raise ValueError(one_line(f"{field}: not valid JSON: {exc}")) from None
    if not isinstance(op, dict):
        raise ValueError(f"{field}: must be one JSON patch operation object "
                         f"({{\"op\": ..., \"path\": ...}}), not a {type(op).__name__}")
    if op.get("op") not in OPS:
        raise ValueError(f"{field}.op: {quoted(op.get('op'))} is not one of {', '.join(OPS)}")
    _pointer(op.get("path"), f"{field}.path")
    if op["op"] in ("add", "replace", "test") and "value" not in op:
        raise ValueError(f"{field}.value is required for op {op['op']}")
    if op["op"] in ("move", "copy"):
        _pointer(op.get("from"), f"{field}.from")
    try:
        jsonpatch.JsonPatch([op])  # the library takes it as it is
    except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
        raise ValueError(one_line(f"{field}: {exc}")) from None
    return op


def check_patches(patches: object) -> list[dict]:
    """spec.patches as admission checks it: a list of at most MAX_PATCHES strings, each one
    operation; the operations in order. ValueError names spec.patches[i]."""
    if patches is None:
        return []
    if not isinstance(patches, list):
        raise ValueError(f"spec.patches: must be a list of strings, not {type(patches).__name__}")
    if len(patches) > MAX_PATCHES:
        raise ValueError(f"spec.patches: {len(patches)} patches; at most {MAX_PATCHES} are allowed")
    return [parse_patch(text, f"spec.patches[{i}]") for i, text in enumerate(patches)]


def _claims(vm: dict) -> dict[object, object]:
    """Each claim-backed volume's source by name, and the dataVolumeTemplates: what a restore owns."""
    spec = vm.get("spec") if isinstance(vm.get("spec"), dict) else {}
    template = spec.get("template") if isinstance(spec.get("template"), dict) else {}
    tspec = template.get("spec") if isinstance(template.get("spec"), dict) else {}
    volumes = tspec.get("volumes") if isinstance(tspec.get("volumes"), list) else []
    owned: dict[object, object] = {("dataVolumeTemplates",): spec.get("dataVolumeTemplates")}
    for i, volume in enumerate(volumes):
        if isinstance(volume, dict) and ("persistentVolumeClaim" in volume or "dataVolume" in volume):
            key = volume.get("name") if isinstance(volume.get("name"), str) else ("unnamed", i)
            owned[key] = (volume.get("persistentVolumeClaim"), volume.get("dataVolume"))
    return owned


def _describe(key: object) -> str:
    if key == ("dataVolumeTemplates",):
        return "spec.dataVolumeTemplates"
    return f"the claim of volume {quoted(key)}" if isinstance(key, str) else "the claim of a volume"


def apply_patches(vm: dict, patches: object) -> dict:
    """The VM a restore creates, with spec.patches applied in order (a copy). ValueError names
    the patch that cannot be applied (a path missing, a test that fails) or what the patched VM
    may not change: a volume's claim, the dataVolumeTemplates, the restore's annotations, or
    labels and annotations the API server would not take."""
    ops = check_patches(patches)
    patched = copy.deepcopy(vm)
    for i, op in enumerate(ops):
        try:
            patched = jsonpatch.JsonPatch([op]).apply(patched, in_place=True)
        except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException, TypeError, KeyError,
                IndexError, ValueError) as exc:
            why = re.sub(r" (in|of) [{\[].*", "", str(exc)) or type(exc).__name__  # not the whole VM echoed
            raise ValueError(one_line(f"spec.patches[{i}] ({op['op']} {op['path']}) cannot be applied: "
                                      f"{why}")) from None
        size = len(json.dumps(patched))
        if size > MAX_OBJECT_BYTES:
            raise ValueError(f"spec.patches[{i}] makes the VirtualMachine {size} bytes long; at most "
                             f"{MAX_OBJECT_BYTES} are allowed")
    before, after = _claims(vm), _claims(patched)
    for key in sorted({*before, *after}, key=str):
        if before.get(key) != after.get(key):
            raise ValueError(f"spec.patches may not change {_describe(key)}: a restored VM's disks are the "
                             "claims this restore made, one per volume")
    meta = patched["metadata"]
    try:
        for key, labels in (("labels", True), ("annotations", False)):
            check_metadata_map(meta.get(key) or {}, f"metadata.{key}", labels)
    except ValueError as exc:
        raise ValueError(f"spec.patches make it invalid: {exc}") from None
    old = {k: v for k, v in (vm["metadata"].get("annotations") or {}).items() if k.startswith(RESTORE_ANNOTATIONS)}
    new = {k: v for k, v in (meta.get("annotations") or {}).items() if k.startswith(RESTORE_ANNOTATIONS)}
    if old != new:
        raise ValueError(f"spec.patches may not change the {RESTORE_ANNOTATIONS} annotations (the restore's own)")
    return patched
