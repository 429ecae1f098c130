"""QEMU on an iSCSI LUN, both ways: its own libiscsi login ("iscsi-direct", when the publish
context allows it) or the node's userspace path (qemu-storage-daemon's FUSE file behind a loop
device, "block-device"). A real tgtd exports the tick guest's disk; the guest boots and ticks
either way, and the VMI status says which way it was reached."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "csi"))
from iscsi_target_support import BLOCK, iscsi_rig  # noqa: E402,F401  (the fixture)

from controlplane import kubelet  # noqa: E402
from csi import attach  # noqa: E402
from csi.iscsi_context import Chap, initiator_name  # noqa: E402
from csi.iscsi_userspace import UserspaceInitiator  # noqa: E402
from virt.iscsi_direct import allows_direct, direct_disk, parse_url  # noqa: E402
from virt.qemu_args import DiskAttachment, Throttle, build_qemu_argv  # noqa: E402
from virt.qemu_sandbox import qemu_sandbox  # noqa: E402
from virt.reconcile import volume_status  # noqa: E402
from virt.runtime import Running  # noqa: E402

NODE = "node-a"
CONTEXT = {"backend": "iscsi", "portal": "198.18.0.1:3260", "targetIQN": "iqn.2026-12.dev.pvlun:default-1",
           "lun": "3", "initiatorName": "iqn.2026-12.dev.pvlun:node.node-a", "qemuDirect": "true"}


def _argv(make_tick_vm, disk: DiskAttachment) -> list[str]:
    return build_qemu_argv(make_tick_vm(), {"root": disk}, accel="tcg", qmp_fd=3, serial_fd=4)


def _blockdevs(argv: list[str]) -> list[dict]:
    return [json.loads(argv[i + 1]) for i, a in enumerate(argv) if a == "-blockdev"]


def test_a_direct_iscsi_volume_is_an_iscsi_blockdev_with_the_nodes_initiator(make_tick_vm):
    disk = DiskAttachment.for_iscsi(direct_disk(CONTEXT, NODE), throttle=Throttle())
    argv = _argv(make_tick_vm, disk)
    proto = _blockdevs(argv)[0]
    assert proto == {"driver": "iscsi", "transport": "tcp", "portal": "198.18.0.1:3260",
                     "target": "iqn.2026-12.dev.pvlun:default-1", "lun": 3,
                     "initiator-name": initiator_name(NODE), "node-name": "file-root", "read-only": False,
                     "discard": "unmap", "cache": {"direct": True, "no-flush": False}}
    assert disk.access == "iscsi-direct" and disk.path == "iscsi://198.18.0.1:3260/iqn.2026-12.dev.pvlun:default-1/3"
    assert argv.count("-add-fd") == 1  # the serial log only: nothing of the host is opened for the volume
    sandbox = qemu_sandbox({"root": disk}, "/usr/bin/qemu-system-x86_64", [], [])
    assert sandbox.network and "--unshare-net" not in sandbox.wrap(["qemu"])


def test_a_vm_without_a_direct_iscsi_volume_keeps_no_network(tick_copy):
    sandbox = qemu_sandbox(tick_copy, "/usr/bin/qemu-system-x86_64", [], [])
    assert not sandbox.network and "--unshare-net" in sandbox.wrap(["qemu"])
    assert tick_copy["root"].access == "file"


def test_the_chap_password_is_a_secret_object_read_from_an_inherited_file_never_on_the_argv(make_tick_vm):
    password = "direct-chap-secret-42"
    lun = direct_disk({**CONTEXT, "chapUser": "gold"}, NODE, {"node.session.auth.password": password})
    assert lun.chap == Chap("gold", password) and password not in repr(lun)
    with pytest.raises(ValueError, match="node-stage secret has no node.session.auth.password"):
        direct_disk({**CONTEXT, "chapUser": "gold"}, NODE, {})  # the target wants CHAP: no anonymous login
    with pytest.raises(ValueError, match="password file"):
        _argv(make_tick_vm, DiskAttachment.for_iscsi(lun))
    import dataclasses
    argv = _argv(make_tick_vm, DiskAttachment.for_iscsi(dataclasses.replace(lun, secret_fd=9)))
    assert password not in " ".join(argv)
    assert "secret,id=sec-root,format=raw,file=/proc/self/fd/9" in argv
    proto = _blockdevs(argv)[0]
    assert proto["user"] == "gold" and proto["password-secret"] == "sec-root"


def test_only_a_publish_context_that_says_so_allows_direct_and_bad_values_are_refused():
    assert allows_direct(CONTEXT)
    assert not allows_direct({k: v for k, v in CONTEXT.items() if k != "qemuDirect"})
    assert not allows_direct({"lunPath": "/x"})
    with pytest.raises(ValueError, match="portal"):
        direct_disk({**CONTEXT, "portal": "198.18.0.1:3260,file=/etc/shadow"}, NODE)
    with pytest.raises(ValueError, match="not iscsi://"):
        parse_url("iscsi://h/x", NODE)
    with pytest.raises(ValueError, match="password file"):
        parse_url("iscsi://gold@198.18.0.1:3260/iqn.2026-12.dev.pvlun:default-1/1", NODE)
    assert parse_url("iscsi://198.18.0.1:3260/iqn.2026-12.dev.pvlun:default-1/1", NODE).lun.lun == 1


@pytest.fixture
def tick_lun(iscsi_rig, tick_disk):
    """A LUN of the rig's tgtd holding the tick guest's disk, published to NODE."""
    data = tick_disk.read_bytes()
    size = -(-len(data) // (1 << 20)) * (1 << 20)
    vol = iscsi_rig.create("tick-root", size, {"qemuDirect": "true"})
    lun_file = iscsi_rig.backend.file.volume_path(vol.id)
    with open(lun_file, "r+b") as f:
        f.write(data)
    context = iscsi_rig.luns.publish(vol.id, NODE, BLOCK, False)
    return vol.id, context


def _running(launcher, volume_id: str) -> Running:
    return Running("default/tick", launcher.vm, NODE, launcher,
                   {"root": kubelet.Attachment(launcher.disks["root"].path, volume_id, NODE, True)})


def test_the_tick_guest_boots_from_an_iscsi_lun_opened_by_qemu_itself(iscsi_rig, tick_lun, launchers,
                                                                      make_tick_vm, tmp_path):
    volume_id, context = tick_lun
    assert allows_direct(context)
    disk = DiskAttachment.for_iscsi(direct_disk(context, NODE), throttle=Throttle())
    launcher = launchers(make_tick_vm(), {"root": disk}, tmp_path / "run")
    launcher.start()
    assert launcher.wait_for_serial("tick 3", timeout=30), launcher.serial_text() + launcher.stderr_text()
    assert "PVLUN-BOOT" in launcher.serial_text()
    [target] = iscsi_rig.tgtd.admin.show().values()
    assert target.sessions >= 1  # QEMU's own login
    [status] = volume_status(_running(launcher, volume_id))
    assert status["access"] == "iscsi-direct" and status["size"] == os.path.getsize(
        iscsi_rig.backend.file.volume_path(volume_id))
    launcher.kill()
    assert iscsi_rig.tgtd.admin.show()[target.tid].sessions == 0  # QEMU's exit logged it out


def test_the_tick_guest_boots_from_the_same_lun_through_the_fuse_and_loop_path(iscsi_rig, tick_lun, launchers,
                                                                              make_tick_vm, tmp_path):
    volume_id, context = tick_lun
    state = tempfile.mkdtemp(prefix="pvi-", dir="/tmp")  # short: the storage daemon's QMP socket lives there
    initiator = UserspaceInitiator(state, initiator_name(NODE))
    export = initiator.attach(volume_id, direct_disk(context, NODE).lun, None)
    device = None
    try:
        device = attach.attach_loop(export)
        disk = DiskAttachment.for_path(device, throttle=Throttle())
        launcher = launchers(make_tick_vm(), {"root": disk}, tmp_path / "run")
        launcher.start()
        assert launcher.wait_for_serial("tick 3", timeout=30), launcher.serial_text() + launcher.stderr_text()
        assert "PVLUN-BOOT" in launcher.serial_text()
        [status] = volume_status(_running(launcher, volume_id))
        assert status["access"] == "block-device"
        launcher.kill()
    finally:
        if device:
            attach.detach_loop(device)
        initiator.release(volume_id)
    assert not initiator.attached(volume_id)
    shutil.rmtree(state, ignore_errors=True)
