"""Conformance: the GroupController service (volume group snapshots: one crash-consistent
snapshot of several volumes) against a real `pvlun serve`."""

from __future__ import annotations

import os

import pytest

from csi_support import MALFORMED_IDS, SMALL, UNKNOWN_VOLUME_ID, Code, assert_code, mount_cap, read_at, unique, write_at
from csi.proto import csi_pb2 as pb

RPC = pb.GroupControllerServiceCapability.RPC.Type
UNKNOWN_GROUP_ID = "grp-" + "0" * 32


def create_req(name: str, volume_ids: list[str]) -> pb.CreateVolumeGroupSnapshotRequest:
    return pb.CreateVolumeGroupSnapshotRequest(name=name, source_volume_ids=volume_ids)


def get_group(driver, group_id: str, snapshot_ids=()) -> pb.VolumeGroupSnapshot:
    return driver.group.GetVolumeGroupSnapshot(pb.GetVolumeGroupSnapshotRequest(
        group_snapshot_id=group_id, snapshot_ids=list(snapshot_ids))).group_snapshot


@pytest.fixture
def two_volumes(driver, res):
    """Two volumes holding different bytes at the same offsets."""
    vols, data = [], []
    for _ in range(2):
        vol = res.volume()
        payload = os.urandom(64 * 1024)
        write_at(str(driver.lun(vol.volume_id)), 0, payload)
        write_at(str(driver.lun(vol.volume_id)), SMALL - len(payload), payload)
        vols.append(vol)
        data.append(payload)
    return vols, data


def test_group_controller_capability_is_create_delete_get_only(driver):
    caps = driver.group.GroupControllerGetCapabilities(pb.GroupControllerGetCapabilitiesRequest()).capabilities
    assert [RPC.Name(c.rpc.type) for c in caps] == ["CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT"]


# ---------------------------------------------------------------- CreateVolumeGroupSnapshot


def test_create_group_snapshot_without_name_is_invalid_argument(driver):
    assert_code(Code.INVALID_ARGUMENT, driver.group.CreateVolumeGroupSnapshot, pb.CreateVolumeGroupSnapshotRequest())


def test_create_group_snapshot_without_volumes_is_invalid_argument(driver):
    assert_code(Code.INVALID_ARGUMENT, driver.group.CreateVolumeGroupSnapshot, create_req(unique("grp"), []))


def test_create_group_snapshot_listing_a_volume_twice_is_invalid_argument(driver, res):
    vol = res.volume()
    assert_code(Code.INVALID_ARGUMENT, driver.group.CreateVolumeGroupSnapshot,
                create_req(unique("grp"), [vol.volume_id, vol.volume_id]))


@pytest.mark.parametrize("bad_id", MALFORMED_IDS + [UNKNOWN_VOLUME_ID])
def test_create_group_snapshot_with_an_unknown_volume_is_not_found_and_leaves_nothing(driver, res, bad_id):
    vol = res.volume()
    before = driver.disk_state()
    assert_code(Code.NOT_FOUND, driver.group.CreateVolumeGroupSnapshot, create_req(unique("grp"), [vol.volume_id, bad_id]))
    assert driver.disk_state() == before
    listed = driver.controller.ListSnapshots(pb.ListSnapshotsRequest(source_volume_id=vol.volume_id)).entries
    assert list(listed) == []


def test_group_snapshot_has_one_ready_member_per_volume(driver, res, two_volumes):
    vols, _ = two_volumes
    grp = res.group([v.volume_id for v in vols])
    assert grp.group_snapshot_id.startswith("grp-")
    assert grp.ready_to_use and grp.creation_time.seconds > 0
    assert sorted(s.source_volume_id for s in grp.snapshots) == sorted(v.volume_id for v in vols)
    for snap in grp.snapshots:
        assert snap.group_snapshot_id == grp.group_snapshot_id
        assert snap.ready_to_use and snap.size_bytes == SMALL and snap.creation_time.seconds > 0
        assert driver.snapshot_file(snap.snapshot_id).exists()


def test_each_group_member_restores_to_its_own_volume_bytes(driver, res, two_volumes):
    vols, data = two_volumes
    grp = res.group([v.volume_id for v in vols])
    for vol in vols:  # later writes must not reach the group snapshot
        write_at(str(driver.lun(vol.volume_id)), 0, b"\xff" * 4096)
    by_source = {s.source_volume_id: s for s in grp.snapshots}
    for vol, payload in zip(vols, data):
        snap = by_source[vol.volume_id]
        restored = res.volume(volume_content_source=pb.VolumeContentSource(
            snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id=snap.snapshot_id)))
        lun = str(driver.lun(restored.volume_id))
        assert read_at(lun, 0, len(payload)) == payload
        assert read_at(lun, SMALL - len(payload), len(payload)) == payload


