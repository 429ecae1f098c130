"""The node side of the iscsi backend against a real tgtd on 127.0.0.1 (needs root): the
real NodeService over gRPC logs in with qemu-storage-daemon (libiscsi), stages the FUSE
export behind a loop device, and what is written there lands in the LUN file the target
serves. Each test makes its own target and LUN and leaves no daemon, FUSE mount, loop device
or tgtd behind, even when it fails.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from concurrent import futures

import grpc
import pytest

from csi import attach
from csi.iscsi_context import SECRET_PASSWORD, SECRET_USER, initiator_name
from csi.iscsi_userspace import DAEMON, UserspaceInitiator
from csi.node import NodeService
from csi.proto import csi_pb2 as pb
from csi.proto import csi_pb2_grpc
from csi_support import block_cap, mount_cap, read_at, write_at
from iscsi_tgt_support import Lun, Tgtd

MiB = 1 << 20
Code = grpc.StatusCode
NODE_ID = "iscsi-node-a"
PASSWORD = "correct-horse-battery"

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("tgtd") or not shutil.which(DAEMON),
                                reason="needs root, tgtd and qemu-storage-daemon")
_tids = itertools.count(1)


@pytest.fixture(scope="module")
def tgtd(tmp_path_factory):
    target = Tgtd(str(tmp_path_factory.mktemp("tgtd") / "tgtd.log"))
    target.start()
    try:
        yield target
    finally:
        target.kill()


class Node:
    """NodeService with a userspace initiator, served in-process over a unix socket."""

    def __init__(self, root: str):
        self.root = root
        self.initiator = UserspaceInitiator(os.path.join(root, "iscsi"), initiator_name(NODE_ID))
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        csi_pb2_grpc.add_NodeServicer_to_server(NodeService(NODE_ID, iscsi=self.initiator), self.server)
        sock = f"unix://{root}/node.sock"
        self.server.add_insecure_port(sock)
        self.server.start()
        self.channel = grpc.insecure_channel(sock)
        self.stub = csi_pb2_grpc.NodeStub(self.channel)

    def close(self) -> None:
        self.channel.close()
        self.server.stop(None)
        self.initiator.repair(published=())  # whatever a failed test left: released
        for m in reversed(attach.mounts()):
            if m.mount_point.startswith(self.root + "/"):
                subprocess.run(["umount", "--lazy", m.mount_point], capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def node():
    n = Node(tempfile.mkdtemp(prefix="isn-", dir="/tmp"))  # short: QMP socket paths
    try:
        yield n
    finally:
        n.close()


def make_lun(tgtd: Tgtd, tmp_path, size: int = 64 * MiB, accounts=()) -> Lun:
    tid = next(_tids)
    path = str(tmp_path / f"lun{tid}.img")
    with open(path, "wb") as f:
        f.truncate(size)
    lun = Lun(tid, f"iqn.2024-01.dev.pvlun.test:t{tid}", 1, path, tuple(accounts))
    tgtd.export(lun)
    return lun


def context(tgtd: Tgtd, lun: Lun, chap_user: str = "") -> dict[str, str]:
    """publish_context as ControllerPublishVolume of the iscsi backend returns it."""
    ctx = {"backend": "iscsi", "portal": tgtd.portal, "targetIQN": lun.iqn, "lun": str(lun.lun)}
    return ctx | ({"chapUser": chap_user} if chap_user else {})


def stage(node: Node, volume_id: str, ctx: dict, cap, secrets=None) -> str:
    staging = os.path.join(node.root, "staging", volume_id)
    node.stub.NodeStageVolume(pb.NodeStageVolumeRequest(
        volume_id=volume_id, staging_target_path=staging, volume_capability=cap,
        publish_context=ctx, secrets=secrets or {}))
    return staging


def publish(node: Node, volume_id: str, staging: str, cap, block: bool) -> str:
    target = os.path.join(node.root, "pods", volume_id, "dev" if block else "mnt")
    node.stub.NodePublishVolume(pb.NodePublishVolumeRequest(
        volume_id=volume_id, staging_target_path=staging, target_path=target, volume_capability=cap))
    return target


def unpublish_unstage(node: Node, volume_id: str, staging: str, target: str | None) -> None:
    if target:
        node.stub.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=target))
    node.stub.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(volume_id=volume_id, staging_target_path=staging))


def daemons_of(node: Node) -> list[int]:
    out = subprocess.run(["pgrep", "-f", f"{DAEMON}.*{node.root}/"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def assert_nothing_left(node: Node, volume_id: str) -> None:
    export = node.initiator.export_path(volume_id)
    assert not daemons_of(node), "a qemu-storage-daemon is still running"
    assert not [m for m in attach.mounts() if m.mount_point.startswith(node.root + "/")], "a mount is left"
    assert not [d for d in attach.all_loop_devices() if d.backing_file.startswith(node.root + "/")], \
        "a loop device is left"
    assert not os.path.exists(os.path.dirname(export)), "the volume's iSCSI state is left"


def stats(node: Node, volume_id: str, path: str) -> pb.NodeGetVolumeStatsResponse:
    return node.stub.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(volume_id=volume_id, volume_path=path))


def new_volume_id() -> str:
    return "vol-" + uuid.uuid4().hex


# ---------------------------------------------------------------- stage and publish


def test_block_volume_writes_reach_the_target_lun_file(tgtd, node, tmp_path):
    lun = make_lun(tgtd, tmp_path)
    vid = new_volume_id()
    staging = stage(node, vid, context(tgtd, lun), block_cap())
    stage(node, vid, context(tgtd, lun), block_cap())  # idempotent: the same daemon and device
    assert len(daemons_of(node)) == 1
    device = publish(node, vid, staging, block_cap(), block=True)
    data = os.urandom(8192)
    write_at(device, 3 * MiB, data)
    assert read_at(lun.path, 3 * MiB, len(data)) == data  # on the target's side
    assert stats(node, vid, device).usage[0].total == 64 * MiB
    assert not stats(node, vid, device).volume_condition.abnormal
    # the loop device reads the FUSE export, without direct I/O
    loop = attach.device_of(device)
    assert attach.loop_backing_file(loop) == node.initiator.export_path(vid)
    assert not next(d for d in attach.all_loop_devices() if d.path == loop).direct_io
    unpublish_unstage(node, vid, staging, device)
    assert_nothing_left(node, vid)
    assert read_at(lun.path, 3 * MiB, len(data)) == data


def test_mount_volume_gets_a_filesystem_on_the_lun(tgtd, node, tmp_path):
    lun = make_lun(tgtd, tmp_path)
    vid = new_volume_id()
    staging = stage(node, vid, context(tgtd, lun), mount_cap(fs_type="ext4"))
    target = publish(node, vid, staging, mount_cap(fs_type="ext4"), block=False)
    with open(os.path.join(target, "hello.txt"), "w") as f:
        f.write("written over iSCSI\n")
    unpublish_unstage(node, vid, staging, target)
    assert_nothing_left(node, vid)
    # the target's LUN file holds that filesystem and file
    out = subprocess.run(["debugfs", "-R", "cat /hello.txt", lun.path], capture_output=True, text=True)
    assert out.stdout == "written over iSCSI\n", out.stderr


# ---------------------------------------------------------------- failures that must be fast and clear


def test_chap_mismatch_is_permission_denied_naming_the_secret(tgtd, node, tmp_path):
    lun = make_lun(tgtd, tmp_path, accounts=[("alice", PASSWORD)])
    vid = new_volume_id()
    wrong = "not-the-right-password"
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        stage(node, vid, context(tgtd, lun, "alice"), block_cap(),
              {SECRET_USER: "alice", SECRET_PASSWORD: wrong})
    assert time.monotonic() - start < 10
    assert err.value.code() == Code.PERMISSION_DENIED, err.value.details()
    assert SECRET_PASSWORD in err.value.details() and wrong not in err.value.details()
    assert_nothing_left(node, vid)
    # no password at all: FAILED_PRECONDITION naming the key
    with pytest.raises(grpc.RpcError) as err:
        stage(node, vid, context(tgtd, lun, "alice"), block_cap())
    assert err.value.code() == Code.FAILED_PRECONDITION and SECRET_PASSWORD in err.value.details()
    # the right one logs in; the password never reached an argv nor stays on disk
    staging = stage(node, vid, context(tgtd, lun, "alice"), block_cap(),
                    {SECRET_USER: "alice", SECRET_PASSWORD: PASSWORD})
    (pid,) = daemons_of(node)
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        assert PASSWORD.encode() not in f.read()
    assert not os.path.exists(os.path.join(os.path.dirname(node.initiator.export_path(vid)), "secret"))
    unpublish_unstage(node, vid, staging, None)
    assert_nothing_left(node, vid)


def test_missing_target_or_lun_is_not_found(tgtd, node, tmp_path):
    lun = make_lun(tgtd, tmp_path)
    vid = new_volume_id()
    for ctx in (context(tgtd, lun) | {"targetIQN": lun.iqn + "-missing"}, context(tgtd, lun) | {"lun": "7"}):
        with pytest.raises(grpc.RpcError) as err:
            stage(node, vid, ctx, block_cap())
        assert err.value.code() == Code.NOT_FOUND, err.value.details()
        assert_nothing_left(node, vid)
    with pytest.raises(grpc.RpcError) as err:
        stage(node, vid, context(tgtd, lun) | {"portal": "127.0.0.1;reboot"}, block_cap())
    assert err.value.code() == Code.INVALID_ARGUMENT and "portal" in err.value.details()


# ---------------------------------------------------------------- session loss, growth, restart


def test_target_restart_io_resumes_without_loss(tgtd, node, tmp_path):
    lun = make_lun(tgtd, tmp_path)
    vid = new_volume_id()
    staging = stage(node, vid, context(tgtd, lun), block_cap())
    device = publish(node, vid, staging, block_cap(), block=True)
    before = os.urandom(4096)
    write_at(device, 0, before)
    tgtd.kill()
    try:
        condition = stats(node, vid, device).volume_condition
        assert condition.abnormal and tgtd.portal in condition.message
        during = os.urandom(65536)
        writer = threading.Thread(target=write_at, args=(device, 8 * MiB, during))
        writer.start()  # waits for the target
        time.sleep(1)
        assert writer.is_alive()
    finally:
        tgtd.restart()
    writer.join(30)
    assert not writer.is_alive(), "I/O did not resume after the target came back"
    assert read_at(lun.path, 0, 4096) == before
    assert read_at(lun.path, 8 * MiB, len(during)) == during
    assert not stats(node, vid, device).volume_condition.abnormal
    unpublish_unstage(node, vid, staging, device)
    assert_nothing_left(node, vid)


def test_expand_after_the_target_lun_grew(tgtd, node, tmp_path):
    lun = make_lun(tgtd, tmp_path)
    vid = new_volume_id()
    cap = mount_cap(fs_type="ext4")
    staging = stage(node, vid, context(tgtd, lun), cap)
    target = publish(node, vid, staging, cap, block=False)
    before = stats(node, vid, target).usage[0].total
    os.truncate(lun.path, 128 * MiB)  # what ControllerExpandVolume does on the target host
    tgtd.reexport_lun(lun)
    reply = node.stub.NodeExpandVolume(pb.NodeExpandVolumeRequest(
        volume_id=vid, volume_path=target, capacity_range=pb.CapacityRange(required_bytes=128 * MiB)))
    assert reply.capacity_bytes == 128 * MiB
    assert stats(node, vid, target).usage[0].total > before + 50 * MiB
    unpublish_unstage(node, vid, staging, target)
    assert_nothing_left(node, vid)


def test_repair_keeps_published_volumes_and_releases_the_rest(tgtd, node, tmp_path):
    kept, dropped = make_lun(tgtd, tmp_path), make_lun(tgtd, tmp_path)
    vid_kept, vid_dropped = new_volume_id(), new_volume_id()
    staged_kept = stage(node, vid_kept, context(tgtd, kept), mount_cap())
    stage(node, vid_dropped, context(tgtd, dropped), block_cap())
    # a restarted node service: a new initiator object over the same state dir
    again = UserspaceInitiator(node.initiator.state_dir, node.initiator.initiator_name)
    assert again.repair(published={vid_kept}) == {"kept": 1, "released": 1, "failed": 0}
    assert len(daemons_of(node)) == 1 and not again.attached(vid_dropped)
    with open(os.path.join(staged_kept, "still-here"), "w") as f:
        f.write("ok")
    unpublish_unstage(node, vid_kept, staged_kept, None)
    assert_nothing_left(node, vid_kept)


def test_a_dead_daemon_is_abnormal_and_released_by_repair(tgtd, node, tmp_path):
    lun = make_lun(tgtd, tmp_path)
    vid = new_volume_id()
    staging = stage(node, vid, context(tgtd, lun), block_cap())
    other = make_lun(tgtd, tmp_path)
    with pytest.raises(grpc.RpcError) as err:  # the same volume from another LUN: refused
        stage(node, vid, context(tgtd, other), block_cap())
    assert err.value.code() == Code.ALREADY_EXISTS
    (pid,) = daemons_of(node)
    os.kill(pid, 9)
    deadline = time.monotonic() + 5
    while node.initiator.pid(vid) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    condition = stats(node, vid, staging).volume_condition
    assert condition.abnormal and "not running" in condition.message
    again = UserspaceInitiator(node.initiator.state_dir, node.initiator.initiator_name)
    assert again.repair(published={vid}) == {"kept": 0, "released": 1, "failed": 0}
    assert_nothing_left(node, vid)


def test_start_up_repair_running_while_a_stage_starts_its_daemon_leaves_that_stage_alone(tgtd, node, tmp_path):
    """A daemon's node start-up repair runs after its CSI socket serves (it follows the control
    plane's own repair): a NodeStageVolume under way then, its storage daemon not yet exported,
    is this process's own attachment, never a leftover to release (seen: losetup ENOENT)."""
    lun = make_lun(tgtd, tmp_path)
    vid = new_volume_id()
    start = node.initiator._start
    repaired: list[dict] = []

    def start_with_repair_in_between(volume_id, lun_, chap):
        repaired.append(node.initiator.repair(published=()))  # the daemon is not even started yet
        start(volume_id, lun_, chap)
        repaired.append(node.initiator.repair(published=()))  # exported, published nowhere yet

    node.initiator._start = start_with_repair_in_between
    staging = stage(node, vid, context(tgtd, lun), block_cap())
    assert repaired == [{"kept": 1, "released": 0, "failed": 0}] * 2
    target = publish(node, vid, staging, block_cap(), block=True)
    with open(target, "r+b") as f:
        f.write(b"still attached")
    unpublish_unstage(node, vid, staging, target)
    assert_nothing_left(node, vid)
