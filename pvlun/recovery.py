"""Start-up repair of the embedded control plane, after `pvlun serve` stopped uncleanly
(kill -9, a host crash): as a node reboot would, nothing that ran is assumed to run.

- QEMU processes a previous daemon left behind are stopped (they hold volumes the VM
  controller is about to attach again), so a VM never runs twice.
- Every VolumeAttachment is undone through CSI (kubelet's reconstruction, simplified). One
  naming a node this daemon does not serve now (a renamed host, another --node-id) is
  dropped with a warning event, its node side undone through a node this daemon serves.
  One whose detach fails stays, marked detaching, until the attacher finishes it: a
  publication never outlives its record. A malformed one (no volume) is dropped.
- Running VMIs end as Failed ("the daemon restarted"); the VM controller restarts them
  as their runStrategy says.
- Imports, uploads and clones cut off mid-way lose their half-written claim and start
  again from scratch on a fresh volume, with restartCount + 1 (CDI restarts its importer
  or upload pod the same way). An upload was under way when its volume was attached.
- Migrations in flight are Failed.

Repair never stops the daemon: an object that cannot be repaired gets a warning event
and the others are repaired all the same.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import Callable

import grpc

from pvlun import kubelet
from pvlun.context import Context

log = logging.getLogger("pvlun.recovery")
UNFINISHED_DV_PHASES = ("ImportScheduled", "ImportInProgress", "CloneScheduled", "CloneInProgress")


def _ours(pid: int, data_dir: str) -> bool:
    """Is pid a QEMU started for this data dir (its command line names our run dirs)?"""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().decode(errors="replace")
    except OSError:
        return False
    return "qemu-system" in argv and os.path.join(data_dir, "vms") in argv


def _stop_orphan(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    for _ in range(100):
        if not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split(")")[-1].split()[0] == "Z":
            return
        time.sleep(0.05)


def recover(ctx: Context) -> dict[str, int]:
    counts = {"qemu": 0, "attachments": 0, "foreign": 0, "vmis": 0, "datavolumes": 0, "migrations": 0,
              "failed": 0}
    store = ctx.store
    for vmi in store.list("VirtualMachineInstance"):
        _guarded(ctx, counts, vmi, lambda: _recover_vmi(ctx, vmi, counts))
    attachments = store.list("VolumeAttachment")
    uploading = {a["spec"].get("owner", "").removeprefix("upload/") for a in attachments
                 if a["spec"].get("owner", "").startswith("upload/")}
    for att in attachments:
        _guarded(ctx, counts, att, lambda: _recover_attachment(ctx, att, counts))
    for dv in store.list("DataVolume"):
        _guarded(ctx, counts, dv, lambda: _recover_datavolume(ctx, dv, uploading, counts))
    for mig in store.list("VirtualMachineInstanceMigration"):
        if (mig.get("status") or {}).get("phase") not in ("Succeeded", "Failed"):
            meta = mig["metadata"]
            _guarded(ctx, counts, mig, lambda: store.merge_status(
                "VirtualMachineInstanceMigration", meta["name"], meta.get("namespace", "default"),
                phase="Failed", error="pvlun serve restarted during the migration"))
            counts["migrations"] += 1
    return counts


def _guarded(ctx: Context, counts: dict[str, int], obj: dict, repair: Callable[[], None]) -> None:
    """One object's repair; its failure is an event on it, and the start goes on."""
    try:
        repair()
    except Exception as exc:
        meta = obj["metadata"]
        log.exception("start-up repair of %s %s failed", obj.get("kind"), meta.get("name"))
        counts["failed"] += 1
        text = f"{exc.code().name}: {exc.details()}" if isinstance(exc, grpc.RpcError) else type(exc).__name__
        try:
            ctx.store.add_event(obj, "Warning", "RepairFailed", f"start-up repair failed ({text}); see the daemon log")
        except Exception:
            log.exception("cannot record the failed repair")


def _recover_vmi(ctx: Context, vmi: dict, counts: dict[str, int]) -> None:
    status = vmi.get("status") or {}
    pid = (status.get("launcher") or {}).get("pid")
    if pid and _ours(pid, ctx.data_dir):
        _stop_orphan(pid)
        counts["qemu"] += 1
    if status.get("phase") not in ("Succeeded", "Failed"):
        meta = vmi["metadata"]
        ctx.store.merge_status("VirtualMachineInstance", meta["name"], meta.get("namespace", "default"),
                               phase="Failed", reason="pvlun serve restarted while it ran")
        counts["vmis"] += 1


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


def _recover_datavolume(ctx: Context, dv: dict, uploading: set[str], counts: dict[str, int]) -> None:
    from importer.reconcile import key_of, start_over

    phase = (dv.get("status") or {}).get("phase")
    if phase in UNFINISHED_DV_PHASES:
        start_over(ctx.store, dv, "ImportRestarted", "pvlun serve restarted during the import; starting over")
    elif phase in ("UploadScheduled", "UploadReady") and key_of(dv) in uploading:
        start_over(ctx.store, dv, "UploadRestarted",
                   "pvlun serve restarted during the upload; send the image again (it goes to a fresh volume)")
    else:
        return
    counts["datavolumes"] += 1
