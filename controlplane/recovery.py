"""Start-up repair of the embedded control plane, after `pvlun serve` stopped uncleanly
(kill -9, a host crash): as a node reboot would, nothing that ran is assumed to run. This
module repairs the control plane's own objects; each part repairs its own (virt/recovery.py:
QEMU and VMIs, migrations; importer/recovery.py: imports, uploads, scratch), and
pvlun/controllers.py runs them in order.

- Every VolumeAttachment is undone through CSI (kubelet's reconstruction, simplified). One
  naming a node this daemon does not serve now (a renamed host, another --node-id) is
  dropped with a warning event, its node side undone through a node this daemon serves.
  One whose detach fails stays, marked detaching, until the attacher finishes it: a
  publication never outlives its record. A malformed one (no volume) is dropped.

Repair never stops the daemon: an object that cannot be repaired gets a warning event
and the others are repaired all the same.
"""

from __future__ import annotations

import logging
from typing import Callable

import grpc

from controlplane import kubelet
from controlplane.context import Context

log = logging.getLogger("pvlun.recovery")
Counts = dict[str, int]


def guarded(ctx: Context, counts: Counts, obj: dict, repair: Callable[[], None]) -> None:
    """One object's repair; its failure is an event on it, and the start goes on."""
    try:
        repair()
    except Exception as exc:
        meta = obj["metadata"]
        log.exception("start-up repair of %s %s failed", obj.get("kind"), meta.get("name"))
        counts["failed"] = counts.get("failed", 0) + 1
        text = f"{exc.code().name}: {exc.details()}" if isinstance(exc, grpc.RpcError) else type(exc).__name__
        try:
            ctx.store.add_event(obj, "Warning", "RepairFailed", f"start-up repair failed ({text}); see the daemon log")
        except Exception:
            log.exception("cannot record the failed repair")


def recover_attachments(ctx: Context, counts: Counts) -> list[str]:
    """Undo every attachment; the owners they had (an upload's shows it was under way)."""
    counts.setdefault("attachments", 0)
    counts.setdefault("foreign", 0)
    attachments = ctx.store.list("VolumeAttachment")
    owners = [a["spec"].get("owner", "") for a in attachments if isinstance(a.get("spec"), dict)]
    for att in attachments:
        guarded(ctx, counts, att, lambda: _recover_attachment(ctx, att, counts))
    return owners


def _recover_attachment(ctx: Context, att: dict, counts: dict[str, int]) -> None:
    spec = att.get("spec") or {}
    if not all(isinstance(spec.get(k), str) and spec.get(k) for k in kubelet.FIELDS):
        ctx.store.patch_metadata("VolumeAttachment", att["metadata"]["name"], "", finalizers=[])
        ctx.store.delete("VolumeAttachment", att["metadata"]["name"], "")  # it names nothing that could be undone
        ctx.store.add_event(att, "Warning", "RepairFailed", "malformed: it names no volume, node or owner; dropped")
        counts["failed"] += 1
        return
    volume_id, node_id, owner = spec["volumeId"], spec["nodeName"], spec["owner"]
    via = None
    if node_id not in ctx.node_ids:
        via = ctx.node_id
        message = (f"node {node_id!r} is not served by this pvlun serve (its nodes: {', '.join(ctx.node_ids)}); "
                   f"the attachment of volume {volume_id} for {owner} is dropped")
        log.warning("%s", message)
        ctx.store.add_event(att, "Warning", "NodeNotServed", message)
        counts["foreign"] += 1
    try:
        kubelet.detach(ctx.store, ctx.csi, volume_id, node_id, owner, via=via)
    except grpc.RpcError as exc:
        # the record stays, marked detaching, and keeps its claim until the detach is finished:
        # the attacher (kubelet.reconcile_attachment) tries again with backoff
        log.warning("cannot detach %s from %s yet: %s", volume_id, node_id, exc.details())
    counts["attachments"] += 1
