"""Which VMs a pool and which VMIs a replica set have, as KubeVirt's controller ref manager
decides it (ReleaseDetachedVirtualMachines, ClaimVirtualMachineInstances): the objects it
controls whose labels its selector selects. One it controls whose labels no longer match is
released (its controller reference removed): it is no replica any more, is neither counted
nor scaled, and no longer goes with its owner. pvlun adopts no orphans."""

from __future__ import annotations

import logging

from controlplane.context import Context
from controlplane.label_selectors import matches
from controlplane.replica_specs import controlled_by
from controlplane.store import Obj, namespace_of

log = logging.getLogger("pvlun.virt")


def claimed(ctx: Context, owner: Obj, kind: str) -> list[Obj]:
    """The owner's `kind` objects its selector selects; the other ones it controls released."""
    selector = (owner.get("spec") or {}).get("selector")
    mine = []
    for obj in ctx.store.list(kind, namespace_of(owner)):
        if not controlled_by(obj, owner):
            continue
        if matches(selector, obj["metadata"].get("labels") or {}):
            mine.append(obj)
        elif not obj["metadata"].get("deletionTimestamp"):
            _release(ctx, owner, obj)
    return mine


def _release(ctx: Context, owner: Obj, obj: Obj) -> None:
    uid = owner["metadata"].get("uid")
    kept = [r for r in obj["metadata"].get("ownerReferences") or []
            if not (isinstance(r, dict) and r.get("uid") == uid)]
    ctx.store.patch_metadata(obj["kind"], obj["metadata"]["name"], namespace_of(obj), ownerReferences=kept)
    log.info("%s %s: %s %s released (its labels no longer match the selector)", owner["kind"],
             owner["metadata"]["name"], obj["kind"], obj["metadata"]["name"])