def test_create_group_snapshot_same_name_same_volumes_is_idempotent(driver, res, two_volumes):
    vols, _ = two_volumes
    name = unique("grp")
    grp = res.group([v.volume_id for v in vols], name)
    again = driver.group.CreateVolumeGroupSnapshot(create_req(name, [vols[1].volume_id, vols[0].volume_id]))
    assert again.group_snapshot.group_snapshot_id == grp.group_snapshot_id
    assert sorted(s.snapshot_id for s in again.group_snapshot.snapshots) == sorted(s.snapshot_id for s in grp.snapshots)


def test_create_group_snapshot_same_name_other_volumes_is_already_exists(driver, res, two_volumes):
    vols, _ = two_volumes
    name = unique("grp")
    res.group([v.volume_id for v in vols], name)
    other = res.volume()
    assert_code(Code.ALREADY_EXISTS, driver.group.CreateVolumeGroupSnapshot,
                create_req(name, [vols[0].volume_id, other.volume_id]))
    assert_code(Code.ALREADY_EXISTS, driver.group.CreateVolumeGroupSnapshot, create_req(name, [vols[0].volume_id]))


def test_group_members_are_listed_as_snapshots(driver, res, two_volumes):
    vols, _ = two_volumes
    grp = res.group([v.volume_id for v in vols])
    for snap in grp.snapshots:
        listed = driver.controller.ListSnapshots(pb.ListSnapshotsRequest(snapshot_id=snap.snapshot_id)).entries
        assert [e.snapshot.group_snapshot_id for e in listed] == [grp.group_snapshot_id]


def test_a_group_member_cannot_be_deleted_alone(driver, res, two_volumes):
    vols, _ = two_volumes
    grp_name = unique("g")
    grp = res.group([v.volume_id for v in vols], name=grp_name)
    member = grp.snapshots[0]
    assert_code(Code.FAILED_PRECONDITION, driver.controller.DeleteSnapshot,
                pb.DeleteSnapshotRequest(snapshot_id=member.snapshot_id))
    assert driver.snapshot_file(member.snapshot_id).exists()


def test_source_volumes_of_a_group_snapshot_can_be_deleted(driver, res):
    ctl = driver.controller
    vols = [ctl.CreateVolume(pb.CreateVolumeRequest(name=unique(), volume_capabilities=[mount_cap()],
                                                    capacity_range=pb.CapacityRange(required_bytes=SMALL))).volume
            for _ in range(2)]
    grp = res.group([v.volume_id for v in vols])
    for vol in vols:
        ctl.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id))
    assert len(get_group(driver, grp.group_snapshot_id).snapshots) == 2


# ---------------------------------------------------------------- GetVolumeGroupSnapshot


def test_get_group_snapshot_without_id_is_invalid_argument(driver):
    assert_code(Code.INVALID_ARGUMENT, driver.group.GetVolumeGroupSnapshot, pb.GetVolumeGroupSnapshotRequest())


@pytest.mark.parametrize("group_id", ["fake-vol-id", UNKNOWN_GROUP_ID, "../etc/passwd", "/abs", "grp-\x00"])
def test_get_unknown_or_malformed_group_snapshot_is_not_found(driver, group_id):
    assert_code(Code.NOT_FOUND, driver.group.GetVolumeGroupSnapshot,
                pb.GetVolumeGroupSnapshotRequest(group_snapshot_id=group_id))


def test_get_group_snapshot_returns_its_members(driver, res, two_volumes):
    vols, _ = two_volumes
    grp = res.group([v.volume_id for v in vols])
    got = get_group(driver, grp.group_snapshot_id, [s.snapshot_id for s in grp.snapshots])
    assert got.group_snapshot_id == grp.group_snapshot_id
    assert got.ready_to_use and got.creation_time == grp.creation_time
    assert sorted(s.snapshot_id for s in got.snapshots) == sorted(s.snapshot_id for s in grp.snapshots)


def test_get_group_snapshot_with_wrong_member_ids_is_invalid_argument(driver, res, two_volumes):
    vols, _ = two_volumes
    grp = res.group([v.volume_id for v in vols])
    assert_code(Code.INVALID_ARGUMENT, driver.group.GetVolumeGroupSnapshot, pb.GetVolumeGroupSnapshotRequest(
        group_snapshot_id=grp.group_snapshot_id, snapshot_ids=[grp.snapshots[0].snapshot_id]))


# ---------------------------------------------------------------- DeleteVolumeGroupSnapshot


def test_delete_group_snapshot_without_id_is_invalid_argument(driver):
    assert_code(Code.INVALID_ARGUMENT, driver.group.DeleteVolumeGroupSnapshot, pb.DeleteVolumeGroupSnapshotRequest())


