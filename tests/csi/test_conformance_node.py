"""Conformance: the Node service through a real `pvlun serve` — ControllerPublish, then
NodeStage/NodePublish with real loop devices, mkfs and mounts, for block and mount access;
data written through the published path lands in the LUN file; stats; NodeExpandVolume;
and cleanup leaves the target and staging dirs empty, as csi-sanity's Teardown needs."""

from __future__ import annotations

import errno
import mmap
import os
import stat
import subprocess
import time

import grpc
import pytest

from csi_support import (
    write_at,
    MiB, NODE2_ID, NODE_ID, SMALL, UNKNOWN_VOLUME_ID, Code, assert_code, block_cap, mount_cap, read_at, unique,
)
from csi.proto import csi_pb2 as pb

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="loop devices and mounts need root")

RPC = pb.NodeServiceCapability.RPC.Type
Unit = pb.VolumeUsage.Unit
SANITY_KNOWN = {"STAGE_UNSTAGE_VOLUME", "GET_VOLUME_STATS", "EXPAND_VOLUME", "VOLUME_CONDITION",
                "SINGLE_NODE_MULTI_WRITER", "VOLUME_MOUNT_GROUP"}
ACCESS = {"block": block_cap, "mount": mount_cap}


def read_direct(path: str, offset: int, length: int) -> bytes:
    """Read past every page cache (block sizes only): what is really on the device or file."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, length)
        assert os.preadv(fd, [buf], offset) == length
        return bytes(buf)
    finally:
        os.close(fd)


write_device = write_at  # a published block device is written like a LUN file


def write_file(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def blkid_type(path: str) -> str:
    out = subprocess.run(["blkid", "-p", "-o", "value", "-s", "TYPE", path], capture_output=True, text=True)
    return out.stdout.strip()


def mount_options(path: str) -> set[str]:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == str(path):
                return set(fields[5].split(","))
    raise AssertionError(f"{path} is not a mount point")


def stats(driver, volume_id: str, path) -> pb.NodeGetVolumeStatsResponse:
    return driver.node.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(volume_id=volume_id, volume_path=str(path)))


def unpublish_and_unstage(driver, res, volume_id: str) -> None:
    driver.node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=str(res.target)))
    driver.node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(volume_id=volume_id,
                                                              staging_target_path=str(res.staging)))


# ---------------------------------------------------------------- info and capabilities


def test_node_get_info_reports_node_id_limit_and_topology(driver):
    info = driver.node.NodeGetInfo(pb.NodeGetInfoRequest())
    assert info.node_id == NODE_ID
    assert info.max_volumes_per_node >= 0
    assert info.accessible_topology.segments


def test_node_capabilities_are_known_to_csi_sanity(driver):
    caps = driver.node.NodeGetCapabilities(pb.NodeGetCapabilitiesRequest()).capabilities
    names = {RPC.Name(c.rpc.type) for c in caps}
    assert {"STAGE_UNSTAGE_VOLUME", "GET_VOLUME_STATS", "EXPAND_VOLUME"} <= names <= SANITY_KNOWN


# ---------------------------------------------------------------- missing fields and unknown volumes


def test_node_stage_missing_fields_are_invalid_argument(driver, res):
    vol = res.volume()
    mock = {"device": "/dev/mock"}
    stage = driver.node.NodeStageVolume
    assert_code(Code.INVALID_ARGUMENT, stage, pb.NodeStageVolumeRequest(
        staging_target_path=str(res.staging), volume_capability=mount_cap(), publish_context=mock))
    assert_code(Code.INVALID_ARGUMENT, stage, pb.NodeStageVolumeRequest(
        volume_id=vol.volume_id, volume_capability=mount_cap(), publish_context=mock))
    assert_code(Code.INVALID_ARGUMENT, stage, pb.NodeStageVolumeRequest(
        volume_id=vol.volume_id, staging_target_path=str(res.staging), publish_context=mock))


def test_node_unstage_missing_fields_are_invalid_argument(driver, res):
    unstage = driver.node.NodeUnstageVolume
    assert_code(Code.INVALID_ARGUMENT, unstage, pb.NodeUnstageVolumeRequest(staging_target_path=str(res.staging)))
    assert_code(Code.INVALID_ARGUMENT, unstage, pb.NodeUnstageVolumeRequest(volume_id=UNKNOWN_VOLUME_ID))


def test_node_publish_missing_fields_are_invalid_argument(driver, res):
    publish = driver.node.NodePublishVolume
    fake = "fake-vol-id-0123456789"
    assert_code(Code.INVALID_ARGUMENT, publish, pb.NodePublishVolumeRequest(
        target_path=str(res.target), staging_target_path=str(res.staging), volume_capability=mount_cap()))
    assert_code(Code.INVALID_ARGUMENT, publish, pb.NodePublishVolumeRequest(
        volume_id=fake, staging_target_path=str(res.staging), volume_capability=mount_cap()))
    assert_code(Code.INVALID_ARGUMENT, publish, pb.NodePublishVolumeRequest(
        volume_id=fake, target_path=str(res.target), staging_target_path=str(res.staging)))


def test_node_unpublish_missing_fields_are_invalid_argument(driver, res):
    unpublish = driver.node.NodeUnpublishVolume
    assert_code(Code.INVALID_ARGUMENT, unpublish, pb.NodeUnpublishVolumeRequest(target_path=str(res.target)))
    assert_code(Code.INVALID_ARGUMENT, unpublish, pb.NodeUnpublishVolumeRequest(volume_id=UNKNOWN_VOLUME_ID))


def test_node_get_volume_stats_missing_fields_are_invalid_argument_and_unknown_is_not_found(driver):
    get = driver.node.NodeGetVolumeStats
    assert_code(Code.INVALID_ARGUMENT, get, pb.NodeGetVolumeStatsRequest(volume_path="some/path"))
    assert_code(Code.INVALID_ARGUMENT, get, pb.NodeGetVolumeStatsRequest(volume_id=UNKNOWN_VOLUME_ID))
    for volume_id in ("fake-vol-id-0123456789", UNKNOWN_VOLUME_ID, "../etc/passwd"):
        assert_code(Code.NOT_FOUND, get, pb.NodeGetVolumeStatsRequest(volume_id=volume_id, volume_path="some/path"))


def test_node_expand_missing_fields_are_invalid_argument_and_unknown_is_not_found(driver, res):
    vol = res.volume()
    expand = driver.node.NodeExpandVolume
    assert_code(Code.INVALID_ARGUMENT, expand, pb.NodeExpandVolumeRequest(volume_path=str(res.target_dir)))
    assert_code(Code.INVALID_ARGUMENT, expand, pb.NodeExpandVolumeRequest(volume_id=vol.volume_id))
    assert_code(Code.NOT_FOUND, expand, pb.NodeExpandVolumeRequest(volume_id="fake-vol-id-0123456789",
                                                                  volume_path="some/path"))


@pytest.mark.parametrize("volume_id", ["fake-vol-id", "../etc/passwd", "/abs", "vol-\x00"])
def test_node_stage_of_a_malformed_volume_id_is_not_found_and_stages_nothing(driver, res, volume_id):
    assert_code(Code.NOT_FOUND, driver.node.NodeStageVolume, pb.NodeStageVolumeRequest(
        volume_id=volume_id, staging_target_path=str(res.staging), volume_capability=block_cap(),
        publish_context={"lunPath": str(driver.pool / "volumes" / "x.img")}))
    assert os.listdir(res.staging) == []


def test_node_stage_with_the_lun_path_of_another_volume_is_refused(driver, res):
    one, two = res.volume(cap=block_cap()), res.volume(cap=block_cap())
    ctx = res.publish(two.volume_id, block_cap())
    err = assert_code(Code.INVALID_ARGUMENT, driver.node.NodeStageVolume, pb.NodeStageVolumeRequest(
        volume_id=one.volume_id, staging_target_path=str(res.staging), volume_capability=block_cap(),
        publish_context=ctx))
    assert ("volumeID" if driver.backend == "iscsi" else "lunPath") in err
    assert os.listdir(res.staging) == []


def test_node_stage_with_a_relative_staging_path_is_invalid_argument(driver, res):
    vol = res.volume()
    ctx = res.publish(vol.volume_id, mount_cap())
    assert_code(Code.INVALID_ARGUMENT, driver.node.NodeStageVolume, pb.NodeStageVolumeRequest(
        volume_id=vol.volume_id, staging_target_path="relative/staging", volume_capability=mount_cap(),
        publish_context=ctx))


def test_unpublish_and_unstage_of_a_volume_never_staged_are_ok_or_not_found(driver, res):
    vol = res.volume()
    for call, req in ((driver.node.NodeUnpublishVolume,
                       pb.NodeUnpublishVolumeRequest(volume_id=vol.volume_id, target_path=str(res.target))),
                      (driver.node.NodeUnstageVolume,
                       pb.NodeUnstageVolumeRequest(volume_id=vol.volume_id, staging_target_path=str(res.staging)))):
        try:
            call(req)
        except grpc.RpcError as err:
            assert err.code() == Code.NOT_FOUND, err.details()


# ---------------------------------------------------------------- lifecycle: both access types


@pytest.mark.parametrize("access", ["block", "mount"])
def test_lifecycle_is_idempotent_and_leaves_nothing_behind(driver, res, access):
    cap = ACCESS[access]()
    assert driver.node.NodeGetInfo(pb.NodeGetInfoRequest()).node_id == NODE_ID
    vol = res.volume(cap=cap)
    ctx = res.publish(vol.volume_id, cap)
    for _ in range(10):  # csi-sanity's "should be idempotent" repeats each call 10 times
        res.stage(vol.volume_id, cap, ctx)
    for _ in range(10):
        res.node_publish(vol.volume_id, cap, ctx)
    st = os.stat(res.target)
    assert stat.S_ISBLK(st.st_mode) if access == "block" else stat.S_ISDIR(st.st_mode)
    usage = stats(driver, vol.volume_id, res.target).usage
    assert usage
    # the res fixture now unpublishes, unstages, unpublishes on the controller and deletes;
    # then the target and staging dirs must be empty.


@pytest.mark.parametrize("access", ["block", "mount"])
def test_node_unpublish_removes_the_target(driver, res, access):
    cap = ACCESS[access]()
    vol = res.volume(cap=cap)
    target = res.attach(vol.volume_id, cap)
    assert os.path.exists(target)
    for _ in range(2):
        driver.node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=vol.volume_id,
                                                                      target_path=str(target)))
    assert not os.path.lexists(target)


@pytest.mark.parametrize("access", ["block", "mount"])
def test_node_unstage_leaves_the_staging_dir_empty_and_detaches_the_loop_device(driver, res, access):
    cap = ACCESS[access]()
    vol = res.volume(cap=cap)
    res.attach(vol.volume_id, cap)
    lun = str(driver.node_file(vol.volume_id))
    assert loop_devices_of(lun)
    unpublish_and_unstage(driver, res, vol.volume_id)
    driver.node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(volume_id=vol.volume_id,
                                                              staging_target_path=str(res.staging)))
    assert os.listdir(res.staging) == []
    deadline = time.monotonic() + 5  # a detach waits for the last opener (udev probing, say) to close
    while loop_devices_of(lun) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert loop_devices_of(lun) == []


def loop_devices_of(lun: str) -> list[str]:
    if not os.path.exists(lun):  # an iscsi node's export goes with its storage daemon
        return []
    out = subprocess.run(["losetup", "--noheadings", "--output", "NAME", "--associated", lun],
                         capture_output=True, text=True, check=True).stdout
    return out.split()


@pytest.mark.parametrize("access", ["block", "mount"])
def test_node_get_volume_stats_on_a_path_not_holding_the_volume_is_not_found(driver, res, access):
    cap = ACCESS[access]()
    vol = res.volume(cap=cap)
    res.attach(vol.volume_id, cap)
    other = res.volume(cap=cap)
    for volume_id, path in ((vol.volume_id, "some/path"), (vol.volume_id, str(res.target_dir)),
                            (other.volume_id, str(res.target))):
        assert_code(Code.NOT_FOUND, driver.node.NodeGetVolumeStats,
                    pb.NodeGetVolumeStatsRequest(volume_id=volume_id, volume_path=path))


# ---------------------------------------------------------------- block


def test_block_target_is_the_lun_bytes_written_through_it_land_in_the_lun_file(driver, res):
    vol = res.volume(cap=block_cap())
    target = res.attach(vol.volume_id, block_cap())
    data = os.urandom(64 * 1024)
    write_device(str(target), 3 * MiB, data)
    assert read_direct(str(driver.lun(vol.volume_id)), 3 * MiB, len(data)) == data


def test_block_stats_report_the_device_size_in_bytes(driver, res):
    vol = res.volume(cap=block_cap())
    target = res.attach(vol.volume_id, block_cap())
    rsp = stats(driver, vol.volume_id, target)
    assert [(u.unit, u.total) for u in rsp.usage] == [(Unit.BYTES, SMALL)]
    assert not rsp.volume_condition.abnormal


def test_block_readonly_publish_refuses_writes(driver, res):
    vol = res.volume(cap=block_cap())
    target = res.attach(vol.volume_id, block_cap(), readonly=True)
    with pytest.raises(OSError) as info:
        write_device(str(target), 0, b"x" * 4096)
    assert info.value.errno in (errno.EROFS, errno.EPERM, errno.EACCES)
    assert read_at(str(driver.lun(vol.volume_id)), 0, 4096) == b"\0" * 4096


def test_block_node_expand_after_controller_expand_grows_the_device(driver, res):
    vol = res.volume(cap=block_cap())
    target = res.attach(vol.volume_id, block_cap())
    grown = driver.controller.ControllerExpandVolume(pb.ControllerExpandVolumeRequest(
        volume_id=vol.volume_id, capacity_range=pb.CapacityRange(required_bytes=2 * SMALL),
        volume_capability=block_cap()))
    assert grown.capacity_bytes == 2 * SMALL
    rsp = driver.node.NodeExpandVolume(pb.NodeExpandVolumeRequest(
        volume_id=vol.volume_id, volume_path=str(target), capacity_range=pb.CapacityRange(required_bytes=2 * SMALL)))
    assert rsp.capacity_bytes in (0, 2 * SMALL)
    with open(target, "rb") as f:
        assert f.seek(0, os.SEEK_END) == 2 * SMALL
    data = os.urandom(4096)
    write_device(str(target), 2 * SMALL - 4096, data)  # the new space is usable
    assert read_direct(str(driver.lun(vol.volume_id)), 2 * SMALL - 4096, 4096) == data


@pytest.mark.file_only("tgtd keeps the LUN file open on the storage host: an unlinked file goes on serving, as "
                       "a real target's would; an iSCSI path's condition is tested in test_iscsi_resilience.py")
def test_block_volume_condition_is_abnormal_once_the_lun_file_is_gone(driver, res):
    vol = res.volume(cap=block_cap())
    target = res.attach(vol.volume_id, block_cap())
    os.unlink(driver.lun(vol.volume_id))
    rsp = stats(driver, vol.volume_id, target)
    assert rsp.volume_condition.abnormal and rsp.volume_condition.message
    # cleanup (node unpublish/unstage, controller unpublish, delete) must still succeed


def test_block_multi_writer_volume_is_shared_by_both_nodes_for_live_migration(driver, res, tmp_path):
    cap = block_cap("MULTI_NODE_MULTI_WRITER")
    vol = res.volume(cap=cap)
    one = res.attach(vol.volume_id, cap)
    ctx2 = res.publish(vol.volume_id, cap, NODE2_ID)
    staging2, targets2 = tmp_path / "staging-2", tmp_path / "targets-2"
    os.mkdir(staging2)
    os.mkdir(targets2)
    res.stage(vol.volume_id, cap, ctx2, staging=staging2, node=driver.node2)
    two = res.node_publish(vol.volume_id, cap, ctx2, target=targets2 / "target", staging=staging2, node=driver.node2)
    data = os.urandom(8192)
    write_device(str(one), 5 * MiB, data)
    assert read_direct(str(two), 5 * MiB, len(data)) == data
    listed = driver.controller.ControllerGetVolume(pb.ControllerGetVolumeRequest(volume_id=vol.volume_id))
    assert sorted(listed.status.published_node_ids) == sorted([NODE_ID, NODE2_ID])


def test_second_node_refuses_a_staging_path_of_a_different_access_type(driver, res):
    vol = res.volume(cap=block_cap())
    ctx = res.publish(vol.volume_id, block_cap())
    res.stage(vol.volume_id, block_cap(), ctx)
    assert_code(Code.ALREADY_EXISTS, driver.node.NodeStageVolume, pb.NodeStageVolumeRequest(
        volume_id=vol.volume_id, staging_target_path=str(res.staging), volume_capability=mount_cap(),
        publish_context=ctx))


# ---------------------------------------------------------------- mount


def test_mount_formats_ext4_by_default_and_file_data_lands_in_the_lun(driver, res):
    vol = res.volume()
    target = res.attach(vol.volume_id, mount_cap())
    marker = b"pvlun-conformance-" + os.urandom(4078)
    write_file(os.path.join(target, "data.bin"), marker)
    unpublish_and_unstage(driver, res, vol.volume_id)
    lun = str(driver.lun(vol.volume_id))
    assert blkid_type(lun) == "ext4"
    with open(lun, "rb") as f:
        assert marker in f.read()


def test_mount_keeps_its_files_when_staged_again(driver, res):
    vol = res.volume()
    target = res.attach(vol.volume_id, mount_cap())
    write_file(os.path.join(target, "keep.txt"), b"still here")
    unpublish_and_unstage(driver, res, vol.volume_id)
    ctx = res.publish(vol.volume_id, mount_cap())
    res.stage(vol.volume_id, mount_cap(), ctx)
    target = res.node_publish(vol.volume_id, mount_cap(), ctx)
    with open(os.path.join(target, "keep.txt"), "rb") as f:
        assert f.read() == b"still here"


def test_mount_xfs_by_fs_type(driver, res):
    cap = mount_cap(fs_type="xfs")
    vol = res.volume(size=300 * MiB, cap=cap)
    target = res.attach(vol.volume_id, cap)
    assert blkid_type(str(driver.lun(vol.volume_id))) == "xfs"
    write_file(os.path.join(target, "x"), b"xfs data")
    units = {u.unit for u in stats(driver, vol.volume_id, target).usage}
    assert units == {Unit.BYTES, Unit.INODES}


def test_mount_stats_report_bytes_and_inodes(driver, res):
    vol = res.volume()
    target = res.attach(vol.volume_id, mount_cap())
    write_file(os.path.join(target, "f"), os.urandom(1 * MiB))
    rsp = stats(driver, vol.volume_id, target)
    usage = {u.unit: u for u in rsp.usage}
    assert set(usage) == {Unit.BYTES, Unit.INODES}
    st = os.statvfs(target)
    assert usage[Unit.BYTES].total == st.f_blocks * st.f_frsize
    assert usage[Unit.BYTES].used >= 1 * MiB
    assert 0 < usage[Unit.BYTES].available < usage[Unit.BYTES].total
    assert usage[Unit.INODES].total == st.f_files and usage[Unit.INODES].used >= 1
    assert not rsp.volume_condition.abnormal
    staged = stats(driver, vol.volume_id, res.staging)  # the staging path names the volume too
    assert {u.unit for u in staged.usage} == {Unit.BYTES, Unit.INODES}


def test_mount_readonly_publish_refuses_writes(driver, res):
    vol = res.volume()
    ctx = res.publish(vol.volume_id, mount_cap())
    res.stage(vol.volume_id, mount_cap(), ctx)
    target = res.node_publish(vol.volume_id, mount_cap(), ctx, readonly=True)
    with pytest.raises(OSError) as info:
        write_file(os.path.join(target, "nope"), b"x")
    assert info.value.errno == errno.EROFS


def test_mount_flags_are_honoured(driver, res):
    cap = mount_cap(flags=("noatime", "nodev"))
    vol = res.volume(cap=cap)
    target = res.attach(vol.volume_id, cap)
    options = mount_options(target)
    assert {"noatime", "nodev"} <= options


def test_mount_node_expand_after_controller_expand_grows_the_filesystem(driver, res):
    vol = res.volume()
    target = res.attach(vol.volume_id, mount_cap())
    before = os.statvfs(target)
    grown = driver.controller.ControllerExpandVolume(pb.ControllerExpandVolumeRequest(
        volume_id=vol.volume_id, capacity_range=pb.CapacityRange(required_bytes=4 * SMALL),
        volume_capability=mount_cap()))
    assert grown.capacity_bytes == 4 * SMALL and grown.node_expansion_required
    # as csi-sanity sends it: no volume_capability, no staging_target_path
    driver.node.NodeExpandVolume(pb.NodeExpandVolumeRequest(
        volume_id=vol.volume_id, volume_path=str(target), capacity_range=pb.CapacityRange(required_bytes=4 * SMALL)))
    after = os.statvfs(target)
    assert after.f_blocks * after.f_frsize > 3 * before.f_blocks * before.f_frsize
    write_file(os.path.join(target, "after-grow"), b"ok")


def test_single_node_single_writer_published_at_a_second_target_is_failed_precondition(driver, res):
    cap = mount_cap("SINGLE_NODE_SINGLE_WRITER")
    vol = res.volume(cap=cap)
    ctx = res.publish(vol.volume_id, cap)
    res.stage(vol.volume_id, cap, ctx)
    res.node_publish(vol.volume_id, cap, ctx)
    other = res.target_dir / "other_target"
    assert_code(Code.FAILED_PRECONDITION, driver.node.NodePublishVolume, pb.NodePublishVolumeRequest(
        volume_id=vol.volume_id, staging_target_path=str(res.staging), target_path=str(other),
        volume_capability=cap, publish_context=ctx))
    assert not os.path.lexists(other)


def test_single_node_multi_writer_can_be_published_at_two_targets(driver, res):
    cap = mount_cap("SINGLE_NODE_MULTI_WRITER")
    vol = res.volume(cap=cap)
    ctx = res.publish(vol.volume_id, cap)
    res.stage(vol.volume_id, cap, ctx)
    first = res.node_publish(vol.volume_id, cap, ctx)
    second = res.node_publish(vol.volume_id, cap, ctx, target=res.target_dir / "second")
    write_file(os.path.join(first, "shared"), b"both")
    with open(os.path.join(second, "shared"), "rb") as f:
        assert f.read() == b"both"


def test_node_stage_of_a_blank_volume_read_only_is_failed_precondition(driver, res):
    cap = mount_cap("SINGLE_NODE_READER_ONLY")
    vol = res.volume(cap=cap)
    ctx = res.publish(vol.volume_id, cap, readonly=True)
    assert_code(Code.FAILED_PRECONDITION, driver.node.NodeStageVolume, pb.NodeStageVolumeRequest(
        volume_id=vol.volume_id, staging_target_path=str(res.staging), volume_capability=cap, publish_context=ctx))
    assert os.listdir(res.staging) == []


def test_a_restored_snapshot_of_a_mounted_volume_mounts_with_its_files(driver, res):
    vol = res.volume()
    target = res.attach(vol.volume_id, mount_cap())
    write_file(os.path.join(target, "before-snapshot"), b"v1")
    os.sync()
    snap = res.snapshot(vol.volume_id)
    restored = res.volume(name=unique(), volume_content_source=pb.VolumeContentSource(
        snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id=snap.snapshot_id)))
    unpublish_and_unstage(driver, res, vol.volume_id)
    target = res.attach(restored.volume_id, mount_cap())
    with open(os.path.join(target, "before-snapshot"), "rb") as f:
        assert f.read() == b"v1"


# ---------------------------------------------------------------- only the volume's own LUN is ever touched


def _tmpfs_intact(path) -> bool:
    with open("/proc/self/mountinfo") as f:
        mounted = any(line.split()[4] == str(path) and " - tmpfs " in line for line in f)
    return mounted and (path / "keep").read_text() == "host data"


@pytest.mark.parametrize("access", ["block", "mount"])
def test_node_unpublish_unstage_stats_expand_never_touch_a_host_mount(driver, res, tmp_path, access):
    cap = ACCESS[access]()
    vol = res.volume(cap=cap)
    res.attach(vol.volume_id, cap)  # a volume of ours really is staged and published meanwhile
    host = tmp_path / "host"
    host.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(host)], check=True)
    try:
        (host / "keep").write_text("host data")
        for volume_id in (vol.volume_id, "vol-" + "2" * 32):
            for call, request in (
                    (driver.node.NodeUnpublishVolume,
                     pb.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=str(host))),
                    (driver.node.NodeUnstageVolume,
                     pb.NodeUnstageVolumeRequest(volume_id=volume_id, staging_target_path=str(host)))):
                try:
                    call(request)
                except grpc.RpcError as err:
                    assert err.code() == Code.NOT_FOUND, err.details()
                assert host.is_dir() and _tmpfs_intact(host)
            for path in ("/", str(host)):
                assert_code(Code.NOT_FOUND, driver.node.NodeGetVolumeStats,
                            pb.NodeGetVolumeStatsRequest(volume_id=volume_id, volume_path=path))
                assert_code(Code.NOT_FOUND, driver.node.NodeExpandVolume,
                            pb.NodeExpandVolumeRequest(volume_id=volume_id, volume_path=path))
        assert _tmpfs_intact(host)
        assert stats(driver, vol.volume_id, res.target).usage  # ours is still found
    finally:
        subprocess.run(["umount", "--lazy", str(host)], check=False)


@pytest.mark.parametrize("where", ["publish_context", "volume_context"])
def test_node_stage_of_a_lun_path_outside_the_pool_is_refused_and_attaches_nothing(driver, res, tmp_path, where):
    vol = res.volume(cap=mount_cap())
    fakes = [tmp_path / "anything" / vol.volume_id, tmp_path / f"{vol.volume_id}.img"]
    fakes[0].parent.mkdir()
    for fake in fakes:
        with open(fake, "wb") as f:
            f.truncate(SMALL)
    for fake in fakes:
        err = assert_code(Code.INVALID_ARGUMENT, driver.node.NodeStageVolume, pb.NodeStageVolumeRequest(
            volume_id=vol.volume_id, staging_target_path=str(res.staging), volume_capability=mount_cap(),
            **{where: {"lunPath": str(fake)}}))
        assert "lunPath" in err
        assert os.listdir(res.staging) == []
        attached = subprocess.run(["losetup", "--noheadings", "--associated", str(fake)],
                                  capture_output=True, text=True, check=True).stdout
        assert attached.strip() == ""
        assert blkid_type(str(fake)) == ""
