"""The CSI Node service against real loop devices, mkfs and mounts (needs root).

An in-process gRPC server runs NodeService on a unix socket with a pool volumes dir of
the module's own; each test stages and publishes LUN files it makes in that pool and
leaves no mount or loop device behind.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import struct
import uuid
from concurrent import futures

import grpc
import pytest

from csi import attach, filesystems
from csi.node import NodeService
from csi.proto import csi_pb2 as pb
from csi.proto import csi_pb2_grpc
from host.command import output, run

MiB = 1 << 20
Mode = pb.VolumeCapability.AccessMode.Mode
Code = grpc.StatusCode

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="loop devices and mounts need root")


# ---------------------------------------------------------------- fixtures and helpers


_POOL: list[str] = []  # the module's pool volumes dir (set by the node fixture)
_LUNS: list[str] = []  # LUN files made by the running test


def _cleanup(root: str, luns: tuple[str, ...] = ()) -> None:
    """Unmount everything under root (innermost first) and detach its loop devices and
    those of `luns`."""
    for m in reversed(attach.mounts()):
        if m.mount_point.startswith(root + "/"):
            run(["umount", "--lazy", m.mount_point], check=False)
    listing = json.loads(output(["losetup", "--list", "--json"]) or '{"loopdevices": []}')
    for d in listing["loopdevices"]:
        back = (d.get("back-file") or "").removesuffix(" (deleted)")
        if back.startswith(root + "/") or back in luns:
            run(["losetup", "--detach", d["name"]], check=False)
    for lun in luns:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lun)


@contextlib.contextmanager
def serve_node(sock_dir, node_id="node-a"):
    """A Node stub talking to a fresh NodeService over a unix socket."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    csi_pb2_grpc.add_NodeServicer_to_server(NodeService(node_id, max_volumes=64, pool_volumes_dirs=_POOL), server)
    sock = f"unix://{sock_dir}/{node_id}.sock"
    server.add_insecure_port(sock)
    server.start()
    channel = grpc.insecure_channel(sock)
    try:
        yield csi_pb2_grpc.NodeStub(channel)
    finally:
        channel.close()
        server.stop(None)


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    root = tmp_path_factory.mktemp("node")
    pool = root / "pool" / "volumes"
    pool.mkdir(parents=True)
    _POOL[:] = [str(pool)]
    try:
        with serve_node(root) as stub:
            yield stub
    finally:
        _cleanup(str(root))
        _POOL.clear()


@pytest.fixture
def case(tmp_path):
    """A per-test directory; whatever the test leaves mounted or attached is removed, and
    the LUNs it made in the pool are detached and deleted."""
    _LUNS.clear()
    yield tmp_path
    _cleanup(str(tmp_path), tuple(_LUNS))
    _LUNS.clear()


def lun_of(volume_id: str) -> str:
    """Where the node looks for volume_id's LUN: <pool volumes dir>/<volume_id>.img."""
    return os.path.join(os.path.realpath(_POOL[0]), f"{volume_id}.img")


def make_lun(case, size: int = 64 * MiB) -> tuple[str, str]:
    volume_id = "vol-" + uuid.uuid4().hex
    path = lun_of(volume_id)
    _LUNS.append(path)
    with open(path, "wb") as f:
        f.truncate(size)
    return volume_id, str(path)


def block_cap(mode=Mode.SINGLE_NODE_WRITER):
    return pb.VolumeCapability(block=pb.VolumeCapability.BlockVolume(),
                               access_mode=pb.VolumeCapability.AccessMode(mode=mode))


def mount_cap(fs_type="", flags=(), mode=Mode.SINGLE_NODE_WRITER):
    return pb.VolumeCapability(mount=pb.VolumeCapability.MountVolume(fs_type=fs_type, mount_flags=list(flags)),
                               access_mode=pb.VolumeCapability.AccessMode(mode=mode))


def stage(node, volume_id, lun, staging, cap):
    return node.NodeStageVolume(pb.NodeStageVolumeRequest(
        volume_id=volume_id, staging_target_path=str(staging), volume_capability=cap,
        publish_context={"lunPath": lun}))


def publish(node, volume_id, staging, target, cap, readonly=False):
    return node.NodePublishVolume(pb.NodePublishVolumeRequest(
        volume_id=volume_id, staging_target_path=str(staging), target_path=str(target),
        volume_capability=cap, readonly=readonly))


