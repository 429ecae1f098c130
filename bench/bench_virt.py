"""Virt layer benchmark: start → guest marker, and live migration of a 256 MiB guest.

`run()` returns (metric, value, note) rows. Target from issue 4: migration downtime of the
256 MiB guest under TCG below 300 ms (QEMU's default downtime limit).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from virt.accel import choose_accel
from virt.guest_images import build_data_disk, build_linux_disk, build_tick_disk
from virt.launcher import VmLauncher
from virt.migration import migrate
from virt.qemu_args import DiskAttachment, Throttle
from controlplane.vm_spec import parse_virtual_machine


def _vm(name: str, memory: str, volumes: list[str]):
    disks = [{"name": v, "disk": {"bus": "virtio"}, **({"bootOrder": 1} if i == 0 else {})}
             for i, v in enumerate(volumes)]
    return parse_virtual_machine({
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "metadata": {"name": name},
        "spec": {"runStrategy": "Always", "template": {"spec": {
            "domain": {"memory": {"guest": memory}, "devices": {"disks": disks, "autoattachPodInterface": False}},
            "volumes": [{"name": v, "persistentVolumeClaim": {"claimName": f"{name}-{v}"}} for v in volumes]}}}}).template


def _boot(spec, disks, run_dir: Path, marker: str, accel: str) -> tuple[VmLauncher, float]:
    launcher = VmLauncher(spec, disks, run_dir, accel=accel)
    started = time.monotonic()
    launcher.start()
    if not launcher.wait_for_serial(marker, timeout=120):
        launcher.kill()
        raise RuntimeError(f"{spec.name}: no {marker} on the serial console")
    return launcher, time.monotonic() - started


def _migrate(source: VmLauncher, run_dir: Path) -> dict:
    target = VmLauncher(source.vm, source.disks, run_dir, accel=source.accel, incoming="defer")
    status = migrate(source, target, source_node="bench-a", target_node="bench-b")
    if status.phase != "Succeeded":
        target.kill()
        raise RuntimeError(f"migration failed: {status.error}")
    target.stop(grace=0)
    return status.as_dict()


def run() -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []
    started = time.monotonic()
    accel = choose_accel()
    rows.append(("virt accelerator", accel, f"chosen in {time.monotonic() - started:.1f}s (probe or cache)"))
    tmp = Path(tempfile.mkdtemp(prefix="pvlun-bench-virt-"))
    try:
        tick = build_tick_disk(tmp / "tick.img")
        boot = build_linux_disk(tmp / "linux.img")
        data = build_data_disk(tmp / "data.img", {"payload.bin": b"pvlun" * 1000})

        spec = _vm("tick", "256Mi", ["root"])
        disks = {"root": DiskAttachment.for_path(str(tick), throttle=Throttle())}
        source, seconds = _boot(spec, disks, tmp / "tick-a", "PVLUN-BOOT", accel)
        rows.append(("virt start → marker (tick guest)", f"{seconds * 1000:.0f} ms", f"QEMU {accel}, 256 MiB"))
        source.wait_for_serial("tick 5", timeout=10)
        st = _migrate(source, tmp / "tick-b")
        rows.append(("virt migration total (tick, 256 MiB)", f"{st['totalTimeMs']} ms",
                     f"{st['dataTransferred'] / 1e6:.1f} MB sent over loopback"))
        rows.append(("virt migration downtime (tick, 256 MiB)", f"{st['downtimeMs']} ms", "target < 300 ms"))

        spec = _vm("linux", "256Mi", ["boot", "data"])
        disks = {"boot": DiskAttachment.for_path(str(boot), readonly=True, throttle=Throttle()),
                 "data": DiskAttachment.for_path(str(data), readonly=True, throttle=Throttle())}
        source, seconds = _boot(spec, disks, tmp / "linux-a", "PVLUN-LINUX", accel)
        rows.append(("virt start → marker (linux guest)", f"{seconds * 1000:.0f} ms",
                     f"QEMU {accel}: SYSLINUX, Debian kernel, busybox, sha256 of disk 2"))
        st = _migrate(source, tmp / "linux-b")
        rows.append(("virt migration total (linux, 256 MiB)", f"{st['totalTimeMs']} ms",
                     f"{st['dataTransferred'] / 1e6:.1f} MB sent over loopback"))
        rows.append(("virt migration downtime (linux, 256 MiB)", f"{st['downtimeMs']} ms", "target < 300 ms"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


if __name__ == "__main__":
    for row in run():
        print(" | ".join(row))
