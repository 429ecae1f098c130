"""Kubernetes' garbage collector for the embedded store: dependents follow their owners.

An object whose `metadata.ownerReferences` all name owners that are gone is deleted (with
background propagation: the owner went first, its dependents follow, and theirs in a later
pass — a VirtualMachine, then its dataVolumeTemplates' DataVolumes, then their claims). An
owner is gone when no object of that kind and name exists, or one exists with another uid
(deleted and made again: not the owner). An object that keeps at least one owner only loses
the references to the gone ones. An owner still being deleted (it has finalizers) still
exists. References to kinds pvlun does not store are left alone, never judged.

Owners are judged from one listing per kind, then confirmed by a fresh read before anything
is deleted, so an object made during the pass is never collected by mistake.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from pvlun.admission import KINDS as APPLIED_KINDS
from pvlun.context import Context
from pvlun.store import CLUSTER_SCOPED, Obj, namespace_of

log = logging.getLogger("pvlun.gc")
# every kind the embedded store holds: what `apply` takes, and what the controllers make
KINDS = tuple(APPLIED_KINDS) + tuple(k for k in ("PersistentVolume", "VirtualMachineInstance", "VolumeAttachment",
                                                  "VolumeSnapshotContent") if k not in APPLIED_KINDS)
INTERVAL = 1.0  # seconds between passes: a pass lists every kind


def collect_garbage(ctx: Context) -> int:
    """One pass: delete what lost all its owners; returns how many objects were deleted."""
    last = ctx.services.get("gc_last_pass", 0.0)
    if time.monotonic() - last < INTERVAL:
        return 0
    ctx.services["gc_last_pass"] = time.monotonic()
    dependents = [obj for kind in KINDS for obj in ctx.store.list(kind)
                  if _refs(obj) and not obj["metadata"].get("deletionTimestamp")]
    if not dependents:
        return 0
    # listed after the dependents: an owner made before its dependent is in this listing
    owners = {(kind, namespace_of(o), o["metadata"]["name"]): o["metadata"].get("uid")
              for kind in {r["kind"] for d in dependents for r in _refs(d)} for o in ctx.store.list(kind)}
    collected = 0
    for obj in dependents:
        if ctx.stopping.is_set():
            break
        try:
            collected += _collect(ctx, obj, owners)
        except Exception:  # noqa: BLE001 - one object must not stop the collection of the others
            log.exception("garbage collection of %s %s failed", obj.get("kind"), obj["metadata"].get("name"))
    return collected


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


def _collect(ctx: Context, obj: Obj, owners: dict[tuple[str, str, str], Any]) -> int:
    refs = _refs(obj)
    gone = [r for r in refs if owners.get(_owner_key(r, obj)) != r["uid"]]
    gone = [r for r in gone if not _exists(ctx, r, obj)]  # confirmed now, not a moment ago
    if not gone:
        return 0
    meta, kind = obj["metadata"], obj["kind"]
    namespace = namespace_of(obj)
    all_refs = meta.get("ownerReferences") or []
    if len(gone) == len(all_refs):
        owner = ", ".join(f"{r['kind']} {r['name']}" for r in gone)
        log.info("garbage collector: deleting %s %s/%s (owner %s is gone)", kind, namespace, meta["name"], owner)
        ctx.store.delete(kind, meta["name"], namespace or "default")
        return 1
    ctx.store.patch_metadata(kind, meta["name"], namespace or "default",
                             ownerReferences=[r for r in all_refs if r not in gone])
    return 0
