"""What a DataVolume clone whose spec leaves them out takes from its source, as CDI does:
the volume mode (`storage: {}`: the bytes are copied as they are) and, on a cluster, the size
(the API server refuses a claim without one; embedded, the provisioner takes the source's)."""

from __future__ import annotations

from controlplane.context import Context
from controlplane.quantity import parse_quantity
from controlplane.store import Obj


def from_clone_source(ctx: Context, dv: Obj, kind: str, source: dict, ns: str,
                      size: int) -> tuple[str | None, int] | None:
    """What a clone whose spec leaves them out takes from its source, as CDI does: the volume
    mode (`storage: {}`: the bytes are copied as they are) and, on a cluster (where a claim must
    name a size), the size. (mode or None, size); None: the source is not there (or not bound) yet."""
    spec = dv.get("spec") or {}
    want_mode = not (spec.get("storage") or spec.get("pvc") or {}).get("volumeMode")
    want_size = not size and ctx.cluster is not None
    if kind not in ("pvc", "snapshot") or not (want_mode or want_size):
        return None, size
    src_ns = source.get("namespace") or ns
    if kind == "pvc":
        claim = ctx.store.get("PersistentVolumeClaim", source.get("name", ""), src_ns)
        if claim is None:
            return None
        mode = (claim.get("spec") or {}).get("volumeMode") or "Filesystem"
        capacity = ((claim.get("status") or {}).get("capacity") or {}).get("storage")
    else:
        snap = ctx.store.get("VolumeSnapshot", source.get("name", ""), src_ns)
        if snap is None:
            return None
        capacity = (snap.get("status") or {}).get("restoreSize")
        mode = _snapshot_mode(ctx, snap, src_ns)
        if mode is None:
            return None
    if want_size:
        if not capacity:
            return None
        size = parse_quantity(str(capacity))
    return (mode if want_mode else None), size


def _snapshot_mode(ctx: Context, snap: Obj, ns: str) -> str | None:
    """The volume mode a snapshot was taken of: its content's sourceVolumeMode (embedded), or
    its source claim's on a cluster (the controller may not read VolumeSnapshotContents)."""
    if ctx.cluster is None:
        name = (snap.get("status") or {}).get("boundVolumeSnapshotContentName")
        content = ctx.store.get("VolumeSnapshotContent", name, "") if name else None
        return ((content or {}).get("spec") or {}).get("sourceVolumeMode") or None
    claim_name = ((snap.get("spec") or {}).get("source") or {}).get("persistentVolumeClaimName")
    claim = ctx.store.get("PersistentVolumeClaim", claim_name, ns) if claim_name else None
    return ((claim.get("spec") or {}).get("volumeMode") or "Filesystem") if claim else None
