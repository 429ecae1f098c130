"""Conformance: ControllerPublishVolume / ControllerUnpublishVolume and what they show in
ListVolumes and ControllerGetVolume, against a real `pvlun serve` presenting two nodes
(`<node-id>` and `<node-id>-2`) with a small per-node volume limit."""

from __future__ import annotations

import os

import pytest

from csi_support import (
    MALFORMED_IDS, NODE2_ID, NODE_ID, UNKNOWN_VOLUME_ID, Code, assert_code, block_cap, mount_cap, unique,
)
from csi.proto import csi_pb2 as pb

MAX_PER_NODE = 3
SERVE_ARGS = ("--max-volumes-per-node", str(MAX_PER_NODE))


def publish_req(volume_id: str, node_id: str = NODE_ID, cap=None, readonly: bool = False):
    return pb.ControllerPublishVolumeRequest(volume_id=volume_id, node_id=node_id,
                                             volume_capability=cap or mount_cap(), readonly=readonly)


def status_of(driver, volume_id: str) -> tuple[list[str], list[str]]:
    """published_node_ids from ControllerGetVolume and from ListVolumes."""
    got = driver.controller.ControllerGetVolume(pb.ControllerGetVolumeRequest(volume_id=volume_id))
    listed = next(e for e in driver.controller.ListVolumes(pb.ListVolumesRequest()).entries
                  if e.volume.volume_id == volume_id)
    return sorted(got.status.published_node_ids), sorted(listed.status.published_node_ids)


# ---------------------------------------------------------------- arguments


def test_publish_without_volume_id_is_invalid_argument(driver):
    assert_code(Code.INVALID_ARGUMENT, driver.controller.ControllerPublishVolume, publish_req("", "fake-node-id"))


def test_publish_without_node_id_is_invalid_argument(driver):
    assert_code(Code.INVALID_ARGUMENT, driver.controller.ControllerPublishVolume,
                publish_req("fake-vol-id-0123456789", ""))


def test_publish_without_capability_is_invalid_argument(driver):
    req = pb.ControllerPublishVolumeRequest(volume_id="fake-vol-id-0123456789", node_id="fake-node-id-0123456789")
    assert_code(Code.INVALID_ARGUMENT, driver.controller.ControllerPublishVolume, req)


@pytest.mark.parametrize("volume_id", MALFORMED_IDS + [UNKNOWN_VOLUME_ID])
def test_publish_unknown_or_malformed_volume_is_not_found(driver, volume_id):
    assert_code(Code.NOT_FOUND, driver.controller.ControllerPublishVolume,
                publish_req(volume_id, "fake-node-id-0123456789"))


@pytest.mark.file_only("an iSCSI LUN is published to any node ID: the node's initiator name is made from it "
                       "(csi/lun_slots.py) and the controller keeps no list of nodes it could check")
def test_publish_to_unknown_node_is_not_found_and_says_the_file_backend_is_single_node(driver, res):
    vol = res.volume()
    message = assert_code(Code.NOT_FOUND, driver.controller.ControllerPublishVolume,
                          publish_req(vol.volume_id, "fake-node-id-0123456789"))
    assert "the file backend is single-node" in message
    assert status_of(driver, vol.volume_id) == ([], [])


def test_publish_with_another_access_type_than_created_is_invalid_argument(driver, res):
    vol = res.volume(cap=mount_cap())
    assert_code(Code.INVALID_ARGUMENT, driver.controller.ControllerPublishVolume,
                publish_req(vol.volume_id, cap=block_cap()))


def test_publish_mount_multi_node_multi_writer_is_invalid_argument_naming_block(driver, res):
    vol = res.volume()
    msg = assert_code(Code.INVALID_ARGUMENT, driver.controller.ControllerPublishVolume,
                      publish_req(vol.volume_id, cap=mount_cap("MULTI_NODE_MULTI_WRITER")))
    assert "block" in msg.lower()


# ---------------------------------------------------------------- publish semantics


@pytest.mark.file_only("an iSCSI publish_context names portal, target and LUN, not a path "
                       "(tests/csi/test_iscsi_serve.py checks it)")
def test_publish_returns_the_absolute_lun_path_in_the_pool(driver, res):
    vol = res.volume()
    ctx = res.publish(vol.volume_id, mount_cap())
    assert os.path.isabs(ctx["lunPath"])
    assert os.path.samefile(ctx["lunPath"], driver.lun(vol.volume_id))


def test_publish_is_idempotent_with_the_same_context(driver, res):
    vol = res.volume()
    first = res.publish(vol.volume_id, mount_cap())
    for _ in range(10):
        assert res.publish(vol.volume_id, mount_cap()) == first
    assert status_of(driver, vol.volume_id) == ([NODE_ID], [NODE_ID])