def unpublish(node, volume_id, target):
    return node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=str(target)))


def unstage(node, volume_id, staging):
    return node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(volume_id=volume_id, staging_target_path=str(staging)))


def stats(node, volume_id, path):
    return node.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(volume_id=volume_id, volume_path=str(path)))


def expand(node, volume_id, path, required=0):
    return node.NodeExpandVolume(pb.NodeExpandVolumeRequest(
        volume_id=volume_id, volume_path=str(path), capacity_range=pb.CapacityRange(required_bytes=required)))


def code_of(call, *args, **kwargs) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value.code()


def loops_of(lun: str) -> list[str]:
    return [d.path for d in attach.loop_devices_for(lun)]


def usage(resp, unit):
    return next(u for u in resp.usage if u.unit == unit)


# ---------------------------------------------------------------- identity of the node


def test_node_get_info_reports_id_limit_and_topology(node):
    info = node.NodeGetInfo(pb.NodeGetInfoRequest())
    assert info.node_id == "node-a"
    assert info.max_volumes_per_node == 64
    assert dict(info.accessible_topology.segments) == {"topology.csi.pvlun.dev/node": "node-a",
                                                        "topology.csi.pvlun.dev/host": socket.gethostname()}


def test_node_get_capabilities_lists_what_is_implemented(node):
    caps = {c.rpc.type for c in node.NodeGetCapabilities(pb.NodeGetCapabilitiesRequest()).capabilities}
    T = pb.NodeServiceCapability.RPC.Type
    assert caps == {T.STAGE_UNSTAGE_VOLUME, T.GET_VOLUME_STATS, T.EXPAND_VOLUME,
                    T.VOLUME_CONDITION, T.SINGLE_NODE_MULTI_WRITER}


# ---------------------------------------------------------------- request checks


def test_missing_required_fields_are_invalid_argument(node, case):
    vid, lun = make_lun(case)
    cap = block_cap()
    st, tg = str(case / "staging"), str(case / "target")
    checks = [
        (node.NodeStageVolume, pb.NodeStageVolumeRequest(staging_target_path=st, volume_capability=cap)),
        (node.NodeStageVolume, pb.NodeStageVolumeRequest(volume_id=vid, volume_capability=cap)),
        (node.NodeStageVolume, pb.NodeStageVolumeRequest(volume_id=vid, staging_target_path=st,
                                                         publish_context={"device": "/dev/mock"})),
        (node.NodeStageVolume, pb.NodeStageVolumeRequest(volume_id=vid, staging_target_path=st, volume_capability=cap)),
        (node.NodeUnstageVolume, pb.NodeUnstageVolumeRequest(staging_target_path=st)),
        (node.NodeUnstageVolume, pb.NodeUnstageVolumeRequest(volume_id="fake-vol-id-1")),
        (node.NodePublishVolume, pb.NodePublishVolumeRequest()),
        (node.NodePublishVolume, pb.NodePublishVolumeRequest(volume_id="fake-vol-id-1")),
        (node.NodePublishVolume, pb.NodePublishVolumeRequest(volume_id="fake-vol-id-1", target_path=tg)),
        (node.NodePublishVolume, pb.NodePublishVolumeRequest(volume_id=vid, target_path=tg, volume_capability=cap)),
        (node.NodeUnpublishVolume, pb.NodeUnpublishVolumeRequest()),
        (node.NodeUnpublishVolume, pb.NodeUnpublishVolumeRequest(volume_id="fake-vol-id-1")),
        (node.NodeGetVolumeStats, pb.NodeGetVolumeStatsRequest(volume_path="some/path")),
        (node.NodeGetVolumeStats, pb.NodeGetVolumeStatsRequest(volume_id="fake-vol-id-1")),
        (node.NodeExpandVolume, pb.NodeExpandVolumeRequest(volume_path=tg, volume_capability=cap)),
        (node.NodeExpandVolume, pb.NodeExpandVolumeRequest(volume_id=vid, volume_capability=cap)),
    ]
    for call, request in checks:
        assert code_of(call, request) == Code.INVALID_ARGUMENT, request


