"""Conformance: ControllerExpandVolume and ControllerModifyVolume against a real `pvlun serve`."""

from __future__ import annotations

import os

import pytest

from csi_support import (
    GiB, MALFORMED_IDS, MiB, POOL_SIZE, SMALL, UNKNOWN_VOLUME_ID, Code, assert_code, block_cap, mount_cap, read_at,
    unique, write_at,
)
from csi.proto import csi_pb2 as pb

MUTABLE = {"maxIOPS": "100", "maxMBps": "10"}  # what README hands to csi-sanity --csi.testvolumemutableparameters


def expand_req(volume_id: str, required: int, limit: int = 0, cap=None) -> pb.ControllerExpandVolumeRequest:
    req = pb.ControllerExpandVolumeRequest(volume_id=volume_id,
                                           capacity_range=pb.CapacityRange(required_bytes=required, limit_bytes=limit))
    if cap is not None:
        req.volume_capability.CopyFrom(cap)
    return req


def get_volume(driver, volume_id: str) -> pb.Volume:
    return driver.controller.ControllerGetVolume(pb.ControllerGetVolumeRequest(volume_id=volume_id)).volume


def modify(driver, volume_id: str, params: dict[str, str]) -> None:
    driver.controller.ControllerModifyVolume(pb.ControllerModifyVolumeRequest(volume_id=volume_id,
                                                                              mutable_parameters=params))


# ---------------------------------------------------------------- ControllerExpandVolume


def test_expand_without_volume_id_is_invalid_argument(driver):
    assert_code(Code.INVALID_ARGUMENT, driver.controller.ControllerExpandVolume, expand_req("", SMALL))


def test_expand_without_capacity_range_is_invalid_argument(driver, res):
    assert_code(Code.INVALID_ARGUMENT, driver.controller.ControllerExpandVolume, pb.ControllerExpandVolumeRequest())
    vol = res.volume()
    assert_code(Code.INVALID_ARGUMENT, driver.controller.ControllerExpandVolume,
                pb.ControllerExpandVolumeRequest(volume_id=vol.volume_id))


@pytest.mark.parametrize("volume_id", MALFORMED_IDS + [UNKNOWN_VOLUME_ID])
def test_expand_unknown_or_malformed_volume_is_not_found_and_touches_nothing(driver, volume_id):
    before = driver.disk_state()
    assert_code(Code.NOT_FOUND, driver.controller.ControllerExpandVolume, expand_req(volume_id, 2 * SMALL))
    assert driver.disk_state() == before


def test_expand_returns_exactly_the_requested_size(driver, res):
    vol = res.volume(cap=mount_cap())
    want = SMALL + 1 * GiB  # csi-sanity's default TestVolumeExpandSize
    rsp = driver.controller.ControllerExpandVolume(expand_req(vol.volume_id, want, cap=mount_cap()))
    assert rsp.capacity_bytes == want
    assert rsp.node_expansion_required  # a filesystem must be grown on the node
    assert driver.lun(vol.volume_id).stat().st_size == want
    assert get_volume(driver, vol.volume_id).capacity_bytes == want


def test_a_repeated_expand_of_a_filesystem_volume_still_asks_for_the_node_step(driver, res):
    """The resizer retries after a timeout or a restart: the retry must not tell it the node
    step is done when it never ran."""
    vol = res.volume(cap=mount_cap())
    for _ in range(2):
        rsp = driver.controller.ControllerExpandVolume(expand_req(vol.volume_id, 2 * SMALL, cap=mount_cap()))
        assert rsp.capacity_bytes == 2 * SMALL and rsp.node_expansion_required


def test_expand_of_an_unpublished_block_volume_needs_no_node_step(driver, res):
    vol = res.volume(cap=block_cap())
    rsp = driver.controller.ControllerExpandVolume(expand_req(vol.volume_id, 2 * SMALL, cap=block_cap()))
    assert rsp.capacity_bytes == 2 * SMALL
    assert not rsp.node_expansion_required


def test_expand_of_a_published_block_volume_asks_the_node_to_refresh(driver, res):
    vol = res.volume(cap=block_cap())
    res.publish(vol.volume_id, block_cap())
    rsp = driver.controller.ControllerExpandVolume(expand_req(vol.volume_id, 2 * SMALL))
    assert rsp.capacity_bytes == 2 * SMALL
    assert rsp.node_expansion_required


def test_expand_is_idempotent(driver, res):
    vol = res.volume()
    for _ in range(3):
        rsp = driver.controller.ControllerExpandVolume(expand_req(vol.volume_id, 3 * SMALL))
        assert rsp.capacity_bytes == 3 * SMALL
    assert driver.lun(vol.volume_id).stat().st_size == 3 * SMALL


