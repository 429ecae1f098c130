"""A claim or snapshot that a clone, restore or snapshot is reading is not deleted under it.

Kubernetes' sidecars mark such a source with a finalizer while they work: the
external-provisioner puts `provisioner.storage.kubernetes.io/cloning-protection` on a claim
being cloned, the external-snapshotter `snapshot.storage.kubernetes.io/pvc-as-source-protection`
on a claim being snapshotted and `snapshot.storage.kubernetes.io/volumesnapshot-as-source-protection`
on a snapshot a claim is being restored from. pvlun's own provisioner and snapshotter do the
same, so `pvlun get -o yaml` shows why a deletion waits, and the deletion goes on (the volume
or snapshot is destroyed) only when the last reader is done.

Who reads is counted in memory (several clones of one golden image at once); a finalizer
that no reader of this process holds any more (left by a crash) is dropped when the source
is deleted."""

from __future__ import annotations

import threading
from collections import Counter
from contextlib import contextmanager
from typing import Iterator

from controlplane.context import Context
from controlplane.store import Obj

CLONING = "provisioner.storage.kubernetes.io/cloning-protection"
PVC_AS_SOURCE = "snapshot.storage.kubernetes.io/pvc-as-source-protection"
SNAPSHOT_AS_SOURCE = "snapshot.storage.kubernetes.io/volumesnapshot-as-source-protection"
_FINALIZERS = {"PersistentVolumeClaim": (CLONING, PVC_AS_SOURCE), "VolumeSnapshot": (SNAPSHOT_AS_SOURCE,)}
_LOCK = threading.Lock()


def _readers(ctx: Context) -> Counter:
    return ctx.services.setdefault("source_readers", Counter())


def _set_finalizer(ctx: Context, kind: str, name: str, ns: str, finalizer: str, present: bool) -> None:
    """Add or drop one finalizer on the object as it is now (others' finalizers kept); an
    object being deleted goes away once none remain."""
    current = ctx.store.get(kind, name, ns)
    if current is None:
        return
    meta = current["metadata"]
    finalizers = [f for f in meta.get("finalizers") or [] if f != finalizer] + ([finalizer] if present else [])
    if finalizers == (meta.get("finalizers") or []):
        return
    ctx.store.patch_metadata(kind, name, ns, finalizers=finalizers)
    if not finalizers and meta.get("deletionTimestamp"):
        ctx.store.delete(kind, name, ns)


@contextmanager
def reading(ctx: Context, kind: str, name: str, ns: str, finalizer: str) -> Iterator[None]:
    """Hold the source (`kind` ns/name) for the block: its finalizer is on it, and a deletion
    waits until the last holder leaves."""
    key = (kind, ns, name, finalizer)
    with _LOCK:
        first = _readers(ctx)[key] == 0
        _readers(ctx)[key] += 1
        if first:
            _set_finalizer(ctx, kind, name, ns, finalizer, True)
    try:
        yield
    finally:
        with _LOCK:
            _readers(ctx)[key] -= 1
            if _readers(ctx)[key] <= 0:
                del _readers(ctx)[key]
                _set_finalizer(ctx, kind, name, ns, finalizer, False)


def being_read(ctx: Context, obj: Obj) -> str | None:
    """What still reads this source being deleted (a message), or None. Finalizers of ours
    that nobody holds any more (a crash cut their reader off) are dropped here."""
    kind, meta = obj["kind"], obj["metadata"]
    ns = meta.get("namespace", "default")
    with _LOCK:
        held = [f for f in _FINALIZERS.get(kind, ()) if _readers(ctx)[(kind, ns, meta["name"], f)] > 0]
        for finalizer in _FINALIZERS.get(kind, ()):
            if finalizer not in held and finalizer in (meta.get("finalizers") or []):
                _set_finalizer(ctx, kind, meta["name"], ns, finalizer, False)
    if not held:
        return None
    what = {CLONING: "a clone", PVC_AS_SOURCE: "a snapshot", SNAPSHOT_AS_SOURCE: "a restore"}
    return f"{kind} {ns}/{meta['name']} is the source of {' and '.join(what[f] for f in held)} in progress; " \
           "it is deleted when that ends"