@pytest.mark.parametrize("bad_id", ["fake-vol-id-1", "vol-../../etc", "../" + "0" * 32, "vol-" + "A" * 32,
                                    "vol-" + "0" * 31 + "\x00"])
def test_malformed_volume_id_is_not_found_and_touches_nothing(node, case, bad_id):
    path = case / "target"
    path.mkdir()
    assert code_of(stats, node, bad_id, path) == Code.NOT_FOUND
    assert code_of(unpublish, node, bad_id, path) == Code.NOT_FOUND
    assert code_of(unstage, node, bad_id, path) == Code.NOT_FOUND
    assert code_of(expand, node, bad_id, path) == Code.NOT_FOUND
    assert code_of(stage, node, bad_id, "/nonexistent.img", case / "st", block_cap()) == Code.NOT_FOUND
    assert path.is_dir()
    assert not (case / "st").exists()


def test_stats_and_expand_on_a_path_without_the_volume_are_not_found(node, case):
    vid, _ = make_lun(case)
    (case / "empty").mkdir()
    for path in ("some/path", case / "empty", case / "missing"):
        assert code_of(stats, node, vid, path) == Code.NOT_FOUND
        assert code_of(expand, node, vid, path) == Code.NOT_FOUND


def test_unsafe_paths_are_invalid_argument(node, case):
    vid, lun = make_lun(case)
    for bad in ("relative/staging", f"{case}/../escape", f"{case}/nul\x00"):
        assert code_of(stage, node, vid, lun, bad, block_cap()) == Code.INVALID_ARGUMENT
        assert code_of(unstage, node, vid, bad) == Code.INVALID_ARGUMENT
        assert code_of(unpublish, node, vid, bad) == Code.INVALID_ARGUMENT
    assert code_of(stage, node, vid, "pool/x.img", case / "st", block_cap()) == Code.INVALID_ARGUMENT
    assert code_of(stage, node, vid, str(case / "other.img"), case / "st", block_cap()) == Code.INVALID_ARGUMENT
    assert not os.path.exists(case.parent / "escape")


def test_multi_node_multi_writer_is_refused_for_mount_and_allowed_for_block(node, case):
    vid, lun = make_lun(case)
    with pytest.raises(grpc.RpcError) as info:
        stage(node, vid, lun, case / "st", mount_cap(mode=Mode.MULTI_NODE_MULTI_WRITER))
    assert info.value.code() == Code.INVALID_ARGUMENT
    assert "block" in info.value.details()
    stage(node, vid, lun, case / "st", block_cap(Mode.MULTI_NODE_MULTI_WRITER))
    unstage(node, vid, case / "st")


def test_stage_of_a_missing_lun_is_not_found(node, case):
    vid = "vol-" + uuid.uuid4().hex
    assert code_of(stage, node, vid, lun_of(vid), case / "st", block_cap()) == Code.NOT_FOUND


def test_unsupported_fs_type_is_invalid_argument(node, case):
    vid, lun = make_lun(case)
    assert code_of(stage, node, vid, lun, case / "st", mount_cap("ntfs")) == Code.INVALID_ARGUMENT


# ---------------------------------------------------------------- block volumes


def test_block_stage_publish_writes_reach_the_lun_and_unstage_detaches(node, case):
    vid, lun = make_lun(case)
    staging, target = case / "staging", case / "publish" / "dev"
    cap = block_cap()
    for _ in range(2):  # idempotent
        stage(node, vid, lun, staging, cap)
    (loop,) = loops_of(lun)
    assert open(f"/sys/block/{os.path.basename(loop)}/loop/dio").read().strip() == "1"
    for _ in range(2):
        publish(node, vid, staging, target, cap)
    assert attach.device_of(str(target)) == loop

    payload = b"pvlun-block-" * 341 + b"!" * 4
    fd = os.open(target, os.O_WRONLY)
    try:
        os.pwrite(fd, payload, 3 * MiB)
        os.fsync(fd)
    finally:
        os.close(fd)
    with open(lun, "rb") as f:
        f.seek(3 * MiB)
        assert f.read(len(payload)) == payload

    resp = stats(node, vid, target)
    assert usage(resp, pb.VolumeUsage.Unit.BYTES).total == 64 * MiB
    assert not resp.volume_condition.abnormal
    assert usage(stats(node, vid, staging), pb.VolumeUsage.Unit.BYTES).total == 64 * MiB

    for _ in range(2):
        unpublish(node, vid, target)
    assert not target.exists()
    assert loops_of(lun) == [loop]  # still staged
    for _ in range(2):
        unstage(node, vid, staging)
    assert loops_of(lun) == []
    assert not (staging / "lun").exists()


