"""Hostile: thin provisioning never turns into I/O errors by surprise. On a small real XFS
reflink pool (64 MiB), volumes, snapshots, clones and restores provisioned up to the limit
are all rewritten in full through the node path without ENOSPC, and the next CreateVolume /
CreateSnapshot is RESOURCE_EXHAUSTED saying what is provisioned and what is left. Past
overcommit 1, the pool's real use is on /metrics and new snapshots and clones are refused
above 95% of it."""

from __future__ import annotations

import os
import time
import urllib.request
from pathlib import Path

import pytest

from csi_support import (
    MiB, Code, Resources, assert_code, block_cap, read_at, running_driver, unique, write_at, xfs_pool,
)
from csi.capacity import REFUSE_SNAPSHOTS_ABOVE
from csi.proto import csi_pb2 as pb

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="loop devices and mounts need root")

POOL = 64 * MiB
VOLUME = 8 * MiB
CAP = block_cap()


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    """`pvlun serve --pool` on a 64 MiB XFS filesystem of the module's own (overrides the
    conformance driver, so `res` works on it)."""
    root = tmp_path_factory.mktemp("cap")
    with xfs_pool(root / "pool.img", POOL) as pool, running_driver(root / "d", "--pool", str(pool)) as drv:
        drv.xfs = pool
        yield drv


def capacity(driver) -> int:
    return driver.controller.GetCapacity(pb.GetCapacityRequest()).available_capacity


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def lun(driver, volume_id: str) -> Path:
    return driver.xfs / "volumes" / f"{volume_id}.img"


def attach_at(res: Resources, volume_id: str, where: Path) -> Path:
    """ControllerPublish + NodeStage + NodePublish of a block volume; its device file."""
    ctx = res.publish(volume_id, CAP)
    res.stage(volume_id, CAP, ctx, staging=where / "staging")
    return res.node_publish(volume_id, CAP, ctx, target=where / "device", staging=where / "staging")


def rewrite(device: Path, size: int) -> bytes:
    """Fill the whole device with new random bytes, in 1 MiB writes, each flushed."""
    data = os.urandom(size)
    for offset in range(0, size, MiB):
        write_at(str(device), offset, data[offset:offset + MiB])
    return data


def test_volumes_and_snapshots_up_to_the_limit_are_rewritten_in_full_without_enospc(driver, res, tmp_path):
    volumes = [res.volume(size=VOLUME, cap=CAP) for _ in range(2)]
    devices = {}
    for i, vol in enumerate(volumes):
        devices[vol.volume_id] = attach_at(res, vol.volume_id, tmp_path / f"v{i}")
        rewrite(devices[vol.volume_id], VOLUME)
    # each snapshot, clone and restore shares every byte now, and may need its own later
    snaps = [res.snapshot(vol.volume_id) for vol in volumes]
    clone = res.volume(size=VOLUME, cap=CAP, volume_content_source=pb.VolumeContentSource(
        volume=pb.VolumeContentSource.VolumeSource(volume_id=volumes[0].volume_id)))
    restore = res.volume(size=VOLUME, cap=CAP, volume_content_source=pb.VolumeContentSource(
        snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id=snaps[1].snapshot_id)))
    last = res.volume(size=capacity(driver) // MiB * MiB, cap=CAP)  # what is left, to the MiB
    assert last.capacity_bytes >= MiB
    assert capacity(driver) < MiB
    for i, vol in enumerate([clone, restore, last]):
        devices[vol.volume_id] = attach_at(res, vol.volume_id, tmp_path / f"n{i}")

    sizes = {v.volume_id: v.capacity_bytes for v in [*volumes, clone, restore, last]}
    written = {volume_id: rewrite(device, sizes[volume_id]) for volume_id, device in devices.items()}

    for volume_id, data in written.items():  # every byte reached its LUN
        assert read_at(str(lun(driver, volume_id)), 0, len(data)) == data
    assert free_bytes(driver.xfs) < 6 * MiB  # the pool really is nearly full now: the test was not idle
    held = sum(sizes.values()) + len(snaps) * VOLUME
    msg = assert_code(Code.RESOURCE_EXHAUSTED, driver.controller.CreateVolume, pb.CreateVolumeRequest(
        name=unique(), volume_capabilities=[CAP], capacity_range=pb.CapacityRange(required_bytes=MiB)))
    assert f"{held / MiB:.1f} MiB is provisioned to 5 volumes and 2 snapshots" in msg
    assert "is left and 1.0 MiB was asked for" in msg
    msg = assert_code(Code.RESOURCE_EXHAUSTED, driver.controller.CreateSnapshot, pb.CreateSnapshotRequest(
        name=unique("snap"), source_volume_id=volumes[0].volume_id))
    assert "the snapshot needs 8.0 MiB" in msg and "left" in msg


# ---------------------------------------------------------------- overcommitted


@pytest.fixture(scope="module")
def thin(tmp_path_factory):
    root = tmp_path_factory.mktemp("thin")
    with xfs_pool(root / "pool.img", POOL) as pool, \
            running_driver(root / "d", "--pool", str(pool), "--overcommit", "3") as drv:
        drv.xfs = pool
        yield drv


def metrics(driver) -> dict[str, float]:
    """The pvlun_pool_* samples of the daemon's /metrics (its URL is written once the
    control plane runs, a little after the CSI sockets open)."""
    where = driver.data_dir / "metrics.url"
    deadline = time.monotonic() + 30
    while not where.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    url = where.read_text().strip()
    with urllib.request.urlopen(url, timeout=10) as rsp:
        text = rsp.read().decode()
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
            if line.startswith("pvlun_pool_")}


