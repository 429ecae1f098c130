"""Conformance: Controller volume RPCs (ControllerGetCapabilities, CreateVolume, DeleteVolume)
against a real `pvlun serve`, rule by rule from the CSI spec and csi-sanity's expectations."""

from __future__ import annotations

import os
import socket

import pytest

from csi_support import (
    GiB, MALFORMED_IDS, NODE_ID, MiB, POOL_SIZE, SMALL, UNKNOWN_VOLUME_ID, Code, assert_code, block_cap, mount_cap,
    unique,
)
from csi.proto import csi_pb2 as pb

RPC = pb.ControllerServiceCapability.RPC.Type
# What csi-sanity v5.5 knows; anything else fails its capability spec.
SANITY_KNOWN = {
    "CREATE_DELETE_VOLUME", "PUBLISH_UNPUBLISH_VOLUME", "LIST_VOLUMES", "GET_CAPACITY", "CREATE_DELETE_SNAPSHOT",
    "LIST_SNAPSHOTS", "PUBLISH_READONLY", "CLONE_VOLUME", "EXPAND_VOLUME", "MODIFY_VOLUME",
    "LIST_VOLUMES_PUBLISHED_NODES", "GET_VOLUME", "VOLUME_CONDITION", "SINGLE_NODE_MULTI_WRITER", "GET_SNAPSHOT",
}


def create_req(name: str, size: int = SMALL, caps=None, **fields) -> pb.CreateVolumeRequest:
    return pb.CreateVolumeRequest(name=name, volume_capabilities=caps or [mount_cap()],
                                  capacity_range=pb.CapacityRange(required_bytes=size, limit_bytes=size), **fields)


def all_volumes(ctl) -> list[pb.ListVolumesResponse.Entry]:
    return list(ctl.ListVolumes(pb.ListVolumesRequest()).entries)


def volume_ids(ctl) -> set[str]:
    return {e.volume.volume_id for e in all_volumes(ctl)}


# ---------------------------------------------------------------- capabilities


def test_controller_capabilities_are_all_implemented_and_known_to_csi_sanity(driver):
    caps = driver.controller.ControllerGetCapabilities(pb.ControllerGetCapabilitiesRequest()).capabilities
    names = {RPC.Name(c.rpc.type) for c in caps}
    assert names <= SANITY_KNOWN
    assert {"CREATE_DELETE_VOLUME", "PUBLISH_UNPUBLISH_VOLUME", "LIST_VOLUMES", "GET_CAPACITY",
            "CREATE_DELETE_SNAPSHOT", "LIST_SNAPSHOTS", "CLONE_VOLUME", "EXPAND_VOLUME", "MODIFY_VOLUME",
            "LIST_VOLUMES_PUBLISHED_NODES", "GET_VOLUME", "SINGLE_NODE_MULTI_WRITER", "GET_SNAPSHOT"} <= names


# ---------------------------------------------------------------- CreateVolume: arguments


def test_create_volume_without_name_is_invalid_argument(driver):
    assert_code(Code.INVALID_ARGUMENT, driver.controller.CreateVolume,
                pb.CreateVolumeRequest(volume_capabilities=[mount_cap()]))


def test_create_volume_without_capabilities_is_invalid_argument(driver):
    assert_code(Code.INVALID_ARGUMENT, driver.controller.CreateVolume, pb.CreateVolumeRequest(name=unique()))


def test_create_volume_with_capability_lacking_access_type_or_mode_is_invalid_argument(driver):
    no_type = pb.VolumeCapability(access_mode=pb.VolumeCapability.AccessMode(mode=1))
    no_mode = pb.VolumeCapability(mount=pb.VolumeCapability.MountVolume())
    unknown_mode = mount_cap("UNKNOWN")
    for cap in (no_type, no_mode, unknown_mode):
        assert_code(Code.INVALID_ARGUMENT, driver.controller.CreateVolume, create_req(unique(), caps=[cap]))


def test_create_volume_with_name_over_128_bytes_is_invalid_argument(driver):
    assert_code(Code.INVALID_ARGUMENT, driver.controller.CreateVolume, create_req("n" * 129))


def test_create_volume_with_maximum_length_name_succeeds_twice(driver, res):
    name = ("max-" + "x" * 128)[:128]
    first = res.volume(name)
    second = driver.controller.CreateVolume(create_req(name)).volume
    assert first.volume_id == second.volume_id


def test_create_volume_with_required_above_limit_is_invalid_argument(driver):
    req = pb.CreateVolumeRequest(name=unique(), volume_capabilities=[mount_cap()],
                                 capacity_range=pb.CapacityRange(required_bytes=2 * SMALL, limit_bytes=SMALL))
    assert_code(Code.INVALID_ARGUMENT, driver.controller.CreateVolume, req)


