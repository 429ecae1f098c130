"""Conformance: Controller queries (ValidateVolumeCapabilities, ListVolumes, GetCapacity,
ControllerGetVolume) against a real `pvlun serve`, rule by rule from the CSI spec and
csi-sanity's expectations."""

from __future__ import annotations

import os
import time

import pytest

from csi_support import (
    MALFORMED_IDS, MiB, POOL_SIZE, SMALL, UNKNOWN_VOLUME_ID, Code, assert_code, block_cap, mount_cap,
    unique, write_at,
)
from csi.capacity import MEASURE_EVERY
from csi.proto import csi_pb2 as pb

def all_volumes(ctl) -> list[pb.ListVolumesResponse.Entry]:
    return list(ctl.ListVolumes(pb.ListVolumesRequest()).entries)


def volume_ids(ctl) -> set[str]:
    return {e.volume.volume_id for e in all_volumes(ctl)}


# ---------------------------------------------------------------- ValidateVolumeCapabilities


def test_validate_capabilities_without_volume_id_is_invalid_argument(driver):
    assert_code(Code.INVALID_ARGUMENT, driver.controller.ValidateVolumeCapabilities,
                pb.ValidateVolumeCapabilitiesRequest(volume_capabilities=[mount_cap()]))


def test_validate_capabilities_without_capabilities_is_invalid_argument(driver, res):
    vol = res.volume()
    assert_code(Code.INVALID_ARGUMENT, driver.controller.ValidateVolumeCapabilities,
                pb.ValidateVolumeCapabilitiesRequest(volume_id=vol.volume_id))


@pytest.mark.parametrize("volume_id", ["fake-vol-id-0123456789", UNKNOWN_VOLUME_ID, "../etc/passwd"])
def test_validate_capabilities_of_unknown_volume_is_not_found(driver, volume_id):
    assert_code(Code.NOT_FOUND, driver.controller.ValidateVolumeCapabilities,
                pb.ValidateVolumeCapabilitiesRequest(volume_id=volume_id, volume_capabilities=[mount_cap()]))


def test_validate_capabilities_confirms_supported_ones(driver, res):
    vol = res.volume()
    rsp = driver.controller.ValidateVolumeCapabilities(pb.ValidateVolumeCapabilitiesRequest(
        volume_id=vol.volume_id, volume_capabilities=[mount_cap(), mount_cap("SINGLE_NODE_READER_ONLY")]))
    assert rsp.HasField("confirmed")
    assert len(rsp.confirmed.volume_capabilities) == 2


def test_validate_capabilities_confirms_block_multi_writer_for_a_block_volume(driver, res):
    vol = res.volume(cap=block_cap())
    rsp = driver.controller.ValidateVolumeCapabilities(pb.ValidateVolumeCapabilitiesRequest(
        volume_id=vol.volume_id, volume_capabilities=[block_cap("MULTI_NODE_MULTI_WRITER")]))
    assert rsp.HasField("confirmed")


def test_validate_capabilities_does_not_confirm_mount_multi_writer(driver, res):
    vol = res.volume()
    rsp = driver.controller.ValidateVolumeCapabilities(pb.ValidateVolumeCapabilitiesRequest(
        volume_id=vol.volume_id, volume_capabilities=[mount_cap("MULTI_NODE_MULTI_WRITER")]))
    assert not rsp.HasField("confirmed")
    assert "block" in rsp.message.lower()


def test_validate_capabilities_does_not_confirm_another_access_type(driver, res):
    vol = res.volume(cap=block_cap())
    rsp = driver.controller.ValidateVolumeCapabilities(pb.ValidateVolumeCapabilitiesRequest(
        volume_id=vol.volume_id, volume_capabilities=[mount_cap()]))
    assert not rsp.HasField("confirmed")
    assert rsp.message


# ---------------------------------------------------------------- ListVolumes


def test_list_volumes_with_invalid_token_is_aborted(driver):
    for token in ("invalid-token", "../etc/passwd", "snap-" + "0" * 32):
        assert_code(Code.ABORTED, driver.controller.ListVolumes, pb.ListVolumesRequest(starting_token=token))


def test_list_volumes_with_negative_max_entries_is_invalid_argument(driver):
    assert_code(Code.INVALID_ARGUMENT, driver.controller.ListVolumes, pb.ListVolumesRequest(max_entries=-1))


def test_list_volumes_shows_new_volumes_and_not_deleted_ones(driver):
    before = volume_ids(driver.controller)
    vol = driver.controller.CreateVolume(pb.CreateVolumeRequest(name="sanity-" + unique(),
                                                                volume_capabilities=[mount_cap()])).volume
    entries = all_volumes(driver.controller)
    assert len(entries) == len(before) + 1
    entry = next(e for e in entries if e.volume.volume_id == vol.volume_id)
    assert entry.volume.capacity_bytes == vol.capacity_bytes
    assert not entry.status.volume_condition.abnormal
    driver.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id))
    assert volume_ids(driver.controller) == before


def test_list_volumes_pages_through_every_volume_exactly_once(driver, res):
    made = {res.volume().volume_id for _ in range(5)}
    seen, token, pages = [], "", 0
    while True:
        rsp = driver.controller.ListVolumes(pb.ListVolumesRequest(max_entries=2, starting_token=token))
        assert len(rsp.entries) <= 2
        seen += [e.volume.volume_id for e in rsp.entries]
        pages += 1
        token = rsp.next_token
        if not token:
            break
    assert len(seen) == len(set(seen))
    assert made <= set(seen)
    assert set(seen) == volume_ids(driver.controller)
    assert pages >= 3