def test_overcommitted_pool_reports_its_real_use_and_refuses_snapshots_and_clones_above_95_percent(thin, tmp_path):
    res = Resources(thin, tmp_path)
    try:
        a = res.volume(size=30 * MiB, cap=CAP)
        b = res.volume(size=30 * MiB, cap=CAP)
        write_at(str(lun(thin, a.volume_id)), 0, os.urandom(30 * MiB))
        early = res.snapshot(a.volume_id)  # shares a's bytes: the pool's real use does not change
        first = metrics(thin)
        usable = first["pvlun_pool_usable_bytes"]
        assert first["pvlun_pool_used_bytes"] == 30 * MiB
        assert first["pvlun_pool_used_ratio"] == pytest.approx(30 * MiB / usable)
        assert first["pvlun_pool_provisioned_bytes"] == 90 * MiB and first["pvlun_pool_overcommit_ratio"] == 3
        assert 40 * MiB < usable <= free_bytes(thin.xfs) + 30 * MiB < POOL  # the filesystem's, not the image size
        res.snapshot(b.volume_id)  # below 95%: fine

        fill = int(usable * REFUSE_SNAPSHOTS_ABOVE) - 30 * MiB + MiB  # just past 95%
        write_at(str(lun(thin, b.volume_id)), 0, os.urandom(fill // MiB * MiB + MiB))
        now = metrics(thin)
        assert now["pvlun_pool_used_ratio"] > REFUSE_SNAPSHOTS_ABOVE
        for call, request in [
            (thin.controller.CreateSnapshot, pb.CreateSnapshotRequest(name=unique("snap"), source_volume_id=a.volume_id)),
            (thin.controller.CreateVolume, pb.CreateVolumeRequest(
                name=unique(), volume_capabilities=[CAP], volume_content_source=pb.VolumeContentSource(
                    volume=pb.VolumeContentSource.VolumeSource(volume_id=a.volume_id)))),
            (thin.controller.CreateVolume, pb.CreateVolumeRequest(
                name=unique(), volume_capabilities=[CAP], volume_content_source=pb.VolumeContentSource(
                    snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id=early.snapshot_id)))),
            (thin.group.CreateVolumeGroupSnapshot, pb.CreateVolumeGroupSnapshotRequest(
                name=unique("grp"), source_volume_ids=[a.volume_id])),
        ]:
            msg = assert_code(Code.RESOURCE_EXHAUSTED, call, request)
            assert "overcommitted x3" in msg and "above 95%" in msg, msg
        res.volume(size=2 * MiB, cap=CAP)  # a new empty volume is still thin provisioning's to give

        # freeing space lets snapshots in again
        thin.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=b.volume_id))
        res._undo.remove(("volume", (b.volume_id,)))
        res.snapshot(a.volume_id)
        assert metrics(thin)["pvlun_pool_used_ratio"] < 0.9
    finally:
        res.cleanup()


def test_an_overcommitted_pool_image_is_sparse_and_takes_host_blocks_only_as_volumes_are_written(
        tmp_path_factory, tmp_path):
    """Past overcommit 1 the user chose thin provisioning: the image is sparse at its whole
    --pool-size from the start, provisioning takes no host blocks, writing does, and what is
    provisioned may exceed the pool up to the ratio."""
    with running_driver(tmp_path_factory.mktemp("thin") / "d", "--overcommit", "4", pool_size=2 * 1024 * MiB) as drv:
        image = drv.data_dir / "pool.img"
        res = Resources(drv, tmp_path)
        try:
            vol = res.volume(size=800 * MiB, cap=CAP)
            st = image.stat()
            assert st.st_size == 2 * 1024 * MiB and st.st_blocks * 512 < 200 * MiB
            write_at(str(drv.data_dir / "pool" / "volumes" / f"{vol.volume_id}.img"), 0, os.urandom(800 * MiB))
            assert image.stat().st_blocks * 512 >= 800 * MiB
            assert 0.3 < metrics(drv)["pvlun_pool_used_ratio"] < 0.5  # 800 MiB of the 2 GiB pool
            for _ in range(2):  # 2.4 GiB provisioned in a 2 GiB pool: thin, as overcommit 4 allows
                res.volume(size=800 * MiB, cap=CAP)
            assert image.stat().st_size == 2 * 1024 * MiB
        finally:
            res.cleanup()