def test_create_volume_with_negative_capacity_is_invalid_argument(driver):
    req = pb.CreateVolumeRequest(name=unique(), volume_capabilities=[mount_cap()],
                                 capacity_range=pb.CapacityRange(required_bytes=-1))
    assert_code(Code.INVALID_ARGUMENT, driver.controller.CreateVolume, req)


def test_create_volume_with_unknown_parameter_is_invalid_argument(driver):
    assert_code(Code.INVALID_ARGUMENT, driver.controller.CreateVolume,
                create_req(unique(), parameters={"noSuchParameter": "1"}))


def test_create_volume_accepts_fstype_and_provisioner_parameters(driver, res):
    vol = res.volume(parameters={"fsType": "xfs", "csi.storage.k8s.io/pvc/name": "disk"})
    assert vol.capacity_bytes == SMALL


def test_create_volume_with_unsupported_fs_type_is_invalid_argument(driver):
    assert_code(Code.INVALID_ARGUMENT, driver.controller.CreateVolume,
                create_req(unique(), caps=[mount_cap(fs_type="ntfs")]))


def test_create_mount_volume_multi_node_multi_writer_is_invalid_argument_naming_block(driver):
    msg = assert_code(Code.INVALID_ARGUMENT, driver.controller.CreateVolume,
                      create_req(unique(), caps=[mount_cap("MULTI_NODE_MULTI_WRITER")]))
    assert "block" in msg.lower()


def test_create_block_volume_multi_node_multi_writer_is_allowed(driver, res):
    vol = res.volume(cap=block_cap("MULTI_NODE_MULTI_WRITER"))
    assert vol.volume_id.startswith("vol-")


def test_create_volume_with_unknown_mutable_parameter_is_invalid_argument(driver):
    assert_code(Code.INVALID_ARGUMENT, driver.controller.CreateVolume,
                create_req(unique(), mutable_parameters={"XXX_FakeKey": "XXX_FakeValue"}))


def test_create_volume_with_non_integer_mutable_parameter_is_invalid_argument(driver):
    assert_code(Code.INVALID_ARGUMENT, driver.controller.CreateVolume,
                create_req(unique(), mutable_parameters={"maxIOPS": "lots"}))


