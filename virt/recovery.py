"""Start-up repair of the virt layer's objects (pvlun/controllers.py runs it before the
attachments are undone): nothing that ran is assumed to run.

- QEMU processes a previous daemon left behind are stopped (they hold volumes the VM
  controller is about to attach again), so a VM never runs twice.
- Running VMIs end as Failed ("the daemon restarted"); the VM controller restarts them
  as their runStrategy says. A VMI applied alone (no VM to restart it) is made Pending
  again, so it starts once more (virt/vmi_alone.py): a restart must not lose it.
- Migrations in flight are Failed.
"""

from __future__ import annotations

import os
import signal
import time

from controlplane.context import Context
from controlplane.recovery import Counts, guarded
from virt.runtime import owned_by_vm


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


def recover_vmis(ctx: Context, counts: Counts) -> None:
    counts.setdefault("qemu", 0)
    counts.setdefault("vmis", 0)
    for vmi in ctx.store.list("VirtualMachineInstance"):
        guarded(ctx, counts, vmi, lambda: _recover_vmi(ctx, vmi, counts))


def recover_migrations(ctx: Context, counts: Counts) -> None:
    counts.setdefault("migrations", 0)
    for mig in ctx.store.list("VirtualMachineInstanceMigration"):
        if (mig.get("status") or {}).get("phase") not in ("Succeeded", "Failed"):
            meta = mig["metadata"]
            guarded(ctx, counts, mig, lambda: ctx.store.merge_status(
                "VirtualMachineInstanceMigration", meta["name"], meta.get("namespace", "default"),
                phase="Failed", error="pvlun serve restarted during the migration"))
            counts["migrations"] += 1


def _recover_vmi(ctx: Context, vmi: dict, counts: Counts) -> None:
    status = vmi.get("status") or {}
    pid = (status.get("launcher") or {}).get("pid")
    if pid and _ours(pid, ctx.data_dir):
        _stop_orphan(pid)
        counts["qemu"] += 1
    meta, phase = vmi["metadata"], status.get("phase")
    if phase in ("Succeeded", "Failed"):
        return
    if not owned_by_vm(vmi) and not meta.get("deletionTimestamp"):
        if phase != "Pending":
            why = "pvlun serve restarted while it ran: started again"
            ctx.store.update_status("VirtualMachineInstance", meta["name"], meta.get("namespace", "default"),
                                    {"phase": "Pending", "reason": why})
            ctx.store.add_event(vmi, "Warning", "Restarted", why)
            counts["vmis"] += 1
        return
    ctx.store.merge_status("VirtualMachineInstance", meta["name"], meta.get("namespace", "default"),
                           phase="Failed", reason="pvlun serve restarted while it ran")
    counts["vmis"] += 1