def test_block_readonly_publish_refuses_writes(node, case):
    vid, lun = make_lun(case)
    with open(lun, "r+b") as f:
        f.write(b"original")
    staging, rw_target, ro_target = case / "st", case / "rw", case / "ro"
    cap = block_cap()
    stage(node, vid, lun, staging, cap)
    publish(node, vid, staging, ro_target, cap, readonly=True)
    publish(node, vid, staging, ro_target, cap, readonly=True)  # idempotent
    with pytest.raises(OSError) as info:
        fd = os.open(ro_target, os.O_WRONLY)  # the kernel refuses at open or at write
        try:
            os.write(fd, b"x" * 4096)
        finally:
            os.close(fd)
    assert info.value.errno in (errno.EROFS, errno.EACCES, errno.EPERM)
    with open(ro_target, "rb") as f:
        assert f.read(8) == b"original"
    assert code_of(publish, node, vid, staging, ro_target, cap, readonly=False) == Code.ALREADY_EXISTS
    assert code_of(publish, node, vid, staging, ro_target, mount_cap()) == Code.FAILED_PRECONDITION

    publish(node, vid, staging, rw_target, cap)
    assert len(loops_of(lun)) == 2  # the staged device and the read-only one
    unpublish(node, vid, ro_target)
    assert len(loops_of(lun)) == 1  # the read-only device went with its only publish
    unpublish(node, vid, rw_target)
    unstage(node, vid, staging)
    assert loops_of(lun) == []


def test_two_stagings_of_one_block_lun_share_the_loop_device(node, case):
    """Live migration between two nodes of one host stages the same LUN twice."""
    vid, lun = make_lun(case)
    cap = block_cap(Mode.MULTI_NODE_MULTI_WRITER)
    stage(node, vid, lun, case / "a", cap)
    stage(node, vid, lun, case / "b", cap)
    assert len(loops_of(lun)) == 1
    unstage(node, vid, case / "a")
    assert len(loops_of(lun)) == 1  # b still uses it
    assert attach.device_of(str(case / "b" / "lun")) == loops_of(lun)[0]
    unstage(node, vid, case / "b")
    assert loops_of(lun) == []


def test_publish_of_an_unstaged_volume_is_failed_precondition(node, case):
    vid, _ = make_lun(case)
    (case / "st").mkdir()
    assert code_of(publish, node, vid, case / "st", case / "tg", block_cap()) == Code.FAILED_PRECONDITION
    assert not (case / "tg").exists()


def test_staging_path_holding_another_volume_is_already_exists(node, case):
    vid, lun = make_lun(case)
    other, other_lun = make_lun(case)
    stage(node, vid, lun, case / "st", block_cap())
    assert code_of(stage, node, other, other_lun, case / "st", block_cap()) == Code.ALREADY_EXISTS
    assert code_of(stage, node, vid, lun, case / "st", mount_cap()) == Code.ALREADY_EXISTS
    assert code_of(unstage, node, other, case / "st") == Code.NOT_FOUND  # not other's to unstage
    unstage(node, vid, case / "st")


# ---------------------------------------------------------------- filesystem volumes