def test_list_volumes_next_token_continues_after_a_limited_page(driver, res):
    for _ in range(3):
        res.volume()
    total = len(all_volumes(driver.controller))
    first = driver.controller.ListVolumes(pb.ListVolumesRequest(max_entries=2))
    assert len(first.entries) == 2 and first.next_token
    rest = driver.controller.ListVolumes(pb.ListVolumesRequest(starting_token=first.next_token))
    assert len(rest.entries) == total - 2
    assert not rest.next_token


# ---------------------------------------------------------------- GetCapacity


def test_get_capacity_without_arguments_reports_the_pool(driver):
    available = driver.controller.GetCapacity(pb.GetCapacityRequest()).available_capacity
    assert 0 < available <= POOL_SIZE


def test_get_capacity_for_an_unsupported_capability_is_zero(driver):
    rsp = driver.controller.GetCapacity(pb.GetCapacityRequest(volume_capabilities=[mount_cap("MULTI_NODE_MULTI_WRITER")]))
    assert rsp.available_capacity == 0


def test_get_capacity_for_another_hosts_node_is_what_createvolume_would_serve_there(driver):
    """The provisioner asks GetCapacity per node (each node's own segment): an iSCSI volume
    reaches nodes on every host, a file backend LUN only this host's."""
    other = pb.Topology(segments={"topology.csi.pvlun.dev/host": "some-other-host",
                                  "topology.csi.pvlun.dev/node": "node-b"})
    available = driver.controller.GetCapacity(pb.GetCapacityRequest(accessible_topology=other)).available_capacity
    assert (available > 0) if driver.backend == "iscsi" else (available == 0)


def test_get_capacity_for_parameters_createvolume_refuses_is_zero(driver):
    rsp = driver.controller.GetCapacity(pb.GetCapacityRequest(parameters={"no-such-parameter": "x"}))
    assert rsp.available_capacity == 0


def test_get_capacity_does_not_drop_when_a_volume_is_written(driver, res):
    """Bytes written into a volume were promised to it when it was made: GetCapacity counts
    usable space (free + what the LUNs hold), not the free bytes of the moment."""
    def free() -> int:
        st = os.statvfs(driver.pool)
        return st.f_bavail * st.f_frsize

    def capacity() -> int:
        return driver.controller.GetCapacity(pb.GetCapacityRequest(volume_capabilities=[mount_cap()])).available_capacity

    vol = res.volume(size=64 * MiB)
    time.sleep(MEASURE_EVERY + 0.1)  # past the reuse of the last measurement
    before, before_free = capacity(), free()
    write_at(str(driver.lun(vol.volume_id)), 0, os.urandom(32 * MiB))
    time.sleep(MEASURE_EVERY + 0.1)
    after = capacity()
    assert before_free - free() >= 32 * MiB
    assert abs(after - before) < MiB  # metadata of the written extents at most


# ---------------------------------------------------------------- ControllerGetVolume


def test_controller_get_volume_without_id_is_invalid_argument(driver):
    assert_code(Code.INVALID_ARGUMENT, driver.controller.ControllerGetVolume, pb.ControllerGetVolumeRequest())


@pytest.mark.parametrize("volume_id", MALFORMED_IDS + [UNKNOWN_VOLUME_ID])
def test_controller_get_volume_of_unknown_or_malformed_id_is_not_found(driver, volume_id):
    assert_code(Code.NOT_FOUND, driver.controller.ControllerGetVolume, pb.ControllerGetVolumeRequest(volume_id=volume_id))


def test_controller_get_volume_returns_the_volume_with_a_normal_condition(driver, res):
    vol = res.volume(mutable_parameters={"maxIOPS": "50"})
    rsp = driver.controller.ControllerGetVolume(pb.ControllerGetVolumeRequest(volume_id=vol.volume_id))
    assert rsp.volume.volume_id == vol.volume_id
    assert rsp.volume.capacity_bytes == SMALL
    assert rsp.volume.volume_context["maxIOPS"] == "50"
    assert list(rsp.status.published_node_ids) == []
    assert not rsp.status.volume_condition.abnormal


def test_controller_get_volume_is_abnormal_once_the_lun_file_is_gone(driver, res):
    vol = res.volume()
    os.unlink(driver.lun(vol.volume_id))
    rsp = driver.controller.ControllerGetVolume(pb.ControllerGetVolumeRequest(volume_id=vol.volume_id))
    assert rsp.status.volume_condition.abnormal
    assert rsp.status.volume_condition.message
    listed = next(e for e in all_volumes(driver.controller) if e.volume.volume_id == vol.volume_id)
    assert listed.status.volume_condition.abnormal
    # and the broken volume can still be deleted (by the res cleanup)


def test_list_volumes_continues_when_the_volume_of_the_token_is_deleted(driver, res):
    for _ in range(4):
        res.volume()
    first = driver.controller.ListVolumes(pb.ListVolumesRequest(max_entries=2))
    token = first.next_token
    assert token
    driver.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=token))  # the token names the next volume
    rest = driver.controller.ListVolumes(pb.ListVolumesRequest(starting_token=token))
    seen = [e.volume.volume_id for e in list(first.entries) + list(rest.entries)]
    assert token not in seen
    assert set(seen) == volume_ids(driver.controller)
