"""Start-up repair of the embedded control plane, after `pvlun serve` stopped uncleanly
(kill -9, a host crash): as a node reboot would, nothing that ran is assumed to run.

- QEMU processes a previous daemon left behind are stopped (they hold volumes the VM
  controller is about to attach again), so a VM never runs twice.
- Every VolumeAttachment is undone through CSI (kubelet's reconstruction, simplified).
- Running VMIs end as Failed ("the daemon restarted"); the VM controller restarts them
  as their runStrategy says.
- Imports, uploads and clones cut off mid-way lose their half-written claim and start
  again from scratch, with restartCount + 1 (CDI restarts its importer pod the same way).
- Migrations in flight are Failed.
"""

from __future__ import annotations

import logging
import os
import signal
import time

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
    counts = {"qemu": 0, "attachments": 0, "vmis": 0, "datavolumes": 0, "migrations": 0}
    store = ctx.store
    for vmi in store.list("VirtualMachineInstance"):
        status = vmi.get("status") or {}
        pid = (status.get("launcher") or {}).get("pid")
        if pid and _ours(pid, ctx.data_dir):
            _stop_orphan(pid)
            counts["qemu"] += 1
        if status.get("phase") not in ("Succeeded", "Failed"):
            meta = vmi["metadata"]
            store.merge_status("VirtualMachineInstance", meta["name"], meta.get("namespace", "default"),
                               phase="Failed", reason="pvlun serve restarted while it ran")
            counts["vmis"] += 1
    for att in store.list("VolumeAttachment"):
        spec = att["spec"]
        try:
            kubelet.detach(store, ctx.csi, spec["volumeId"], spec["nodeName"], spec["owner"])
        except grpc.RpcError as exc:
            log.warning("cannot detach %s from %s: %s", spec["volumeId"], spec["nodeName"], exc.details())
            store.delete("VolumeAttachment", att["metadata"]["name"], "")
        counts["attachments"] += 1
    for dv in store.list("DataVolume"):
        status = dv.get("status") or {}
        if status.get("phase") in UNFINISHED_DV_PHASES:
            meta = dv["metadata"]
            ns = meta.get("namespace", "default")
            store.delete("PersistentVolumeClaim", meta["name"], ns)  # its half-written volume goes with it
            store.update_status("DataVolume", meta["name"], ns,
                                {"phase": "Pending", "restartCount": int(status.get("restartCount", 0)) + 1,
                                 "progress": "N/A"})
            store.add_event(dv, "Warning", "ImportRestarted", "pvlun serve restarted during the import; starting over")
            counts["datavolumes"] += 1
    for mig in store.list("VirtualMachineInstanceMigration"):
        if (mig.get("status") or {}).get("phase") not in ("Succeeded", "Failed"):
            meta = mig["metadata"]
            store.merge_status("VirtualMachineInstanceMigration", meta["name"], meta.get("namespace", "default"),
                               phase="Failed", error="pvlun serve restarted during the migration")
            counts["migrations"] += 1
    return counts