def test_mount_ext4_roundtrip_formats_once_and_keeps_data(node, case):
    vid, lun = make_lun(case)
    staging, target = case / "staging", case / "pods" / "vol"
    cap = mount_cap(flags=["noexec"])
    stage(node, vid, lun, staging, cap)
    stage(node, vid, lun, staging, cap)
    assert attach.mount_at(str(staging)).fstype == "ext4"
    publish(node, vid, staging, target, cap)
    publish(node, vid, staging, target, cap)
    assert "noexec" in attach.mount_at(str(target)).options
    marker = b"pvlun-ext4-marker-" + uuid.uuid4().hex.encode()
    with open(target / "data", "wb") as f:
        f.write(marker)
        f.flush()
        os.fsync(f.fileno())

    resp = stats(node, vid, target)
    by_bytes, inodes = usage(resp, pb.VolumeUsage.Unit.BYTES), usage(resp, pb.VolumeUsage.Unit.INODES)
    assert 40 * MiB < by_bytes.total <= 64 * MiB and 0 < by_bytes.used < by_bytes.total
    assert inodes.total > 0 and inodes.used >= 12 and inodes.available > 0
    assert not resp.volume_condition.abnormal

    assert code_of(publish, node, vid, staging, target, cap, readonly=True) == Code.ALREADY_EXISTS
    assert code_of(publish, node, vid, staging, target, block_cap()) == Code.FAILED_PRECONDITION
    assert code_of(stage, node, vid, lun, staging, mount_cap("xfs")) == Code.ALREADY_EXISTS

    unpublish(node, vid, target)
    assert not target.exists()
    unstage(node, vid, staging)
    unstage(node, vid, staging)
    assert loops_of(lun) == []
    with open(lun, "rb") as f:
        assert marker in f.read()

    # Staged again: the filesystem is mounted as it is, never formatted a second time.
    stage(node, vid, lun, staging, mount_cap("ext4"))
    assert (staging / "data").read_bytes() == marker
    assert code_of(stage, node, vid, lun, case / "st2", mount_cap("xfs")) == Code.FAILED_PRECONDITION
    unstage(node, vid, staging)
    assert loops_of(lun) == []


def test_mount_readonly_publish_refuses_writes(node, case):
    vid, lun = make_lun(case)
    staging, target = case / "st", case / "ro"
    stage(node, vid, lun, staging, mount_cap())
    (staging / "hello").write_text("hi")
    publish(node, vid, staging, target, mount_cap(), readonly=True)
    assert (target / "hello").read_text() == "hi"
    with pytest.raises(OSError) as info:
        (target / "new").write_text("no")
    assert info.value.errno == errno.EROFS
    unpublish(node, vid, target)
    unstage(node, vid, staging)


def test_device_holding_a_partition_table_is_never_formatted(node, case):
    vid, lun = make_lun(case)
    mbr = bytearray(512)  # one Linux partition from sector 2048 on, as fdisk would write it
    mbr[440:444] = b"\x12\x34\x56\x78"
    mbr[446:462] = bytes([0, 0, 0, 0, 0x83, 0, 0, 0]) + struct.pack("<II", 2048, 64 * 2048 - 2048)
    mbr[510:512] = b"\x55\xaa"
    with open(lun, "r+b") as f:
        f.write(mbr)
    before = open(lun, "rb").read(1 * MiB)
    with pytest.raises(grpc.RpcError) as info:
        stage(node, vid, lun, case / "st", mount_cap())
    assert info.value.code() == Code.FAILED_PRECONDITION
    assert "dos" in info.value.details()
    assert open(lun, "rb").read(1 * MiB) == before
    assert loops_of(lun) == []


def test_expand_grows_a_mounted_xfs_filesystem(node, case):
    vid, lun = make_lun(case, 320 * MiB)  # mkfs.xfs wants at least 300 MiB
    staging, target = case / "st", case / "tg"
    stage(node, vid, lun, staging, mount_cap("xfs"))
    publish(node, vid, staging, target, mount_cap("xfs"))
    assert attach.mount_at(str(staging)).fstype == "xfs"
    (target / "keep").write_text("still here")
    before = usage(stats(node, vid, target), pb.VolumeUsage.Unit.BYTES).total

    os.truncate(lun, 512 * MiB)
    assert code_of(expand, node, vid, target, required=1024 * MiB) == Code.OUT_OF_RANGE
    ro = case / "ro"
    publish(node, vid, staging, ro, mount_cap("xfs"), readonly=True)
    assert expand(node, vid, ro, required=512 * MiB).capacity_bytes == 512 * MiB  # grows via staging
    unpublish(node, vid, ro)
    after = usage(stats(node, vid, target), pb.VolumeUsage.Unit.BYTES).total
    assert after > before + 150 * MiB
    expand(node, vid, target, required=512 * MiB)  # idempotent
    assert (target / "keep").read_text() == "still here"
    unpublish(node, vid, target)
    unstage(node, vid, staging)


