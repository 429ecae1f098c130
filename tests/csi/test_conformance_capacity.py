"""Conformance: provisioned-capacity accounting. The sizes of all volumes and snapshots may
add up to the pool's usable space x the overcommit ratio (`pvlun serve --overcommit`,
default 1); beyond that CreateVolume, CreateSnapshot and ControllerExpandVolume are
RESOURCE_EXHAUSTED, and GetCapacity reports what is left (never more than the free bytes).
The pool image starts small and grows, on real host blocks, as volumes are provisioned, up
to `--pool-size`. That writes never run out of space at ratio 1 is proven on a small real
pool in test_hostile_capacity.py, and on a small host in tests/controlplane/test_hostile_host_space.py."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from csi_support import GiB, MiB, SMALL, Code, _force_clean, assert_code, mount_cap, running_driver, unique
from csi.pool import default_pool_size
from csi.proto import csi_pb2 as pb

SERVE_ARGS = ("--pool-size", "8Gi")
DRIFT = 8 * MiB  # XFS's metadata for a grown pool is estimated a little high: GetCapacity may rise by this


def create_req(size: int, name: str | None = None) -> pb.CreateVolumeRequest:
    return pb.CreateVolumeRequest(name=name or unique(), volume_capabilities=[mount_cap()],
                                  capacity_range=pb.CapacityRange(required_bytes=size, limit_bytes=size))


def expand_req(volume_id: str, size: int) -> pb.ControllerExpandVolumeRequest:
    return pb.ControllerExpandVolumeRequest(volume_id=volume_id, capacity_range=pb.CapacityRange(required_bytes=size))


def capacity(driver) -> int:
    return driver.controller.GetCapacity(pb.GetCapacityRequest()).available_capacity


def pool_bytes(driver) -> int:
    st = os.statvfs(driver.pool)
    return st.f_blocks * st.f_frsize


def free_bytes(driver) -> int:
    st = os.statvfs(driver.pool)
    return st.f_bavail * st.f_frsize


def test_sizes_beyond_the_pool_are_resource_exhausted_though_the_pool_is_empty(driver, res):
    """Three 7 GiB volumes on an 8 GiB pool: the first fits, the others would promise
    bytes the pool does not have, although all three are sparse and nothing is written."""
    assert 7 * GiB < capacity(driver) < 8 * GiB
    assert pool_bytes(driver) < GiB  # nothing provisioned: the image is small
    res.volume(size=7 * GiB)
    assert 7 * GiB < pool_bytes(driver) <= 8 * GiB  # it grew to hold the volume
    for _ in range(2):
        msg = assert_code(Code.RESOURCE_EXHAUSTED, driver.controller.CreateVolume, create_req(7 * GiB))
        assert "not enough room in the pool" in msg and "7.0 GiB is provisioned to 1 volume and 0 snapshots" in msg
    assert capacity(driver) <= 8 * GiB - 7 * GiB
    res.volume(size=capacity(driver) // MiB * MiB)  # what is left still fits


def test_usable_space_is_the_free_space_of_the_grown_pool_less_a_reserve(driver, res):
    """Usable space comes from the filesystem (after its metadata and log), not from the
    image size; 1% is kept back for the metadata of volumes that fill up. What the image may
    still grow by counts, estimated from what XFS takes of a growth."""
    offered = capacity(driver)
    assert 8 * GiB * 0.96 < offered < 8 * GiB * 0.99
    vol = res.volume(size=offered // MiB * MiB)  # the whole offer: the pool grows to its maximum
    assert free_bytes(driver) * 0.98 < offered <= free_bytes(driver) * 0.99 + DRIFT
    assert 0 <= capacity(driver) < DRIFT
    driver.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id))
    assert capacity(driver) == pytest.approx(offered, abs=DRIFT)


def test_get_capacity_is_the_unprovisioned_part_of_the_pool(driver, res):
    before = capacity(driver)
    res.volume(size=1 * GiB)
    assert capacity(driver) == pytest.approx(before - 1 * GiB, abs=DRIFT)
    res.volume(size=capacity(driver) // MiB * MiB)  # exactly what GetCapacity offers can be created
    assert capacity(driver) < DRIFT
    assert_code(Code.RESOURCE_EXHAUSTED, driver.controller.CreateVolume, create_req(SMALL))


def test_deleting_a_volume_gives_its_size_back(driver, res):
    before = capacity(driver)
    vol = res.volume(size=4 * GiB)
    assert capacity(driver) == pytest.approx(before - 4 * GiB, abs=DRIFT)
    driver.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id))
    assert capacity(driver) == pytest.approx(before, abs=16 * MiB)
    res.volume(size=7 * GiB)


def test_snapshots_count_as_provisioned_at_their_volume_size(driver, res):
    """A reflink snapshot costs nothing when taken, but its volume's size once the volume
    is rewritten: three snapshots of a 2 GiB volume do not fit beside it on 8 GiB."""
    vol = res.volume(size=2 * GiB)
    before = capacity(driver)
    for _ in range(2):
        res.snapshot(vol.volume_id)
    assert capacity(driver) == pytest.approx(before - 4 * GiB, abs=DRIFT)
    msg = assert_code(Code.RESOURCE_EXHAUSTED, driver.controller.CreateSnapshot,
                      pb.CreateSnapshotRequest(name=unique("snap"), source_volume_id=vol.volume_id))
    assert "1 volume and 2 snapshots" in msg and "the snapshot needs 2.0 GiB" in msg
    group = assert_code(Code.RESOURCE_EXHAUSTED, driver.group.CreateVolumeGroupSnapshot,
                        pb.CreateVolumeGroupSnapshotRequest(name=unique("grp"), source_volume_ids=[vol.volume_id]))
    assert "not enough room in the pool" in group
    assert capacity(driver) == pytest.approx(before - 4 * GiB, abs=DRIFT)  # nothing half-made holds room


def test_expand_beyond_the_provisioning_limit_is_resource_exhausted(driver, res):
    big = res.volume(size=6 * GiB)
    vol = res.volume(size=512 * MiB)
    msg = assert_code(Code.RESOURCE_EXHAUSTED, driver.controller.ControllerExpandVolume, expand_req(vol.volume_id, 3 * GiB))
    assert "not enough room in the pool" in msg and "growing needs 2.5 GiB more" in msg
    assert driver.lun(vol.volume_id).stat().st_size == 512 * MiB
    got = driver.controller.ControllerGetVolume(pb.ControllerGetVolumeRequest(volume_id=vol.volume_id)).volume
    assert got.capacity_bytes == 512 * MiB
    driver.controller.ControllerExpandVolume(expand_req(vol.volume_id, 1 * GiB))  # within the limit: fine
    assert big.capacity_bytes == 6 * GiB


def test_parallel_creates_never_provision_beyond_the_pool(driver, res):
    from concurrent.futures import ThreadPoolExecutor

    def attempt(_):
        try:
            return driver.controller.CreateVolume(create_req(3 * GiB)).volume.volume_id
        except Exception as exc:  # grpc.RpcError
            assert exc.code() == Code.RESOURCE_EXHAUSTED, exc
            return None

    with ThreadPoolExecutor(6) as pool:
        made = [v for v in pool.map(attempt, range(6)) if v]
    for volume_id in made:
        res._undo.append(("volume", (volume_id,)))
    assert len(made) == 2  # 3 x 3 GiB > 8 GiB


def test_overcommit_ratio_lets_sizes_exceed_the_pool(tmp_path_factory):
    # a short data dir: the node sockets' unix paths must stay under 108 bytes
    with running_driver(tmp_path_factory.mktemp("oc") / "d", "--pool-size", "8Gi", "--overcommit", "3") as drv:
        made = [drv.controller.CreateVolume(create_req(7 * GiB)).volume.volume_id for _ in range(3)]
        available = drv.controller.GetCapacity(pb.GetCapacityRequest()).available_capacity
        assert 0 < available < 3 * 8 * GiB - 21 * GiB
        msg = assert_code(Code.RESOURCE_EXHAUSTED, drv.controller.CreateVolume, create_req((available // MiB + 64) * MiB))
        assert "x overcommit 3" in msg
        # free bytes still bind: the offer is never above what the pool holds
        assert available <= free_bytes(drv)
        for volume_id in made:
            drv.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume_id))


@pytest.mark.parametrize("ratio", ["0", "-1", "lots", "inf", "nan"])
def test_serve_refuses_a_bad_overcommit_ratio(tmp_path, ratio):
    import subprocess

    from csi_support import PVLUN

    out = subprocess.run([PVLUN, "serve", "--data-dir", str(tmp_path), "--overcommit", ratio],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "overcommit" in out.stderr
    assert not os.path.exists(tmp_path / "pool.img")


def test_default_pool_size_is_90_percent_of_the_filesystem_at_most_256gib(tmp_path):
    st = os.statvfs(tmp_path)
    total = st.f_blocks * st.f_frsize
    size = default_pool_size(str(tmp_path))
    assert size % GiB == 0
    assert size == min(256 * GiB, total * 9 // 10) // GiB * GiB or (total * 9 // 10 < GiB and size == GiB)


def test_serve_without_pool_size_makes_a_small_allocated_image_that_may_grow_to_the_default_size(tmp_path):
    """On a 4 GiB host filesystem the default maximum is 3 GiB (90%, rounded down to GiB):
    the image starts at its smallest, with every byte allocated, and GetCapacity offers what
    it may grow to."""
    from pvlun.local_run import small_ext4

    short = Path(tempfile.mkdtemp(prefix="pv-", dir="/tmp"))  # socket paths have 107 bytes at most
    try:
        with small_ext4(str(short / "host.img"), 4 * GiB) as host:
            expected = default_pool_size(host)
            assert expected == 3 * GiB
            with running_driver(Path(host) / "d", pool_size=None) as drv:
                st = (Path(host) / "d" / "pool.img").stat()
                assert st.st_size == 320 * MiB and st.st_blocks * 512 >= st.st_size
                assert expected * 0.94 < capacity(drv) < expected  # less XFS's log (64 MiB) and metadata
    finally:
        shutil.rmtree(short, ignore_errors=True)