@pytest.mark.parametrize("field,params", [
    ("mutable_parameters", {"maxIOPS": "\u0661\u0662"}),
    ("mutable_parameters", {"maxMBps": str(10**15 // MiB + 1)}),
    ("parameters", {"maxIOPS": str(10**15 + 1)}),  # StorageClass parameters are checked the same way
    ("parameters", {"maxMBps": "\u0968"}),  # Devanagari 2
])
def test_create_volume_with_non_ascii_or_too_large_mutable_parameter_is_invalid_argument(driver, field, params):
    before = volume_ids(driver.controller)
    msg = assert_code(Code.INVALID_ARGUMENT, driver.controller.CreateVolume, create_req(unique(), **{field: params}))
    assert next(iter(params)) in msg
    assert volume_ids(driver.controller) == before


def test_create_volume_with_mutable_parameters_returns_them_in_volume_context(driver, res):
    vol = res.volume(mutable_parameters={"maxIOPS": "100", "maxMBps": "10"})
    assert vol.volume_context["maxIOPS"] == "100"
    assert vol.volume_context["maxMBps"] == "10"


def test_create_volume_with_empty_mutable_parameters_succeeds(driver, res):
    vol = res.volume(mutable_parameters={})
    assert "maxIOPS" not in vol.volume_context


# ---------------------------------------------------------------- CreateVolume: sizes


def test_create_volume_with_required_equal_limit_gets_exactly_that_size(driver, res):
    vol = res.volume(size=SMALL)
    assert vol.capacity_bytes == SMALL
    assert driver.lun(vol.volume_id).stat().st_size == SMALL


def test_create_volume_without_capacity_range_gets_a_default_size(driver, res):
    vol = driver.controller.CreateVolume(pb.CreateVolumeRequest(name=unique(), volume_capabilities=[mount_cap()])).volume
    res._undo.append(("volume", (vol.volume_id,)))
    assert vol.capacity_bytes > 0
    assert driver.lun(vol.volume_id).stat().st_size == vol.capacity_bytes


def test_create_volume_rounds_an_odd_size_up_within_no_limit(driver, res):
    vol = res.volume(size=10 * MiB + 1, limit=0)
    assert vol.capacity_bytes >= 10 * MiB + 1
    assert vol.capacity_bytes % 4096 == 0


def test_create_volume_rounds_to_4k_when_the_limit_forbids_mib(driver, res):
    vol = res.volume(size=10 * MiB + 1, limit=10 * MiB + 8192)
    assert 10 * MiB + 1 <= vol.capacity_bytes <= 10 * MiB + 8192


def test_create_volume_of_10gib_is_a_sparse_lun(driver, res):
    vol = res.volume(size=10 * GiB)
    st = driver.lun(vol.volume_id).stat()
    assert vol.capacity_bytes == 10 * GiB
    assert st.st_size == 10 * GiB
    assert st.st_blocks * 512 < 1 * MiB


def test_create_volume_larger_than_the_pool_is_resource_exhausted_and_leaves_nothing(driver, res):
    name = unique()
    before_ids, before_disk = volume_ids(driver.controller), driver.disk_state()
    assert_code(Code.RESOURCE_EXHAUSTED, driver.controller.CreateVolume, create_req(name, size=4 * POOL_SIZE))
    assert volume_ids(driver.controller) == before_ids
    assert driver.disk_state() == before_disk
    vol = res.volume(name)  # the name is free again
    assert vol.capacity_bytes == SMALL


# ---------------------------------------------------------------- CreateVolume: idempotency and conflicts


def test_create_volume_same_name_same_size_is_idempotent(driver, res):
    name = unique()
    vol = res.volume(name)
    for _ in range(3):
        again = driver.controller.CreateVolume(create_req(name)).volume
        assert again.volume_id == vol.volume_id
        assert again.capacity_bytes == vol.capacity_bytes


def test_create_volume_same_name_different_size_is_already_exists(driver, res):
    name = unique()
    res.volume(name, size=SMALL)
    assert_code(Code.ALREADY_EXISTS, driver.controller.CreateVolume, create_req(name, size=2 * SMALL))


def test_create_volume_same_name_different_source_is_already_exists(driver, res):
    name = unique()
    source = res.volume()
    res.volume(name)
    clone_of = pb.VolumeContentSource(volume=pb.VolumeContentSource.VolumeSource(volume_id=source.volume_id))
    assert_code(Code.ALREADY_EXISTS, driver.controller.CreateVolume, create_req(name, volume_content_source=clone_of))


def test_create_volume_same_name_different_access_type_is_already_exists(driver, res):
    name = unique()
    res.volume(name, cap=mount_cap())
    assert_code(Code.ALREADY_EXISTS, driver.controller.CreateVolume, create_req(name, caps=[block_cap()]))


def test_create_volume_same_name_different_parameters_is_already_exists(driver, res):
    name = unique()
    res.volume(name)
    assert_code(Code.ALREADY_EXISTS, driver.controller.CreateVolume,
                create_req(name, parameters={"fsType": "xfs"}))


# ---------------------------------------------------------------- CreateVolume: content sources


@pytest.mark.parametrize("source_id", ["non-existing-snapshot-id", "snap-" + "0" * 32, "../etc/passwd"])
def test_create_volume_from_unknown_snapshot_is_not_found(driver, source_id):
    before = driver.disk_state()
    src = pb.VolumeContentSource(snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id=source_id))
    assert_code(Code.NOT_FOUND, driver.controller.CreateVolume, create_req(unique(), volume_content_source=src))
    assert driver.disk_state() == before


@pytest.mark.parametrize("source_id", ["fake-vol-id-0123456789", UNKNOWN_VOLUME_ID, "/etc/passwd"])
def test_create_volume_from_unknown_volume_is_not_found(driver, source_id):
    before = driver.disk_state()
    src = pb.VolumeContentSource(volume=pb.VolumeContentSource.VolumeSource(volume_id=source_id))
    assert_code(Code.NOT_FOUND, driver.controller.CreateVolume, create_req(unique(), volume_content_source=src))
    assert driver.disk_state() == before


def test_create_volume_with_empty_content_source_is_invalid_argument(driver):
    src = pb.VolumeContentSource(volume=pb.VolumeContentSource.VolumeSource(volume_id=""))
    assert_code(Code.INVALID_ARGUMENT, driver.controller.CreateVolume, create_req(unique(), volume_content_source=src))


# ---------------------------------------------------------------- DeleteVolume


def test_delete_volume_without_id_is_invalid_argument(driver):
    assert_code(Code.INVALID_ARGUMENT, driver.controller.DeleteVolume, pb.DeleteVolumeRequest())


@pytest.mark.parametrize("volume_id", MALFORMED_IDS + [UNKNOWN_VOLUME_ID])
def test_delete_volume_with_unknown_or_malformed_id_is_ok_and_touches_nothing(driver, res, volume_id):
    keep = res.volume()
    before = driver.disk_state()
    driver.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume_id))
    assert driver.disk_state() == before
    assert keep.volume_id in volume_ids(driver.controller)
    assert os.path.exists("/etc/passwd")


def test_delete_volume_removes_the_lun_and_is_idempotent(driver):
    vol = driver.controller.CreateVolume(create_req(unique())).volume
    lun = driver.lun(vol.volume_id)
    assert lun.exists()
    for _ in range(2):
        driver.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id))
    assert not lun.exists()
    assert vol.volume_id not in volume_ids(driver.controller)