def test_expand_of_a_published_ext4_grows_it_and_keeps_every_mount(node, case):
    """Online ext4 growth needs CAP_SYS_RESOURCE. Without it the driver unmounts, grows
    offline and mounts back — unless something holds the filesystem busy."""
    vid, lun = make_lun(case)
    staging, rw, ro = case / "st", case / "rw", case / "ro"
    stage(node, vid, lun, staging, mount_cap(flags=["noexec"]))
    publish(node, vid, staging, rw, mount_cap(flags=["noexec"]))
    publish(node, vid, staging, ro, mount_cap(), readonly=True)
    (rw / "keep").write_text("still here")
    before = usage(stats(node, vid, rw), pb.VolumeUsage.Unit.BYTES).total
    os.truncate(lun, 128 * MiB)

    if not filesystems.can_grow_mounted_ext():
        with open(rw / "keep") as busy:
            with pytest.raises(grpc.RpcError) as info:
                expand(node, vid, rw, required=128 * MiB)
            assert info.value.code() == Code.FAILED_PRECONDITION
            assert "CAP_SYS_RESOURCE" in info.value.details()
            assert busy.read() == "still here"
        assert attach.mount_at(str(rw)) and attach.mount_at(str(ro))

    assert expand(node, vid, ro, required=128 * MiB).capacity_bytes == 128 * MiB  # via the ro publish
    assert usage(stats(node, vid, rw), pb.VolumeUsage.Unit.BYTES).total > before + 50 * MiB
    assert usage(stats(node, vid, ro), pb.VolumeUsage.Unit.BYTES).total > before + 50 * MiB
    assert (ro / "keep").read_text() == "still here"
    assert "noexec" in attach.mount_at(str(rw)).options and not attach.mount_at(str(rw)).read_only
    assert attach.mount_at(str(ro)).read_only
    assert "noexec" in attach.mount_at(str(staging)).options
    expand(node, vid, rw, required=128 * MiB)  # idempotent
    publish(node, vid, staging, ro, mount_cap(), readonly=True)  # still the same publication
    for target in (rw, ro):
        unpublish(node, vid, target)
    unstage(node, vid, staging)
    assert loops_of(lun) == []


def test_ext4_lun_grown_while_unstaged_is_grown_at_the_next_stage(node, case):
    vid, lun = make_lun(case)
    staging = case / "st"
    stage(node, vid, lun, staging, mount_cap())
    (staging / "keep").write_text("still here")
    before = filesystems.filesystem_usage(str(staging)).total_bytes
    unstage(node, vid, staging)
    os.truncate(lun, 160 * MiB)  # what ControllerExpandVolume does to an unpublished volume
    stage(node, vid, lun, staging, mount_cap())
    assert filesystems.filesystem_usage(str(staging)).total_bytes > before + 80 * MiB
    assert (staging / "keep").read_text() == "still here"
    unstage(node, vid, staging)


def test_expand_block_volume_refreshes_the_loop_device(node, case):
    vid, lun = make_lun(case)
    staging, target = case / "st", case / "tg"
    stage(node, vid, lun, staging, block_cap())
    publish(node, vid, staging, target, block_cap())
    os.truncate(lun, 96 * MiB)
    assert expand(node, vid, target).capacity_bytes == 96 * MiB
    assert attach.device_size(loops_of(lun)[0]) == 96 * MiB
    unpublish(node, vid, target)
    unstage(node, vid, staging)


def test_stats_report_abnormal_condition_when_the_lun_is_gone(node, case):
    vid, lun = make_lun(case)
    staging, target = case / "st", case / "tg"
    stage(node, vid, lun, staging, mount_cap())
    publish(node, vid, staging, target, mount_cap())
    os.unlink(lun)
    resp = stats(node, vid, target)
    assert resp.volume_condition.abnormal
    assert "LUN is gone" in resp.volume_condition.message
    assert usage(resp, pb.VolumeUsage.Unit.BYTES).total > 0
    # Cleaning up still works on a volume whose LUN was deleted.
    unpublish(node, vid, target)
    unstage(node, vid, staging)
    assert attach.mount_at(str(staging)) is None
    assert not any(vid in (d.get("back-file") or "")
                   for d in json.loads(output(["losetup", "--list", "--json"]) or '{"loopdevices": []}')["loopdevices"])