@pytest.mark.parametrize("group_id", ["fake-vol-id", UNKNOWN_GROUP_ID, "../pool", "/abs"])
def test_delete_unknown_or_malformed_group_snapshot_is_ok_and_touches_nothing(driver, group_id):
    before = driver.disk_state()
    driver.group.DeleteVolumeGroupSnapshot(pb.DeleteVolumeGroupSnapshotRequest(group_snapshot_id=group_id))
    assert driver.disk_state() == before


def test_delete_group_snapshot_removes_every_member_and_is_idempotent(driver, res, two_volumes):
    vols, _ = two_volumes
    grp = driver.group.CreateVolumeGroupSnapshot(create_req(unique("grp"), [v.volume_id for v in vols])).group_snapshot
    for _ in range(2):
        driver.group.DeleteVolumeGroupSnapshot(pb.DeleteVolumeGroupSnapshotRequest(
            group_snapshot_id=grp.group_snapshot_id))
    assert_code(Code.NOT_FOUND, driver.group.GetVolumeGroupSnapshot,
                pb.GetVolumeGroupSnapshotRequest(group_snapshot_id=grp.group_snapshot_id))
    for snap in grp.snapshots:
        assert not driver.snapshot_file(snap.snapshot_id).exists()
        assert list(driver.controller.ListSnapshots(pb.ListSnapshotsRequest(snapshot_id=snap.snapshot_id)).entries) == []


def test_delete_group_snapshot_with_wrong_member_ids_is_invalid_argument(driver, res, two_volumes):
    vols, _ = two_volumes
    grp = res.group([v.volume_id for v in vols])
    assert_code(Code.INVALID_ARGUMENT, driver.group.DeleteVolumeGroupSnapshot, pb.DeleteVolumeGroupSnapshotRequest(
        group_snapshot_id=grp.group_snapshot_id, snapshot_ids=["snap-" + "0" * 32]))
    assert get_group(driver, grp.group_snapshot_id).group_snapshot_id == grp.group_snapshot_id


def test_a_group_name_can_be_reused_after_deleting_the_group(driver, res, two_volumes):
    vols, _ = two_volumes
    name = unique("grp")
    first = driver.group.CreateVolumeGroupSnapshot(create_req(name, [vols[0].volume_id])).group_snapshot
    driver.group.DeleteVolumeGroupSnapshot(pb.DeleteVolumeGroupSnapshotRequest(group_snapshot_id=first.group_snapshot_id))
    second = res.group([v.volume_id for v in vols], name)
    assert second.group_snapshot_id != first.group_snapshot_id and len(second.snapshots) == 2


# ---------------------------------------------------------------- member names vs. ordinary snapshot names


def create_snapshot(driver, name: str, volume_id: str) -> pb.Snapshot:
    return driver.controller.CreateSnapshot(pb.CreateSnapshotRequest(name=name, source_volume_id=volume_id)).snapshot


def test_an_ordinary_snapshot_named_like_a_member_is_a_new_snapshot(driver, res, two_volumes):
    vols, data = two_volumes
    name = unique("g")
    grp = res.group([v.volume_id for v in vols], name=name)
    members = {s.snapshot_id for s in grp.snapshots}
    for vol in vols:
        snap = create_snapshot(driver, f"{name}-{vol.volume_id}", vol.volume_id)  # the old member name
        res._undo.append(("snapshot", (snap.snapshot_id,)))
        assert snap.snapshot_id not in members
        assert not snap.group_snapshot_id
        again = create_snapshot(driver, f"{name}-{vol.volume_id}", vol.volume_id)
        assert again.snapshot_id == snap.snapshot_id  # idempotent on its own name, still not a member
    assert {s.snapshot_id for s in get_group(driver, grp.group_snapshot_id).snapshots} == members
    # deleting an ordinary snapshot never touches a member, and the other way round
    driver.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    assert {s.snapshot_id for s in get_group(driver, grp.group_snapshot_id).snapshots} == members


def test_a_group_is_created_even_when_ordinary_snapshots_hold_its_old_member_names(driver, res, two_volumes):
    vols, _ = two_volumes
    name = unique("g")
    taken = [res.snapshot(v.volume_id, name=f"{name}-{v.volume_id}") for v in vols]
    grp = res.group([v.volume_id for v in vols], name=name)
    assert len(grp.snapshots) == 2
    assert {s.snapshot_id for s in grp.snapshots}.isdisjoint(s.snapshot_id for s in taken)
    assert all(s.group_snapshot_id == grp.group_snapshot_id for s in grp.snapshots)


def test_create_snapshot_cannot_name_the_member_namespace(driver, res, two_volumes):
    vols, _ = two_volumes
    grp_name = unique("g")
    grp = res.group([v.volume_id for v in vols], name=grp_name)
    member = grp.snapshots[0]
    name = f"\x1fgroup/{grp_name}-{member.source_volume_id}"
    assert_code(Code.INVALID_ARGUMENT, driver.controller.CreateSnapshot,
                pb.CreateSnapshotRequest(name=name, source_volume_id=member.source_volume_id))