def test_publish_again_readonly_is_already_exists(driver, res):
    vol = res.volume()
    res.publish(vol.volume_id, mount_cap(), readonly=False)
    assert_code(Code.ALREADY_EXISTS, driver.controller.ControllerPublishVolume,
                publish_req(vol.volume_id, readonly=True))


def test_publish_again_with_another_mode_is_already_exists(driver, res):
    vol = res.volume(cap=block_cap("MULTI_NODE_MULTI_WRITER"))
    res.publish(vol.volume_id, block_cap("MULTI_NODE_MULTI_WRITER"))
    assert_code(Code.ALREADY_EXISTS, driver.controller.ControllerPublishVolume,
                publish_req(vol.volume_id, cap=block_cap("SINGLE_NODE_WRITER")))


@pytest.mark.parametrize("mode", ["SINGLE_NODE_WRITER", "SINGLE_NODE_SINGLE_WRITER", "SINGLE_NODE_MULTI_WRITER"])
def test_single_node_volume_published_on_another_node_is_failed_precondition(driver, res, mode):
    vol = res.volume(cap=mount_cap(mode))
    res.publish(vol.volume_id, mount_cap(mode), NODE_ID)
    assert_code(Code.FAILED_PRECONDITION, driver.controller.ControllerPublishVolume,
                publish_req(vol.volume_id, NODE2_ID, mount_cap(mode)))
    assert status_of(driver, vol.volume_id) == ([NODE_ID], [NODE_ID])


def test_block_multi_node_multi_writer_is_published_on_both_nodes(driver, res):
    cap = block_cap("MULTI_NODE_MULTI_WRITER")
    vol = res.volume(cap=cap)
    one = res.publish(vol.volume_id, cap, NODE_ID)
    two = res.publish(vol.volume_id, cap, NODE2_ID)
    same = ("portal", "targetIQN", "lun") if driver.backend == "iscsi" else ("lunPath",)
    assert [one[k] for k in same] == [two[k] for k in same]  # one LUN, reached from both
    both = sorted([NODE_ID, NODE2_ID])
    assert status_of(driver, vol.volume_id) == (both, both)


def test_multi_node_reader_only_is_published_readonly_on_both_nodes(driver, res):
    cap = mount_cap("MULTI_NODE_READER_ONLY")
    vol = res.volume(cap=cap)
    res.publish(vol.volume_id, cap, NODE_ID, readonly=True)
    res.publish(vol.volume_id, cap, NODE2_ID, readonly=True)
    assert status_of(driver, vol.volume_id)[0] == sorted([NODE_ID, NODE2_ID])


def test_multi_node_single_writer_refuses_a_second_writer(driver, res):
    cap = block_cap("MULTI_NODE_SINGLE_WRITER")
    vol = res.volume(cap=cap)
    res.publish(vol.volume_id, cap, NODE_ID)
    assert_code(Code.FAILED_PRECONDITION, driver.controller.ControllerPublishVolume,
                publish_req(vol.volume_id, NODE2_ID, cap))
    res.publish(vol.volume_id, cap, NODE2_ID, readonly=True)  # a reader is fine


def test_publishing_more_volumes_than_the_node_limit_is_resource_exhausted(driver, res):
    info = driver.node.NodeGetInfo(pb.NodeGetInfoRequest())
    assert info.max_volumes_per_node == MAX_PER_NODE
    for _ in range(MAX_PER_NODE):
        res.publish(res.volume().volume_id, mount_cap())
    extra = res.volume()
    assert_code(Code.RESOURCE_EXHAUSTED, driver.controller.ControllerPublishVolume, publish_req(extra.volume_id))
    res.publish(extra.volume_id, mount_cap(), NODE2_ID)  # the limit is per node


def test_published_volume_cannot_be_deleted(driver, res):
    vol = res.volume()
    res.publish(vol.volume_id, mount_cap())
    assert_code(Code.FAILED_PRECONDITION, driver.controller.DeleteVolume, pb.DeleteVolumeRequest(volume_id=vol.volume_id))
    assert driver.lun(vol.volume_id).exists()


# ---------------------------------------------------------------- ControllerUnpublishVolume


def test_unpublish_without_volume_id_is_invalid_argument(driver):
    assert_code(Code.INVALID_ARGUMENT, driver.controller.ControllerUnpublishVolume,
                pb.ControllerUnpublishVolumeRequest(node_id=NODE_ID))


@pytest.mark.parametrize("volume_id", MALFORMED_IDS + [UNKNOWN_VOLUME_ID])
def test_unpublish_unknown_or_malformed_volume_is_ok(driver, volume_id):
    before = driver.disk_state()
    driver.controller.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(volume_id=volume_id, node_id=NODE_ID))
    assert driver.disk_state() == before


