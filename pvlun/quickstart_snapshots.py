"""`make quickstart`, the VMware admin's day: a golden image imported once, cloned for two VMs,
one VM snapshotted while it runs, its disk changed, the snapshot restored — and the change gone.

The change is a new boot sector written into the stopped VM's volume (as an upgrade would
rewrite its disk): the VM then boots printing PVLUN-CHANGED; after the restore it boots
printing the golden image's PVLUN-BOOT again."""

from __future__ import annotations

import os
from typing import Callable

import yaml

GOLDEN_MARKER, CHANGED_MARKER = "PVLUN-BOOT", "PVLUN-CHANGED"
VMS = ("clone-a", "clone-b")


def golden_dv(url: str) -> str:
    return f"""apiVersion: cdi.kubevirt.io/v1beta1
kind: DataVolume
metadata:
  name: golden
spec:
  source:
    http:
      url: {url}/tick.raw
  storage:
    volumeMode: Block
    accessModes: [ReadWriteOnce]
    resources:
      requests:
        storage: 8Mi
"""


def clone_vm(name: str) -> str:
    """The quickstart's tick VM, its disk a clone of the golden claim (dataVolumeTemplates, source pvc)."""
    from virt.guest_images import tick_vm_manifest

    vm = yaml.safe_load(tick_vm_manifest(name, "http://unused.invalid/tick.raw", access="ReadWriteOnce"))
    vm["spec"]["dataVolumeTemplates"][0]["spec"]["source"] = {"pvc": {"namespace": "default", "name": "golden"}}
    return yaml.safe_dump(vm, sort_keys=False)


SNAPSHOT = """apiVersion: snapshot.kubevirt.io/v1beta1
kind: VirtualMachineSnapshot
metadata:
  name: clone-a-before
spec:
  source: {apiGroup: kubevirt.io, kind: VirtualMachine, name: clone-a}
"""

RESTORE = """apiVersion: snapshot.kubevirt.io/v1beta1
kind: VirtualMachineRestore
metadata:
  name: clone-a-back
spec:
  target: {apiGroup: kubevirt.io, kind: VirtualMachine, name: clone-a}
  virtualMachineSnapshotName: clone-a-before
"""


def snapshot_steps(steps, data_dir: str, url: str, cli: Callable[..., str],
                   wait_for: Callable[..., None]) -> None:
    from controlplane.store import SQLiteStore
    from virt.bootsector import tick_boot_sector

    store = SQLiteStore(os.path.join(data_dir, "catalog.db"))

    def serial(vm: str) -> str:
        return cli("logs", f"vm/{vm}")

    def last_boot(vm: str) -> str:
        """The marker of the VM's latest boot (its serial log keeps every run)."""
        log = serial(vm)
        return max((GOLDEN_MARKER, CHANGED_MARKER), key=lambda m: log.rfind(m)) if GOLDEN_MARKER in log else ""

    def booted(vm: str, marker: str, runs: int) -> None:
        wait_for(lambda: serial(vm).count(marker) >= runs and last_boot(vm) == marker, f"{vm} printing {marker}")

    steps.run("golden image imported once (DataVolume golden)",
              lambda: cli("apply", "-f", "-", "--wait", "--timeout", "300", input=golden_dv(url)).strip().splitlines()[-1])

    def two_clones() -> str:
        for vm in VMS:
            cli("apply", "-f", "-", "--wait", "--timeout", "300", input=clone_vm(vm))
        for vm in VMS:
            booted(vm, GOLDEN_MARKER, 1)
        kinds = {(store.get("DataVolume", f"{vm}-root", "default") or {}).get("metadata", {}).get(
            "annotations", {}).get("cdi.kubevirt.io/cloneType", "csi-clone") for vm in VMS}
        return f"{' and '.join(VMS)} booted from clones of golden ({', '.join(sorted(kinds))})"

    steps.run("two VMs cloned from the golden image", two_clones)

    def snapshot() -> str:
        cli("apply", "-f", "-", input=SNAPSHOT)
        wait_for(lambda: ((store.get("VirtualMachineSnapshot", "clone-a-before", "default") or {}).get("status") or {})
                 .get("readyToUse"), "the VM snapshot ready")
        status = store.get("VirtualMachineSnapshot", "clone-a-before", "default")["status"]
        content = store.get("VirtualMachineSnapshotContent", status["virtualMachineSnapshotContentName"], "default")
        pause = float(content["metadata"].get("annotations", {}).get("pvlun.dev/guest-pause-seconds", 0))
        return f"readyToUse; indications {', '.join(status.get('indications', []))}; guest held {pause * 1000:.1f} ms"

    steps.run("VirtualMachineSnapshot of clone-a (running)", snapshot)

    def change() -> str:
        cli("vm", "stop", "clone-a", "--wait")
        pvc = store.get("PersistentVolumeClaim", "clone-a-root", "default")
        pv = store.get("PersistentVolume", pvc["spec"]["volumeName"], "")
        lun = os.path.join(data_dir, "pool", "volumes", pv["spec"]["csi"]["volumeHandle"] + ".img")
        with open(lun, "r+b") as f:
            f.write(tick_boot_sector(CHANGED_MARKER))
            os.fsync(f.fileno())
        cli("vm", "start", "clone-a", "--wait")
        booted("clone-a", CHANGED_MARKER, 1)
        return f"new boot sector written; clone-a now boots printing {CHANGED_MARKER}"

    steps.run("change clone-a's disk", change)

    def restore() -> str:
        cli("vm", "stop", "clone-a", "--wait")
        cli("apply", "-f", "-", input=RESTORE)
        wait_for(lambda: ((store.get("VirtualMachineRestore", "clone-a-back", "default") or {}).get("status") or {})
                 .get("complete"), "the restore complete")
        cli("vm", "start", "clone-a", "--wait")
        booted("clone-a", GOLDEN_MARKER, 2)
        if last_boot("clone-b") != GOLDEN_MARKER:
            raise RuntimeError("clone-b changed with clone-a")
        return f"clone-a boots printing {GOLDEN_MARKER} again: the change is gone; clone-b untouched"

    steps.run("VirtualMachineRestore of the snapshot", restore)
    steps.run("pvlun vm stop (both clones)",
              lambda: "; ".join(cli("vm", "stop", vm, "--wait").strip().splitlines()[-1] for vm in VMS))
