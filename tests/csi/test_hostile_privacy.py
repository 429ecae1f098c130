"""Hostile: volumes are private to their owner. The data dir, the pool and every LUN are
0700/0600 even when they were made 0755/0644 before and the daemon runs under umask 0;
filesystem volumes are mounted nosuid,nodev (staged and published, read-only too) unless
the class asks for suid/dev; dangerous mount flags are refused; a staging or target path
with a symbolic link in it (last component or parent) is refused and nothing is mounted
through it, and a link swapped in after the check is not followed."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from csi_support import (
    MiB, NODE_ID, SMALL, Code, assert_code, block_cap, loop_devices_under, mount_cap, mounts_under, running_driver,
    unique,
)
from csi import attach, node_paths
from csi.errors import CsiError
from csi.proto import csi_pb2 as pb

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="loop devices and mounts need root")


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def mount_options(path: Path) -> set[str]:
    found = [m for m in attach.mounts() if m.mount_point == str(path)]
    assert found, f"{path} is not a mount point"
    return set(found[-1].options)


def made_by_the_driver(drv, volume_ids: list[str], snapshot_ids: list[str]) -> dict[Path, int]:
    """Every path whose mode the driver owns, and the mode it must have."""
    pool = drv.data_dir / "pool"
    want = {drv.data_dir: 0o700, pool: 0o700, pool / "volumes": 0o700, pool / "snapshots": 0o700,
            drv.data_dir / "pool.img": 0o600}
    want.update({pool / "volumes" / f"{v}.img": 0o600 for v in volume_ids})
    want.update({pool / "snapshots" / f"{s}.img": 0o600 for s in snapshot_ids})
    return want


def test_data_dir_pool_and_luns_are_private_even_when_made_open_before(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("priv") / "d"
    data_dir.mkdir(mode=0o755)
    (data_dir / "pool").mkdir(mode=0o755)  # as a hostPath volume or an older version leaves them
    os.chmod(data_dir, 0o755)
    old = os.umask(0)  # the daemon inherits the most open umask there is
    try:
        with running_driver(data_dir) as drv:
            ctl = drv.controller
            cap = mount_cap()
            vol = ctl.CreateVolume(pb.CreateVolumeRequest(name=unique(), volume_capabilities=[cap],
                                                          capacity_range=pb.CapacityRange(required_bytes=SMALL))).volume
            snap = ctl.CreateSnapshot(pb.CreateSnapshotRequest(name=unique("s"), source_volume_id=vol.volume_id)).snapshot
            clone = ctl.CreateVolume(pb.CreateVolumeRequest(
                name=unique(), volume_capabilities=[cap], volume_content_source=pb.VolumeContentSource(
                    volume=pb.VolumeContentSource.VolumeSource(volume_id=vol.volume_id)))).volume
            restore = ctl.CreateVolume(pb.CreateVolumeRequest(
                name=unique(), volume_capabilities=[cap], volume_content_source=pb.VolumeContentSource(
                    snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id=snap.snapshot_id)))).volume
            group = drv.group.CreateVolumeGroupSnapshot(pb.CreateVolumeGroupSnapshotRequest(
                name=unique("g"), source_volume_ids=[vol.volume_id])).group_snapshot
            volumes = [vol.volume_id, clone.volume_id, restore.volume_id]
            snapshots = [snap.snapshot_id] + [s.snapshot_id for s in group.snapshots]
            want = made_by_the_driver(drv, volumes, snapshots)
            assert attach.mount_at(str(drv.data_dir / "pool")) is not None  # the XFS image's own root
            assert {str(p): oct(mode(p)) for p in want} == {str(p): oct(m) for p, m in want.items()}
            for path in want:  # readable by all, as an older version left them (the pool is mounted now)
                os.chmod(path, 0o755 if path.is_dir() else 0o644)
        with running_driver(data_dir) as drv:
            assert {str(p): oct(mode(p)) for p in want} == {str(p): oct(m) for p, m in want.items()}
            drv.group.DeleteVolumeGroupSnapshot(pb.DeleteVolumeGroupSnapshotRequest(
                group_snapshot_id=group.group_snapshot_id))
            drv.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
            for volume_id in volumes:
                drv.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume_id))
    finally:
        os.umask(old)


# ---------------------------------------------------------------- nosuid, nodev


def device_node_opens(directory: Path) -> bool:
    """Make a character device node (the null device) in the volume and try it: on a nodev
    mount the kernel refuses to open it."""
    node = directory / "null"
    if not node.exists():
        os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    try:
        os.close(os.open(node, os.O_WRONLY))
        return True
    except PermissionError:
        return False


@pytest.mark.parametrize("readonly", [False, True], ids=["rw", "ro"])
def test_filesystem_volume_is_staged_and_published_nosuid_nodev(driver, res, readonly):
    cap = mount_cap()
    vol = res.volume(cap=cap)
    ctx = res.publish(vol.volume_id, cap)
    res.stage(vol.volume_id, cap, ctx)
    target = res.node_publish(vol.volume_id, cap, ctx, readonly=readonly)
    for where in (res.staging, target):
        assert {"nosuid", "nodev"} <= mount_options(where), where
    assert not device_node_opens(res.staging)  # the node made on the volume is inert
    assert not device_node_opens(target)
    (res.staging / "null").unlink()
    assert ("ro" in mount_options(target)) == readonly


def test_storage_class_suid_and_dev_mount_options_are_honoured(driver, res):
    cap = mount_cap(flags=("suid", "dev", "noatime"))
    vol = res.volume(cap=cap)
    target = res.attach(vol.volume_id, cap)
    for where in (res.staging, target):
        options = mount_options(where)
        assert "nosuid" not in options and "nodev" not in options and "noatime" in options
    assert device_node_opens(target)
    (target / "null").unlink()


DANGEROUS = ["bind", "rbind,ro", "remount", "move", "make-shared", "loop", "offset=4096", "X-mount.mkdir",
             "x-systemd.automount", "helper=foo", "logdev=/dev/vda", "journal_path=/etc/shadow", "device=/dev/sda",
             "context=system_u:object_r:container_file_t:s0", "errors=panic", "usrjquota=/etc/passwd", "user",
             "a b", "-o", "ro\nrw", "'quoted'", "x" * 300]


@pytest.mark.parametrize("flag", DANGEROUS, ids=lambda f: repr(f)[:30])
def test_dangerous_or_malformed_mount_flags_are_refused_at_create_and_stage(driver, res, flag):
    bad = mount_cap(flags=(flag,))
    msg = assert_code(Code.INVALID_ARGUMENT, driver.controller.CreateVolume, pb.CreateVolumeRequest(
        name=unique(), volume_capabilities=[bad], capacity_range=pb.CapacityRange(required_bytes=SMALL)))
    assert "mount flag" in msg and len(msg) < 300
    vol = res.volume()
    ctx = res.publish(vol.volume_id, mount_cap())
    msg = assert_code(Code.INVALID_ARGUMENT, driver.node.NodeStageVolume, pb.NodeStageVolumeRequest(
        volume_id=vol.volume_id, staging_target_path=str(res.staging), volume_capability=bad, publish_context=ctx))
    assert "mount flag" in msg
    assert mounts_under(str(res.staging)) == [] and loop_devices_under(str(driver.pool)) == []


# ---------------------------------------------------------------- symbolic links in node paths


@pytest.fixture
def elsewhere(tmp_path) -> Path:
    """A directory a link points at: nothing may ever be mounted there."""
    place = tmp_path / "elsewhere"
    (place / "sub").mkdir(parents=True)
    yield place
    assert mounts_under(str(place)) == [], "a volume was mounted through a link"


def through_a_link(res, tmp_path: Path, elsewhere: Path, access: str, where: str, leaf: str):
    """A controller-published volume, and a path whose last component or parent is a link
    to `elsewhere`: (capability, volume ID, publish context, path)."""
    cap = mount_cap() if access == "mount" else block_cap()
    vol = res.volume(cap=cap)
    ctx = res.publish(vol.volume_id, cap)
    link = tmp_path / "link"
    link.symlink_to(elsewhere / "sub" if where == "last" else elsewhere)
    return cap, vol.volume_id, ctx, link if where == "last" else link / leaf


@pytest.mark.parametrize("access", ["mount", "block"])
@pytest.mark.parametrize("where", ["last", "parent"])
def test_staging_path_through_a_link_is_refused_and_nothing_is_mounted(driver, res, elsewhere, tmp_path, access,
                                                                      where):
    cap, volume_id, ctx, staging = through_a_link(res, tmp_path, elsewhere, access, where, "sub")
    msg = assert_code(Code.INVALID_ARGUMENT, driver.node.NodeStageVolume, pb.NodeStageVolumeRequest(
        volume_id=volume_id, staging_target_path=str(staging), volume_capability=cap, publish_context=ctx))
    assert "symbolic link" in msg
    assert loop_devices_under(str(driver.pool)) == [] and os.listdir(elsewhere / "sub") == []


@pytest.mark.parametrize("access", ["mount", "block"])
@pytest.mark.parametrize("where", ["last", "parent"])
def test_target_path_through_a_link_is_refused_and_nothing_is_mounted(driver, res, elsewhere, tmp_path, access,
                                                                     where):
    cap, volume_id, ctx, target = through_a_link(res, tmp_path, elsewhere, access, where, "target")
    res.stage(volume_id, cap, ctx)
    msg = assert_code(Code.INVALID_ARGUMENT, driver.node.NodePublishVolume, pb.NodePublishVolumeRequest(
        volume_id=volume_id, staging_target_path=str(res.staging), target_path=str(target),
        volume_capability=cap, publish_context=ctx))
    assert "symbolic link" in msg
    assert not (elsewhere / "target").exists()


def test_unpublish_and_unstage_through_a_link_are_refused_and_leave_the_volume_mounted(driver, res, tmp_path):
    vol = res.volume()
    target = res.attach(vol.volume_id, mount_cap())
    (tmp_path / "tlink").symlink_to(target)
    (tmp_path / "slink").symlink_to(res.staging)
    assert_code(Code.INVALID_ARGUMENT, driver.node.NodeUnpublishVolume,
                pb.NodeUnpublishVolumeRequest(volume_id=vol.volume_id, target_path=str(tmp_path / "tlink")))
    assert_code(Code.INVALID_ARGUMENT, driver.node.NodeUnstageVolume,
                pb.NodeUnstageVolumeRequest(volume_id=vol.volume_id, staging_target_path=str(tmp_path / "slink")))
    assert attach.mount_at(str(target)) is not None and attach.mount_at(str(res.staging)) is not None


def test_a_link_swapped_in_after_the_check_is_not_followed(tmp_path):
    """The check and the mount are apart in time; the mount goes through a descriptor of
    the directory that was checked, so a parent replaced by a link meanwhile does not
    send the mount elsewhere."""
    source, parent, outside = tmp_path / "source", tmp_path / "parent", tmp_path / "outside"
    (source).mkdir()
    (source / "marker").write_text("the volume")
    node_paths.make_dirs(str(parent / "target"))
    (outside / "target").mkdir(parents=True)
    try:
        with node_paths.pinned(str(parent / "target")) as where:
            parent.rename(tmp_path / "moved")
            parent.symlink_to(outside)  # what an attacker swaps in
            subprocess.run(["mount", "--no-canonicalize", "--bind", str(source), where], check=True)
        assert mounts_under(str(outside)) == []
        assert (tmp_path / "moved" / "target" / "marker").read_text() == "the volume"
    finally:
        for point in mounts_under(str(tmp_path)):
            subprocess.run(["umount", point], check=False)
    with pytest.raises(CsiError) as info:  # and the node never creates directories through a link
        node_paths.make_dirs(str(parent / "new" / "dir"))
    assert info.value.code == Code.INVALID_ARGUMENT
    assert not (outside / "new").exists()
    with pytest.raises(CsiError):
        node_paths.create_file(str(parent / "lun"))
    assert not (outside / "lun").exists()