def test_expand_to_a_smaller_size_never_shrinks(driver, res):
    vol = res.volume(size=2 * SMALL)
    rsp = driver.controller.ControllerExpandVolume(expand_req(vol.volume_id, SMALL))
    assert rsp.capacity_bytes == 2 * SMALL
    assert driver.lun(vol.volume_id).stat().st_size == 2 * SMALL
    assert get_volume(driver, vol.volume_id).capacity_bytes == 2 * SMALL


def test_expand_with_limit_below_current_size_is_out_of_range(driver, res):
    vol = res.volume(size=2 * SMALL)
    assert_code(Code.OUT_OF_RANGE, driver.controller.ControllerExpandVolume,
                expand_req(vol.volume_id, SMALL, limit=SMALL))
    assert driver.lun(vol.volume_id).stat().st_size == 2 * SMALL


def test_expand_with_required_above_limit_is_invalid_argument(driver, res):
    vol = res.volume()
    assert_code(Code.INVALID_ARGUMENT, driver.controller.ControllerExpandVolume,
                expand_req(vol.volume_id, 4 * SMALL, limit=3 * SMALL))


def test_expand_beyond_the_pool_is_resource_exhausted(driver, res):
    vol = res.volume()
    assert_code(Code.RESOURCE_EXHAUSTED, driver.controller.ControllerExpandVolume,
                expand_req(vol.volume_id, 4 * POOL_SIZE))
    assert driver.lun(vol.volume_id).stat().st_size == SMALL
    assert get_volume(driver, vol.volume_id).capacity_bytes == SMALL


def test_expand_keeps_the_data_and_zero_fills_the_new_space(driver, res):
    vol = res.volume()
    lun = str(driver.lun(vol.volume_id))
    data = os.urandom(8192)
    write_at(lun, SMALL - len(data), data)
    driver.controller.ControllerExpandVolume(expand_req(vol.volume_id, 2 * SMALL))
    assert read_at(lun, SMALL - len(data), len(data)) == data
    assert read_at(lun, SMALL, 4096) == b"\0" * 4096


def test_expand_to_10gib_stays_sparse(driver, res):
    vol = res.volume()
    rsp = driver.controller.ControllerExpandVolume(expand_req(vol.volume_id, 10 * GiB))
    assert rsp.capacity_bytes == 10 * GiB
    assert driver.lun(vol.volume_id).stat().st_blocks * 512 < 1 * MiB


def test_expanded_size_is_what_a_clone_of_the_volume_starts_from(driver, res):
    vol = res.volume()
    driver.controller.ControllerExpandVolume(expand_req(vol.volume_id, 2 * SMALL))
    src = pb.VolumeContentSource(volume=pb.VolumeContentSource.VolumeSource(volume_id=vol.volume_id))
    assert_code(Code.OUT_OF_RANGE, driver.controller.CreateVolume, pb.CreateVolumeRequest(
        name=unique(), volume_capabilities=[mount_cap()], volume_content_source=src,
        capacity_range=pb.CapacityRange(required_bytes=SMALL, limit_bytes=SMALL)))
    clone = res.volume(size=2 * SMALL, volume_content_source=src)
    assert clone.capacity_bytes == 2 * SMALL


# ---------------------------------------------------------------- ControllerModifyVolume


def test_modify_without_volume_id_is_invalid_argument(driver):
    assert_code(Code.INVALID_ARGUMENT, driver.controller.ControllerModifyVolume,
                pb.ControllerModifyVolumeRequest(mutable_parameters=MUTABLE))


@pytest.mark.parametrize("volume_id", ["non-existing-volume-id", UNKNOWN_VOLUME_ID, "../etc/passwd", "/abs"])
def test_modify_unknown_or_malformed_volume_is_not_found(driver, volume_id):
    before = driver.disk_state()
    assert_code(Code.NOT_FOUND, driver.controller.ControllerModifyVolume,
                pb.ControllerModifyVolumeRequest(volume_id=volume_id, mutable_parameters=MUTABLE))
    assert driver.disk_state() == before


def test_modify_with_unknown_key_is_invalid_argument_and_changes_nothing(driver, res):
    vol = res.volume(mutable_parameters=MUTABLE)
    msg = assert_code(Code.INVALID_ARGUMENT, driver.controller.ControllerModifyVolume,
                      pb.ControllerModifyVolumeRequest(volume_id=vol.volume_id,
                                                       mutable_parameters={"XXX_FakeKey": "XXX_FakeValue",
                                                                           "maxIOPS": "5"}))
    assert "XXX_FakeKey" in msg
    assert get_volume(driver, vol.volume_id).volume_context["maxIOPS"] == "100"