def test_clone_of_an_xfs_volume_stages_beside_its_origin(node, case):
    """Clones share the origin's XFS UUID; both must mount at once (nouuid)."""
    vid, lun = make_lun(case, 320 * MiB)
    stage(node, vid, lun, case / "a", mount_cap("xfs"))
    (case / "a" / "origin").write_text("from the origin")
    unstage(node, vid, case / "a")
    clone, clone_lun = make_lun(case, 0)
    run(["cp", "--sparse=always", lun, clone_lun])
    stage(node, vid, lun, case / "a", mount_cap("xfs"))
    stage(node, clone, clone_lun, case / "b", mount_cap("xfs"))
    assert (case / "b" / "origin").read_text() == "from the origin"
    unstage(node, clone, case / "b")
    unstage(node, vid, case / "a")


def test_a_failing_tool_is_internal_with_its_stderr_and_leaves_nothing_behind(node, case):
    vid, lun = make_lun(case)
    with pytest.raises(grpc.RpcError) as info:
        stage(node, vid, lun, case / "st", mount_cap(flags=["no_such_option"]))
    assert info.value.code() == Code.INTERNAL
    assert info.value.details().startswith("mount exited")
    assert attach.mount_at(str(case / "st")) is None
    assert loops_of(lun) == []


def test_a_restarted_driver_finds_what_is_staged_and_published(node, case):
    """The node keeps no state: a new NodeService derives it from the system."""
    vid, lun = make_lun(case)
    staging, target = case / "st", case / "tg"
    stage(node, vid, lun, staging, mount_cap())
    publish(node, vid, staging, target, mount_cap(), readonly=True)
    with serve_node(case, "node-restarted") as again:
        stage(again, vid, lun, staging, mount_cap())
        publish(again, vid, staging, target, mount_cap(), readonly=True)
        assert code_of(publish, again, vid, staging, target, mount_cap()) == Code.ALREADY_EXISTS
        assert not stats(again, vid, target).volume_condition.abnormal
        unpublish(again, vid, target)
        unstage(again, vid, staging)
    assert loops_of(lun) == []


def test_concurrent_stages_of_one_volume_both_succeed_with_one_device(node, case):
    vid, lun = make_lun(case)
    with futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: stage(node, vid, lun, case / "st", mount_cap()), range(4)))
    assert len(results) == 4
    assert len(loops_of(lun)) == 1
    assert len([m for m in attach.mounts() if m.mount_point == str(case / "st")]) == 1
    unstage(node, vid, case / "st")
    assert loops_of(lun) == []


# ---------------------------------------------------------------- only our own volumes are touched


@contextlib.contextmanager
def tmpfs_at(path):
    path.mkdir(parents=True, exist_ok=True)
    run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)])
    try:
        (path / "keep").write_text("host data")
        yield path
    finally:
        run(["umount", "--lazy", str(path)], check=False)


def _tmpfs_intact(path) -> bool:
    m = attach.mount_at(str(path))
    return m is not None and m.fstype == "tmpfs" and (path / "keep").read_text() == "host data"


@pytest.mark.parametrize("volume_id", ["vol-" + "2" * 32, "made"])
def test_a_host_mount_survives_unpublish_and_unstage(node, case, volume_id):
    if volume_id == "made":
        volume_id, _ = make_lun(case)
    with tmpfs_at(case / "host") as host:
        for call in (unpublish, unstage):
            try:
                call(node, volume_id, host)
            except grpc.RpcError as err:
                assert err.code() == Code.NOT_FOUND, err.details()
            assert host.is_dir()
            assert _tmpfs_intact(host)
        # a block staging path's STAGING/lun is looked at first: a foreign mount there stays too
        (case / "st").mkdir()
        with tmpfs_at(case / "st" / "lun") as node_dir:
            assert code_of(unstage, node, volume_id, case / "st") == Code.NOT_FOUND
            assert _tmpfs_intact(node_dir)


def test_stats_and_expand_of_host_paths_are_not_found(node, case):
    vid, _ = make_lun(case)
    with tmpfs_at(case / "host") as host:
        for path in ("/", host, "/proc", "/dev/null"):
            assert code_of(stats, node, vid, path) == Code.NOT_FOUND, path
            assert code_of(expand, node, vid, path) == Code.NOT_FOUND, path
        assert _tmpfs_intact(host)


