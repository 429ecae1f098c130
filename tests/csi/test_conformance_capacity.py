"""Conformance: provisioned-capacity accounting. The sizes of all volumes and snapshots may
add up to the pool's usable space x the overcommit ratio (`pvlun serve --overcommit`,
default 1); beyond that CreateVolume, CreateSnapshot and ControllerExpandVolume are
RESOURCE_EXHAUSTED, and GetCapacity reports what is left (never more than the free bytes).
That writes never run out of space at ratio 1 is proven on a small real pool in
test_hostile_capacity.py."""

from __future__ import annotations

import os
import time

import pytest

from csi_support import GiB, MiB, SMALL, Code, _force_clean, assert_code, mount_cap, running_driver, unique
from csi.pool import default_pool_size
from csi.proto import csi_pb2 as pb

SERVE_ARGS = ("--pool-size", "8Gi")


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
    assert 7 * GiB < pool_bytes(driver) <= 8 * GiB
    res.volume(size=7 * GiB)
    for _ in range(2):
        msg = assert_code(Code.RESOURCE_EXHAUSTED, driver.controller.CreateVolume, create_req(7 * GiB))
        assert "not enough room in the pool" in msg and "7.0 GiB is provisioned to 1 volume and 0 snapshots" in msg
    assert capacity(driver) <= pool_bytes(driver) - 7 * GiB
    res.volume(size=capacity(driver) // MiB * MiB)  # what is left still fits


def test_usable_space_is_the_free_space_of_the_empty_pool_less_a_reserve(driver, res):
    """Usable space comes from the filesystem (after its metadata and log), not from the
    image size; 1% is kept back for the metadata of volumes that fill up."""
    offered = capacity(driver)
    assert offered < pool_bytes(driver) < 8 * GiB  # the image is 8 GiB
    assert free_bytes(driver) * 0.98 < offered <= free_bytes(driver) * 0.99


def test_get_capacity_is_the_unprovisioned_part_of_the_pool(driver, res):
    before = capacity(driver)
    res.volume(size=1 * GiB)
    assert capacity(driver) == pytest.approx(before - 1 * GiB, abs=MiB)
    res.volume(size=capacity(driver) // MiB * MiB)  # exactly what GetCapacity offers can be created
    assert capacity(driver) < MiB
    assert_code(Code.RESOURCE_EXHAUSTED, driver.controller.CreateVolume, create_req(SMALL))


def test_deleting_a_volume_gives_its_size_back(driver, res):
    before = capacity(driver)
    vol = res.volume(size=4 * GiB)
    assert capacity(driver) == pytest.approx(before - 4 * GiB, abs=MiB)
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
    assert capacity(driver) == pytest.approx(before - 4 * GiB, abs=MiB)
    msg = assert_code(Code.RESOURCE_EXHAUSTED, driver.controller.CreateSnapshot,
                      pb.CreateSnapshotRequest(name=unique("snap"), source_volume_id=vol.volume_id))
    assert "1 volume and 2 snapshots" in msg and "the snapshot needs 2.0 GiB" in msg
    group = assert_code(Code.RESOURCE_EXHAUSTED, driver.group.CreateVolumeGroupSnapshot,
                        pb.CreateVolumeGroupSnapshotRequest(name=unique("grp"), source_volume_ids=[vol.volume_id]))
    assert "not enough room in the pool" in group
    assert capacity(driver) == pytest.approx(before - 4 * GiB, abs=MiB)  # nothing half-made holds room


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


def test_serve_without_pool_size_makes_a_sparse_image_of_the_default_size(tmp_path):
    data_dir = tmp_path / "auto"
    data_dir.mkdir()
    expected = default_pool_size(str(data_dir))
    proc_args = ("--overcommit", "1")
    # start_driver always passes --pool-size; run serve by hand here without it
    import subprocess
    import signal

    from csi_support import NODE_ID, PVLUN

    err = open(tmp_path / "auto.stderr", "wb")
    proc = subprocess.Popen([PVLUN, "serve", "--data-dir", str(data_dir), "--node-id", NODE_ID, "--nodes", "1",
                             *proc_args], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 60
        while not (data_dir / "csi.sock").exists():
            assert proc.poll() is None, (tmp_path / "auto.stderr").read_text()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        image = data_dir / "pool.img"
        if image.exists():  # only made where the data dir cannot reflink (as here, on ext4)
            st = image.stat()
            assert abs(st.st_size - expected) <= GiB  # free space moves a little while we look
            assert st.st_blocks * 512 < st.st_size // 10
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=30)
        err.close()
        _force_clean(str(data_dir))
    assert rc == 0, (tmp_path / "auto.stderr").read_text()[-3000:]
