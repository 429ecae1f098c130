"""The Linux test guest: SYSLINUX → Debian kernel → busybox init reads its second disk."""

from __future__ import annotations

import re

from virt.launcher import Phase
from virt.qemu_args import DiskAttachment, Throttle
from controlplane.vm_spec import parse_virtual_machine


def test_linux_guest_prints_checksum_of_file_on_second_disk(launchers, manifest, linux_disks, payload_sha256,
                                                            tmp_path):
    boot, data = linux_disks
    obj = manifest("linux", "256Mi",
                   disks=[{"name": "boot", "disk": {"bus": "virtio"}, "bootOrder": 1},
                          {"name": "data", "disk": {"bus": "virtio"}}],
                   volumes=[{"name": "boot", "dataVolume": {"name": "linux-boot"}},
                            {"name": "data", "persistentVolumeClaim": {"claimName": "data", "readOnly": True}}])
    spec = parse_virtual_machine(obj).template
    disks = {"boot": DiskAttachment.for_path(str(boot), readonly=True, throttle=Throttle()),
             "data": DiskAttachment.for_path(str(data), readonly=True, throttle=Throttle())}
    vm = launchers(spec, disks, tmp_path / "run")
    vm.start()
    assert vm.wait_for_serial("PVLUN-LINUX", timeout=60), vm.serial_text()[-2000:]
    found = re.search(r"PVLUN-SHA256 ([0-9a-f]{64}|none) payload.bin", vm.serial_text())
    assert found and found.group(1) == payload_sha256
    # the guest powers itself off: QEMU exits 0 and the VMI has Succeeded
    assert vm.wait(30) == 0
    assert vm.phase is Phase.SUCCEEDED and vm.reason == "guest-shutdown"