def test_a_loop_device_on_a_file_named_like_the_volume_outside_the_pool_is_not_ours(node, case):
    """Only a loop device on <pool>/<volume_id>.img is the volume: not one on a look-alike."""
    vid, lun = make_lun(case)
    fake = case / f"{vid}.img"
    with open(fake, "wb") as f:
        f.truncate(64 * MiB)
    loop = attach.attach_loop(str(fake))
    filesystems.make_filesystem(loop, "ext4")
    target = case / "tg"
    target.mkdir()
    attach.mount(loop, str(target), "ext4")
    (target / "keep").write_text("host data")
    assert code_of(unpublish, node, vid, target) == Code.NOT_FOUND
    assert code_of(unstage, node, vid, target) == Code.NOT_FOUND
    assert code_of(stats, node, vid, target) == Code.NOT_FOUND
    assert code_of(expand, node, vid, target) == Code.NOT_FOUND
    assert attach.mount_at(str(target)) is not None and (target / "keep").read_text() == "host data"
    assert attach.loop_backing_file(loop) == str(fake)
    # and a staging holding it is not taken for the volume: publish refuses it
    assert code_of(publish, node, vid, target, case / "pub", mount_cap()) == Code.FAILED_PRECONDITION
    assert not (case / "pub").exists()


def test_unpublish_with_nothing_mounted_deletes_only_what_a_publish_creates(node, case):
    vid, _ = make_lun(case)
    kept = case / "data"
    kept.write_text("host data")
    (case / "full").mkdir()
    (case / "full" / "f").write_text("x")
    for path in (kept, case / "full"):
        unpublish(node, vid, path)
        assert path.exists()
    assert kept.read_text() == "host data"
    (case / "empty").mkdir()
    unpublish(node, vid, case / "empty")  # a target left by an interrupted publish
    assert not (case / "empty").exists()


def _loop_backed_by(path: str) -> bool:
    return bool(output(["losetup", "--noheadings", "--associated", path]).strip())


@pytest.mark.parametrize("where", ["publish_context", "volume_context"])
def test_stage_of_a_lun_path_outside_the_pool_is_refused_and_touches_nothing(node, case, where):
    vid = "vol-" + uuid.uuid4().hex
    outside = case / "anything" / vid  # named after the volume, as in the report
    outside.parent.mkdir()
    outside_img = case / f"{vid}.img"
    for f in (outside, outside_img):
        with open(f, "wb") as fh:
            fh.truncate(64 * MiB)
    escape = os.path.join(_POOL[0], f"{vid}.img")  # the right name in the pool, but a symlink out of it
    os.symlink(outside_img, escape)
    _LUNS.append(escape)
    other_vid, other_lun = make_lun(case)  # another volume's LUN in the pool
    for lun in (str(outside), str(outside_img), escape, other_lun, f"{_POOL[0]}/../volumes/{vid}.img"):
        for cap in (mount_cap(), block_cap()):
            request = pb.NodeStageVolumeRequest(volume_id=vid, staging_target_path=str(case / "st"),
                                                volume_capability=cap, **{where: {"lunPath": lun}})
            with pytest.raises(grpc.RpcError) as info:
                node.NodeStageVolume(request)
            assert info.value.code() == Code.INVALID_ARGUMENT, (lun, info.value.details())
    for f in (outside, outside_img, other_lun):
        assert not _loop_backed_by(str(f)), f
        assert output(["blkid", "-p", "-o", "value", "-s", "TYPE", str(f)], check=False).strip() == "", f
        assert open(f, "rb").read(1 << 20) == bytes(1 << 20)  # not formatted
    assert not (case / "st").exists() or attach.mount_at(str(case / "st")) is None


def test_csi_sanity_fake_publish_context_still_gets_invalid_argument_for_the_capability(node, case):
    vid = "vol-" + uuid.uuid4().hex
    assert code_of(node.NodeStageVolume, pb.NodeStageVolumeRequest(
        volume_id=vid, staging_target_path=str(case / "st"),
        publish_context={"device": "/dev/mock"})) == Code.INVALID_ARGUMENT
    assert code_of(node.NodeStageVolume, pb.NodeStageVolumeRequest(
        volume_id=vid, staging_target_path=str(case / "st"), volume_capability=mount_cap(),
        publish_context={"device": "/dev/mock"})) == Code.INVALID_ARGUMENT
