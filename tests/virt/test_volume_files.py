"""Root never follows what a volume's owner put in it: a Filesystem claim's disk.img that is a
symbolic link to a root-only canary (what a pod, or a guest that had the volume before, can
make), a FIFO or a directory is refused — when the volume is attached, and when it is swapped
in between the attach and QEMU's start — for writable and read-only claims alike; the canary
keeps its owner, mode and bytes, and no QEMU runs."""

from __future__ import annotations

import os
import stat
import threading

import pytest

from host.sandbox import UnsafeFile
from virt.launcher import LaunchError, Phase
from virt.qemu_args import DiskAttachment
from controlplane.vm_spec import parse_virtual_machine

CANARY = b"root-only canary\n"


@pytest.fixture
def canary(tmp_path):
    secret = tmp_path / "root-only"
    secret.mkdir(mode=0o700)
    path = secret / "canary"
    path.write_bytes(CANARY)
    path.chmod(0o600)
    return path


def untouched(path) -> bool:
    st = os.stat(path)
    return (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o600) and path.read_bytes() == CANARY


def claim_vm(manifest, readonly: bool):
    return parse_virtual_machine(manifest(disks=[{"name": "root", "disk": {}, "bootOrder": 1}], volumes=[
        {"name": "root", "persistentVolumeClaim": {"claimName": "fs-claim", "readOnly": readonly}}])).template


@pytest.mark.parametrize("readonly", [False, True], ids=["writable", "read-only"])
def test_a_disk_img_linked_to_a_host_file_is_refused_when_the_volume_is_attached(tmp_path, canary, readonly):
    volume = tmp_path / "volume"
    volume.mkdir()
    (volume / "disk.img").symlink_to(canary)
    with pytest.raises(UnsafeFile, match="disk.img is a symbolic link"):
        DiskAttachment.for_path(str(volume / "disk.img"), readonly=readonly)
    assert untouched(canary)


@pytest.mark.parametrize("readonly", [False, True], ids=["writable", "read-only"])
def test_a_disk_img_swapped_for_a_link_before_qemu_starts_is_refused(launchers, manifest, tick_disk, canary, tmp_path,
                                                                      readonly):
    volume = tmp_path / "volume"
    volume.mkdir()
    disk = volume / "disk.img"
    disk.write_bytes(tick_disk.read_bytes())
    attachment = DiskAttachment.for_path(str(disk), readonly=readonly)
    disk.unlink()
    disk.symlink_to(canary)  # after the attach, before the start
    vm = launchers(claim_vm(manifest, readonly), {"root": attachment}, tmp_path / "run")
    with pytest.raises(LaunchError, match="volume root: disk.img is a symbolic link"):
        vm.start()
    assert vm.phase is Phase.FAILED and vm.proc is None
    assert untouched(canary)


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_a_disk_img_that_is_no_file_is_refused_at_once(tmp_path, kind):
    disk = tmp_path / "disk.img"
    os.mkfifo(disk) if kind == "fifo" else disk.mkdir()
    outcome: list[BaseException] = []

    def attach() -> None:
        try:
            DiskAttachment.for_path(str(disk))
        except BaseException as exc:  # noqa: BLE001 - what the attach raised is what the test looks at
            outcome.append(exc)

    worker = threading.Thread(target=attach, daemon=True)
    worker.start()
    worker.join(5)  # opening a FIFO for reading would block root until someone writes it
    assert not worker.is_alive(), "the attach blocked on the FIFO"
    assert len(outcome) == 1 and isinstance(outcome[0], OSError)
    assert isinstance(outcome[0], UnsafeFile) and f"disk.img is a {kind}" in str(outcome[0]).replace("FIFO", "fifo")