def test_unpublish_from_unknown_node_or_unpublished_volume_is_ok(driver, res):
    vol = res.volume()
    for node in ("fake-node-id-0123456789", NODE_ID, NODE2_ID):
        driver.controller.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(volume_id=vol.volume_id,
                                                                                        node_id=node))


def test_unpublish_removes_the_node_and_is_idempotent(driver, res):
    cap = block_cap("MULTI_NODE_MULTI_WRITER")
    vol = res.volume(cap=cap)
    res.publish(vol.volume_id, cap, NODE_ID)
    res.publish(vol.volume_id, cap, NODE2_ID)
    for _ in range(2):
        driver.controller.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(volume_id=vol.volume_id,
                                                                                        node_id=NODE_ID))
    assert status_of(driver, vol.volume_id) == ([NODE2_ID], [NODE2_ID])


def test_unpublish_without_node_id_unpublishes_from_every_node(driver, res):
    cap = block_cap("MULTI_NODE_MULTI_WRITER")
    vol = res.volume(cap=cap)
    res.publish(vol.volume_id, cap, NODE_ID)
    res.publish(vol.volume_id, cap, NODE2_ID)
    driver.controller.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(volume_id=vol.volume_id))
    assert status_of(driver, vol.volume_id) == ([], [])
    driver.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id))
    assert not driver.lun(vol.volume_id).exists()


def test_unpublish_then_delete_then_unpublish_again_is_ok(driver):
    """csi-sanity's cleanup unpublishes once per publish, after the volume is gone."""
    ctl = driver.controller
    vol = ctl.CreateVolume(pb.CreateVolumeRequest(name=unique(), volume_capabilities=[mount_cap()])).volume
    ctl.ControllerPublishVolume(publish_req(vol.volume_id))
    ctl.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(volume_id=vol.volume_id, node_id=NODE_ID))
    ctl.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id))
    for _ in range(3):
        ctl.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(volume_id=vol.volume_id, node_id=NODE_ID))
        ctl.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id))


def test_a_freed_node_slot_can_be_published_again(driver, res):
    vols = [res.volume() for _ in range(MAX_PER_NODE + 1)]
    for vol in vols[:MAX_PER_NODE]:
        res.publish(vol.volume_id, mount_cap())
    driver.controller.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(volume_id=vols[0].volume_id,
                                                                                    node_id=NODE_ID))
    res.publish(vols[-1].volume_id, mount_cap())


# ---------------------------------------------------------------- topology


@pytest.mark.file_only("an iSCSI volume carries no host topology: every node reaches it over the network (tests/csi/test_iscsi_serve.py)")
def test_volume_topology_is_satisfied_by_both_nodes_of_the_host(driver, res):
    vol = res.volume()
    assert vol.accessible_topology
    for node in (driver.node, driver.node2):
        segments = dict(node.NodeGetInfo(pb.NodeGetInfoRequest()).accessible_topology.segments)
        assert any(dict(t.segments).items() <= segments.items() for t in vol.accessible_topology), segments


def test_create_volume_requiring_the_node_topology_succeeds(driver, res):
    """csi-sanity's lifecycle specs put NodeGetInfo's topology into the requisite list."""
    topology = driver.node.NodeGetInfo(pb.NodeGetInfoRequest()).accessible_topology
    req = pb.TopologyRequirement(requisite=[topology], preferred=[topology])
    vol = res.volume(accessibility_requirements=req)
    res.publish(vol.volume_id, mount_cap())


# ---------------------------------------------------------------- modes of existing publications


def test_multi_writer_publish_elsewhere_of_a_volume_published_single_node_is_failed_precondition(driver, res):
    """The first node was promised exclusive access: no later request may break it."""
    vol = res.volume(cap=block_cap("MULTI_NODE_MULTI_WRITER"))
    res.publish(vol.volume_id, block_cap("SINGLE_NODE_WRITER"), NODE_ID)
    assert_code(Code.FAILED_PRECONDITION, driver.controller.ControllerPublishVolume,
                publish_req(vol.volume_id, NODE2_ID, block_cap("MULTI_NODE_MULTI_WRITER")))
    assert_code(Code.FAILED_PRECONDITION, driver.controller.ControllerPublishVolume,
                publish_req(vol.volume_id, NODE2_ID, block_cap("MULTI_NODE_READER_ONLY"), readonly=True))


def test_multi_writer_publish_next_to_a_single_writer_publication_is_failed_precondition(driver, res):
    vol = res.volume(cap=block_cap("MULTI_NODE_MULTI_WRITER"))
    res.publish(vol.volume_id, block_cap("MULTI_NODE_SINGLE_WRITER"), NODE_ID)
    assert_code(Code.FAILED_PRECONDITION, driver.controller.ControllerPublishVolume,
                publish_req(vol.volume_id, NODE2_ID, block_cap("MULTI_NODE_MULTI_WRITER")))