def test_deleted_volume_name_can_be_reused_for_a_new_volume(driver, res):
    name = unique()
    first = driver.controller.CreateVolume(create_req(name)).volume
    driver.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=first.volume_id))
    second = res.volume(name, size=2 * SMALL)
    assert second.volume_id != first.volume_id
    assert second.capacity_bytes == 2 * SMALL


# ---------------------------------------------------------------- names, context, concurrency


@pytest.mark.parametrize("name", ["bad\x00name", "line\nbreak", "tab\there"])
def test_create_volume_with_control_characters_in_name_is_invalid_argument(driver, name):
    before = driver.disk_state()
    assert_code(Code.INVALID_ARGUMENT, driver.controller.CreateVolume, create_req(name))
    assert driver.disk_state() == before


def test_volume_context_carries_the_size_in_bytes(driver, res):
    vol = res.volume(size=SMALL)
    assert vol.volume_context["sizeBytes"] == str(SMALL)
    driver.controller.ControllerExpandVolume(pb.ControllerExpandVolumeRequest(
        volume_id=vol.volume_id, capacity_range=pb.CapacityRange(required_bytes=2 * SMALL)))
    got = driver.controller.ControllerGetVolume(pb.ControllerGetVolumeRequest(volume_id=vol.volume_id)).volume
    assert got.volume_context["sizeBytes"] == str(2 * SMALL)


def test_concurrent_create_volume_with_one_name_makes_one_volume(driver, res):
    from concurrent.futures import ThreadPoolExecutor

    name = unique()
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: driver.controller.CreateVolume(create_req(name)).volume.volume_id, range(8)))
    assert len(set(results)) == 1
    res._undo.append(("volume", (results[0],)))
    luns = [n for n in os.listdir(driver.pool / "volumes") if n.startswith(results[0])]
    assert luns == [f"{results[0]}.img"]


# ---------------------------------------------------------------- CreateVolume: accessibility requirements

HOST_KEY, NODE_KEY = "topology.csi.pvlun.dev/host", "topology.csi.pvlun.dev/node"


def topology(*segments: dict[str, str], preferred: tuple[dict[str, str], ...] = ()) -> pb.TopologyRequirement:
    return pb.TopologyRequirement(requisite=[pb.Topology(segments=s) for s in segments],
                                  preferred=[pb.Topology(segments=s) for s in preferred])


def volume_topology(driver) -> list[dict[str, str]]:
    """A volume's accessible_topology: this host's on the file backend; none on iscsi, whose
    LUNs every node reaches over the network."""
    return [] if driver.backend == "iscsi" else [{HOST_KEY: socket.gethostname()}]


def test_create_volume_with_the_nodes_own_topology_as_requisite_succeeds(driver, res):
    """What csi-sanity's lifecycle specs send: NodeGetInfo's accessible_topology, as requisite."""
    info = driver.node.NodeGetInfo(pb.NodeGetInfoRequest())
    segments = dict(info.accessible_topology.segments)
    assert segments[HOST_KEY] == socket.gethostname() and NODE_KEY in segments
    vol = res.volume(accessibility_requirements=topology(segments, preferred=(segments,)))
    assert [dict(t.segments) for t in vol.accessible_topology] == volume_topology(driver)


@pytest.mark.file_only("an iSCSI volume carries no host topology: every node reaches it over the network (tests/csi/test_iscsi_serve.py), so a requisite naming another host does not refuse it")
def test_create_volume_with_requisite_of_another_host_is_resource_exhausted_naming_this_host(driver):
    before = volume_ids(driver.controller)
    msg = assert_code(Code.RESOURCE_EXHAUSTED, driver.controller.CreateVolume, create_req(
        unique(), accessibility_requirements=topology({HOST_KEY: "some-other-host"},
                                                      {HOST_KEY: "third-host", NODE_KEY: NODE_ID})))
    assert socket.gethostname() in msg
    assert volume_ids(driver.controller) == before


def test_create_volume_is_fine_when_any_requisite_segment_admits_this_host(driver, res):
    res.volume(accessibility_requirements=topology({HOST_KEY: "some-other-host"}, {HOST_KEY: socket.gethostname()}))
    # keys we do not know (another driver's zone, a node name) do not exclude this host
    res.volume(accessibility_requirements=topology({"topology.kubernetes.io/zone": "z1", NODE_KEY: "elsewhere"}))


def test_create_volume_ignores_an_unreachable_preferred_topology(driver, res):
    vol = res.volume(accessibility_requirements=topology(preferred=({HOST_KEY: "some-other-host"},)))
    assert [dict(t.segments) for t in vol.accessible_topology] == volume_topology(driver)