@pytest.mark.parametrize("value", ["", "0", "-5", "ten", "1.5"])
def test_modify_with_a_value_that_is_not_a_positive_integer_is_invalid_argument(driver, res, value):
    vol = res.volume()
    assert_code(Code.INVALID_ARGUMENT, driver.controller.ControllerModifyVolume,
                pb.ControllerModifyVolumeRequest(volume_id=vol.volume_id, mutable_parameters={"maxMBps": value}))


@pytest.mark.parametrize("key,value", [
    ("maxIOPS", "\u0661\u0662"),  # Arabic-Indic "12": str.isdigit() and int() take it
    ("maxMBps", "\uff11\uff10"),  # full-width "10"
    ("maxIOPS", "+5"), ("maxIOPS", " 5"), ("maxIOPS", "5 "), ("maxIOPS", "1_000"),
    ("maxIOPS", str(10**15 + 1)), ("maxIOPS", "9" * 40), ("maxIOPS", "0" * 20 + "5" * 5000),
    ("maxMBps", str(10**15 // MiB + 1)),
])
def test_modify_with_a_non_ascii_or_out_of_range_value_is_invalid_argument_naming_the_range(driver, res, key, value):
    vol = res.volume(mutable_parameters=MUTABLE)
    msg = assert_code(Code.INVALID_ARGUMENT, driver.controller.ControllerModifyVolume,
                      pb.ControllerModifyVolumeRequest(volume_id=vol.volume_id, mutable_parameters={key: value}))
    top = 10**15 if key == "maxIOPS" else 10**15 // MiB
    assert key in msg and f"1 to {top}" in msg
    context = get_volume(driver, vol.volume_id).volume_context
    assert (context["maxIOPS"], context["maxMBps"]) == ("100", "10")


def test_modify_accepts_the_largest_limits_qemu_takes(driver, res):
    vol = res.volume()
    top = {"maxIOPS": str(10**15), "maxMBps": str(10**15 // MiB)}
    modify(driver, vol.volume_id, top)
    context = get_volume(driver, vol.volume_id).volume_context
    assert (context["maxIOPS"], context["maxMBps"]) == (top["maxIOPS"], top["maxMBps"])


def test_modify_with_an_empty_map_is_ok(driver, res):
    vol = res.volume()
    modify(driver, vol.volume_id, {})
    assert "maxIOPS" not in get_volume(driver, vol.volume_id).volume_context


def test_modify_stores_max_iops_and_max_mbps_in_the_volume_context(driver, res):
    vol = res.volume()
    modify(driver, vol.volume_id, MUTABLE)
    context = get_volume(driver, vol.volume_id).volume_context
    assert context["maxIOPS"] == "100" and context["maxMBps"] == "10"
    listed = next(e.volume for e in driver.controller.ListVolumes(pb.ListVolumesRequest()).entries
                  if e.volume.volume_id == vol.volume_id)
    assert listed.volume_context["maxMBps"] == "10"


def test_modify_a_volume_created_with_the_same_parameters_is_idempotent(driver, res):
    vol = res.volume(mutable_parameters=MUTABLE)
    for _ in range(2):
        modify(driver, vol.volume_id, MUTABLE)
    context = get_volume(driver, vol.volume_id).volume_context
    assert (context["maxIOPS"], context["maxMBps"]) == ("100", "10")


def test_modify_one_key_keeps_the_other(driver, res):
    vol = res.volume(mutable_parameters=MUTABLE)
    modify(driver, vol.volume_id, {"maxIOPS": "250"})
    context = get_volume(driver, vol.volume_id).volume_context
    assert (context["maxIOPS"], context["maxMBps"]) == ("250", "10")


def test_modify_a_published_volume_is_ok(driver, res):
    vol = res.volume(cap=block_cap())
    res.publish(vol.volume_id, block_cap())
    modify(driver, vol.volume_id, {"maxMBps": "20"})
    assert get_volume(driver, vol.volume_id).volume_context["maxMBps"] == "20"


def test_storageclass_parameters_max_iops_are_mutable_parameters_too(driver, res):
    vol = res.volume(parameters={"maxIOPS": "300"})
    assert vol.volume_context["maxIOPS"] == "300"
    modify(driver, vol.volume_id, {"maxIOPS": "400"})
    assert get_volume(driver, vol.volume_id).volume_context["maxIOPS"] == "400"
