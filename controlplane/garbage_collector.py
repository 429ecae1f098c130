"""Kubernetes' garbage collector for the embedded store: dependents follow their owners.

An object whose `metadata.ownerReferences` all name owners that are gone is deleted (with
background propagation: the owner went first, its dependents follow, and theirs in a later
pass — a VirtualMachine, then its dataVolumeTemplates' DataVolumes, then their claims). An
owner is gone when no object of that kind and name exists, or one exists with another uid
(deleted and made again: not the owner). An object that keeps at least one owner only loses
the references to the gone ones. An owner still being deleted (it has finalizers) still
exists. References to kinds pvlun does not store are left alone, never judged.

Each object is judged when it or one of its owners changes (the controllers' work queue:
an owner's deletion enqueues the objects that name it), from fresh reads of its owners.
"""

from __future__ import annotations

import logging
from typing import Any

from controlplane.admission import KINDS as APPLIED_KINDS
from controlplane.context import Context
from controlplane.store import CLUSTER_SCOPED, Obj, namespace_of

log = logging.getLogger("pvlun.gc")
# every kind the embedded store holds: what `apply` takes, and what the controllers make
KINDS = tuple(APPLIED_KINDS) + tuple(k for k in ("PersistentVolume", "VirtualMachineInstance", "VolumeAttachment",
                                                  "VolumeSnapshotContent", "ControllerRevision")
                                      if k not in APPLIED_KINDS)


def _refs(obj: Obj) -> list[dict[str, Any]]:
    """The object's well-formed references to kinds pvlun stores."""
    refs = obj["metadata"].get("ownerReferences")
    if not isinstance(refs, list):
        return []
    return [r for r in refs if isinstance(r, dict) and r.get("kind") in KINDS
            and isinstance(r.get("name"), str) and isinstance(r.get("uid"), str)]


def _owner_key(ref: dict[str, Any], obj: Obj) -> tuple[str, str, str]:
    namespace = "" if ref["kind"] in CLUSTER_SCOPED else namespace_of(obj)
    return ref["kind"], namespace, ref["name"]


def _exists(ctx: Context, ref: dict[str, Any], obj: Obj) -> bool:
    kind, namespace, name = _owner_key(ref, obj)
    owner = ctx.store.get(kind, name, namespace)
    return owner is not None and owner["metadata"].get("uid") == ref["uid"]


def collect_if_orphaned(ctx: Context, obj: Obj) -> None:
    """Delete `obj` when every owner it names is gone; drop the references to the gone ones
    when some remain. A reconciler in the controllers' table, for every kind."""
    if obj["metadata"].get("deletionTimestamp"):
        return
    gone = [r for r in _refs(obj) if not _exists(ctx, r, obj)]
    if not gone:
        return
    meta, kind = obj["metadata"], obj["kind"]
    namespace = namespace_of(obj)
    all_refs = meta.get("ownerReferences") or []
    if len(gone) == len(all_refs):
        owner = ", ".join(f"{r['kind']} {r['name']}" for r in gone)
        log.info("garbage collector: deleting %s %s/%s (owner %s is gone)", kind, namespace, meta["name"], owner)
        ctx.store.delete(kind, meta["name"], namespace or "default")
        return
    ctx.store.patch_metadata(kind, meta["name"], namespace or "default",
                             ownerReferences=[r for r in all_refs if r not in gone])
