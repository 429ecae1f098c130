"""Conformance: snapshots and clones (CreateSnapshot, DeleteSnapshot, ListSnapshots, GetSnapshot,
CreateVolume from a snapshot or a volume) against a real `pvlun serve`. Data is written
straight into the LUN files the pool holds, where ControllerPublish's lunPath points."""

from __future__ import annotations

import os

import pytest

from csi_support import (
    MALFORMED_IDS, MiB, SMALL, UNKNOWN_VOLUME_ID, Code, assert_code, block_cap, mount_cap, read_at, unique, write_at,
)
from csi.proto import csi_pb2 as pb

UNKNOWN_SNAPSHOT_ID = "snap-" + "0" * 32
PATTERN_A = b"snapshot-me:" + os.urandom(4096 - 12)
PATTERN_B = b"overwritten:" + os.urandom(4096 - 12)


def from_snapshot(snapshot_id: str) -> pb.VolumeContentSource:
    return pb.VolumeContentSource(snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id=snapshot_id))


def from_volume(volume_id: str) -> pb.VolumeContentSource:
    return pb.VolumeContentSource(volume=pb.VolumeContentSource.VolumeSource(volume_id=volume_id))


def lun_of(driver, res, volume_id: str, cap: pb.VolumeCapability | None = None) -> str:
    """The LUN file in the pool, which ControllerPublishVolume exports: the path a node gets
    on the file backend, the LUN of the target it names on iscsi."""
    ctx = res.publish(volume_id, cap or mount_cap())
    if driver.backend == "iscsi":
        assert ctx["backend"] == "iscsi" and ctx["targetIQN"] and ctx["lun"].isdigit()
        return str(driver.lun(volume_id))
    assert os.path.isabs(ctx["lunPath"])
    assert os.path.samefile(ctx["lunPath"], driver.lun(volume_id))
    return ctx["lunPath"]


def list_snapshots(driver, **fields) -> list[pb.Snapshot]:
    return [e.snapshot for e in driver.controller.ListSnapshots(pb.ListSnapshotsRequest(**fields)).entries]


# ---------------------------------------------------------------- CreateSnapshot


def test_create_snapshot_without_name_is_invalid_argument(driver):
    assert_code(Code.INVALID_ARGUMENT, driver.controller.CreateSnapshot,
                pb.CreateSnapshotRequest(source_volume_id="testId"))


def test_create_snapshot_without_source_volume_is_invalid_argument(driver):
    assert_code(Code.INVALID_ARGUMENT, driver.controller.CreateSnapshot, pb.CreateSnapshotRequest(name="name"))


@pytest.mark.parametrize("volume_id", MALFORMED_IDS + [UNKNOWN_VOLUME_ID])
def test_create_snapshot_of_unknown_or_malformed_volume_is_not_found_and_touches_nothing(driver, volume_id):
    before = driver.disk_state()
    assert_code(Code.NOT_FOUND, driver.controller.CreateSnapshot,
                pb.CreateSnapshotRequest(name=unique("snap"), source_volume_id=volume_id))
    assert driver.disk_state() == before


def test_create_snapshot_is_ready_with_creation_time_and_size(driver, res):
    vol = res.volume()
    snap = res.snapshot(vol.volume_id)
    assert snap.snapshot_id.startswith("snap-")
    assert snap.source_volume_id == vol.volume_id
    assert snap.ready_to_use
    assert snap.creation_time.seconds > 0
    assert snap.size_bytes == vol.capacity_bytes
    assert driver.snapshot_file(snap.snapshot_id).exists()


def test_create_snapshot_same_name_same_source_is_idempotent(driver, res):
    vol = res.volume()
    name = unique("snap")
    snap = res.snapshot(vol.volume_id, name)
    for _ in range(3):
        again = driver.controller.CreateSnapshot(pb.CreateSnapshotRequest(name=name, source_volume_id=vol.volume_id))
        assert again.snapshot.snapshot_id == snap.snapshot_id
        assert again.snapshot.creation_time == snap.creation_time


def test_create_snapshot_same_name_different_source_is_already_exists(driver, res):
    one, two = res.volume(), res.volume()
    name = unique("snap")
    res.snapshot(one.volume_id, name)
    assert_code(Code.ALREADY_EXISTS, driver.controller.CreateSnapshot,
                pb.CreateSnapshotRequest(name=name, source_volume_id=two.volume_id))


def test_create_snapshot_with_maximum_length_name_succeeds_twice(driver, res):
    vol = res.volume()
    name = ("snap-" + "y" * 128)[:128]
    snap = res.snapshot(vol.volume_id, name)
    again = driver.controller.CreateSnapshot(pb.CreateSnapshotRequest(name=name, source_volume_id=vol.volume_id))
    assert again.snapshot.snapshot_id == snap.snapshot_id


def test_snapshot_keeps_the_bytes_of_the_moment_it_was_taken(driver, res):
    vol = res.volume()
    lun = lun_of(driver, res, vol.volume_id)
    write_at(lun, 1 * MiB, PATTERN_A)
    snap = res.snapshot(vol.volume_id)
    write_at(lun, 1 * MiB, PATTERN_B)
    assert read_at(str(driver.snapshot_file(snap.snapshot_id)), 1 * MiB, len(PATTERN_A)) == PATTERN_A


# ---------------------------------------------------------------- restore and clone


def test_volume_restored_from_snapshot_holds_the_snapshot_bytes_and_names_its_source(driver, res):
    vol = res.volume(cap=block_cap())
    lun = lun_of(driver, res, vol.volume_id, block_cap())
    write_at(lun, 0, PATTERN_A)
    write_at(lun, SMALL - 4096, PATTERN_A)
    snap = res.snapshot(vol.volume_id)
    write_at(lun, 0, PATTERN_B)
    restored = res.volume(cap=block_cap(), volume_content_source=from_snapshot(snap.snapshot_id))
    assert restored.content_source.snapshot.snapshot_id == snap.snapshot_id
    assert restored.capacity_bytes == SMALL
    assert read_at(lun_of(driver, res, restored.volume_id, block_cap()), 0, len(PATTERN_A)) == PATTERN_A
    assert read_at(str(driver.lun(restored.volume_id)), SMALL - 4096, 4096) == PATTERN_A


def test_volume_restored_from_snapshot_can_be_bigger_than_the_snapshot(driver, res):
    vol = res.volume()
    write_at(lun_of(driver, res, vol.volume_id), 4096, PATTERN_A)
    snap = res.snapshot(vol.volume_id)
    restored = res.volume(size=3 * SMALL, volume_content_source=from_snapshot(snap.snapshot_id))
    assert restored.capacity_bytes == 3 * SMALL
    assert driver.lun(restored.volume_id).stat().st_size == 3 * SMALL
    assert read_at(str(driver.lun(restored.volume_id)), 4096, len(PATTERN_A)) == PATTERN_A


def test_volume_restored_smaller_than_its_snapshot_is_out_of_range(driver, res):
    vol = res.volume(size=2 * SMALL)
    snap = res.snapshot(vol.volume_id)
    before = driver.disk_state()
    req = pb.CreateVolumeRequest(name=unique(), volume_capabilities=[mount_cap()],
                                 capacity_range=pb.CapacityRange(required_bytes=SMALL, limit_bytes=SMALL),
                                 volume_content_source=from_snapshot(snap.snapshot_id))
    assert_code(Code.OUT_OF_RANGE, driver.controller.CreateVolume, req)
    assert driver.disk_state() == before


def test_restoring_the_same_name_from_the_same_snapshot_is_idempotent(driver, res):
    vol = res.volume()
    snap = res.snapshot(vol.volume_id)
    name = unique()
    restored = res.volume(name, volume_content_source=from_snapshot(snap.snapshot_id))
    again = driver.controller.CreateVolume(pb.CreateVolumeRequest(
        name=name, volume_capabilities=[mount_cap()], capacity_range=pb.CapacityRange(required_bytes=SMALL, limit_bytes=SMALL),
        volume_content_source=from_snapshot(snap.snapshot_id))).volume
    assert again.volume_id == restored.volume_id


def test_same_name_from_another_snapshot_is_already_exists(driver, res):
    vol = res.volume()
    first, second = res.snapshot(vol.volume_id), res.snapshot(vol.volume_id)
    name = unique()
    res.volume(name, volume_content_source=from_snapshot(first.snapshot_id))
    req = pb.CreateVolumeRequest(name=name, volume_capabilities=[mount_cap()],
                                 capacity_range=pb.CapacityRange(required_bytes=SMALL, limit_bytes=SMALL),
                                 volume_content_source=from_snapshot(second.snapshot_id))
    assert_code(Code.ALREADY_EXISTS, driver.controller.CreateVolume, req)


def test_clone_holds_the_source_bytes_and_can_be_bigger(driver, res):
    src = res.volume()
    lun = lun_of(driver, res, src.volume_id)
    write_at(lun, 2 * MiB, PATTERN_A)
    clone = res.volume(size=2 * SMALL, volume_content_source=from_volume(src.volume_id))
    assert clone.capacity_bytes == 2 * SMALL
    assert clone.content_source.volume.volume_id == src.volume_id
    clone_lun = lun_of(driver, res, clone.volume_id)
    assert os.stat(clone_lun).st_size == 2 * SMALL
    assert read_at(clone_lun, 2 * MiB, len(PATTERN_A)) == PATTERN_A


def test_clone_and_source_are_independent_after_cloning(driver, res):
    src = res.volume()
    lun = lun_of(driver, res, src.volume_id)
    write_at(lun, 0, PATTERN_A)
    clone = res.volume(volume_content_source=from_volume(src.volume_id))
    write_at(lun, 0, PATTERN_B)
    write_at(str(driver.lun(clone.volume_id)), 8192, PATTERN_B)
    assert read_at(str(driver.lun(clone.volume_id)), 0, len(PATTERN_A)) == PATTERN_A
    assert read_at(lun, 8192, len(PATTERN_B)) == b"\0" * len(PATTERN_B)


def test_clone_smaller_than_its_source_is_out_of_range(driver, res):
    src = res.volume(size=2 * SMALL)
    req = pb.CreateVolumeRequest(name=unique(), volume_capabilities=[mount_cap()],
                                 capacity_range=pb.CapacityRange(required_bytes=SMALL, limit_bytes=SMALL),
                                 volume_content_source=from_volume(src.volume_id))
    assert_code(Code.OUT_OF_RANGE, driver.controller.CreateVolume, req)


def test_deleting_a_volume_with_snapshots_succeeds_and_the_snapshot_still_restores(driver):
    ctl = driver.controller
    vol = ctl.CreateVolume(pb.CreateVolumeRequest(name=unique(), volume_capabilities=[mount_cap()],
                                                  capacity_range=pb.CapacityRange(required_bytes=SMALL))).volume
    write_at(str(driver.lun(vol.volume_id)), 0, PATTERN_A)
    snap = ctl.CreateSnapshot(pb.CreateSnapshotRequest(name=unique("snap"), source_volume_id=vol.volume_id)).snapshot
    ctl.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id))
    assert not driver.lun(vol.volume_id).exists()
    listed = list_snapshots(driver, snapshot_id=snap.snapshot_id)
    assert [s.source_volume_id for s in listed] == [vol.volume_id]
    restored = ctl.CreateVolume(pb.CreateVolumeRequest(name=unique(), volume_capabilities=[mount_cap()],
                                                       volume_content_source=from_snapshot(snap.snapshot_id))).volume
    try:
        assert read_at(str(driver.lun(restored.volume_id)), 0, len(PATTERN_A)) == PATTERN_A
    finally:
        ctl.DeleteVolume(pb.DeleteVolumeRequest(volume_id=restored.volume_id))
        ctl.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))


# ---------------------------------------------------------------- DeleteSnapshot


def test_delete_snapshot_without_id_is_invalid_argument(driver):
    assert_code(Code.INVALID_ARGUMENT, driver.controller.DeleteSnapshot, pb.DeleteSnapshotRequest())


@pytest.mark.parametrize("snapshot_id", ["reallyfakesnapshotid", UNKNOWN_SNAPSHOT_ID, "../pool/volumes",
                                         "/etc/passwd", "snap-" + "0" * 31 + "\x00"])
def test_delete_snapshot_with_unknown_or_malformed_id_is_ok_and_touches_nothing(driver, res, snapshot_id):
    res.snapshot(res.volume().volume_id)
    before = driver.disk_state()
    driver.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snapshot_id))
    assert driver.disk_state() == before


def test_delete_snapshot_removes_its_file_and_is_idempotent(driver, res):
    vol = res.volume()
    snap = driver.controller.CreateSnapshot(pb.CreateSnapshotRequest(name=unique("snap"),
                                                                     source_volume_id=vol.volume_id)).snapshot
    for _ in range(2):
        driver.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    assert not driver.snapshot_file(snap.snapshot_id).exists()
    assert list_snapshots(driver, snapshot_id=snap.snapshot_id) == []


def test_volume_from_a_deleted_snapshot_is_not_found(driver, res):
    vol = res.volume()
    snap = driver.controller.CreateSnapshot(pb.CreateSnapshotRequest(name=unique("snap"),
                                                                     source_volume_id=vol.volume_id)).snapshot
    driver.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    assert_code(Code.NOT_FOUND, driver.controller.CreateVolume,
                pb.CreateVolumeRequest(name=unique(), volume_capabilities=[mount_cap()],
                                       volume_content_source=from_snapshot(snap.snapshot_id)))


# ---------------------------------------------------------------- ListSnapshots


def test_list_snapshots_filters_by_snapshot_id(driver, res):
    snaps = [res.snapshot(res.volume().volume_id) for _ in range(3)]
    listed = list_snapshots(driver, snapshot_id=snaps[1].snapshot_id)
    assert [s.snapshot_id for s in listed] == [snaps[1].snapshot_id]
    assert listed[0].creation_time.seconds > 0 and listed[0].source_volume_id == snaps[1].source_volume_id


@pytest.mark.parametrize("snapshot_id", ["none-exist-id", UNKNOWN_SNAPSHOT_ID, "../etc/passwd"])
def test_list_snapshots_with_unknown_snapshot_id_is_empty(driver, snapshot_id):
    assert list_snapshots(driver, snapshot_id=snapshot_id) == []


def test_list_snapshots_filters_by_source_volume(driver, res):
    vols = [res.volume() for _ in range(2)]
    mine = {res.snapshot(vols[0].volume_id).snapshot_id for _ in range(2)}
    res.snapshot(vols[1].volume_id)
    listed = list_snapshots(driver, source_volume_id=vols[0].volume_id)
    assert {s.snapshot_id for s in listed} == mine


@pytest.mark.parametrize("volume_id", ["fake-vol-id-0123456789", UNKNOWN_VOLUME_ID, "/etc/passwd"])
def test_list_snapshots_with_unknown_source_volume_is_empty(driver, volume_id):
    assert list_snapshots(driver, source_volume_id=volume_id) == []


def test_list_snapshots_by_id_and_other_source_is_empty(driver, res):
    one, two = res.volume(), res.volume()
    snap = res.snapshot(one.volume_id)
    assert list_snapshots(driver, snapshot_id=snap.snapshot_id, source_volume_id=two.volume_id) == []


def test_list_snapshots_shows_new_snapshots_and_not_deleted_ones(driver, res):
    vol = res.volume()
    before = len(list_snapshots(driver))
    snap = driver.controller.CreateSnapshot(pb.CreateSnapshotRequest(name=unique("snap"),
                                                                     source_volume_id=vol.volume_id)).snapshot
    assert len(list_snapshots(driver)) == before + 1
    driver.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    assert len(list_snapshots(driver)) == before


def test_list_snapshots_returns_a_next_token_for_a_limited_page(driver, res):
    vol = res.volume()
    for _ in range(5):
        res.snapshot(vol.volume_id)
    total = len(list_snapshots(driver))
    first = driver.controller.ListSnapshots(pb.ListSnapshotsRequest(max_entries=2))
    assert len(first.entries) == 2 and first.next_token
    rest = driver.controller.ListSnapshots(pb.ListSnapshotsRequest(starting_token=first.next_token))
    assert len(rest.entries) == total - 2 and not rest.next_token
    seen = [e.snapshot.snapshot_id for e in list(first.entries) + list(rest.entries)]
    assert len(set(seen)) == total
    for entry in list(first.entries) + list(rest.entries):
        assert entry.snapshot.creation_time.seconds > 0


def test_list_snapshots_pages_by_source_volume(driver, res):
    vol = res.volume()
    made = {res.snapshot(vol.volume_id).snapshot_id for _ in range(3)}
    seen, token = [], ""
    while True:
        rsp = driver.controller.ListSnapshots(pb.ListSnapshotsRequest(
            max_entries=1, starting_token=token, source_volume_id=vol.volume_id))
        seen += [e.snapshot.snapshot_id for e in rsp.entries]
        token = rsp.next_token
        if not token:
            break
    assert sorted(seen) == sorted(made)


def test_list_snapshots_with_invalid_token_is_aborted(driver):
    for token in ("invalid-token", "vol-" + "0" * 32):
        assert_code(Code.ABORTED, driver.controller.ListSnapshots, pb.ListSnapshotsRequest(starting_token=token))


# ---------------------------------------------------------------- GetSnapshot (advertised: GET_SNAPSHOT)


def test_get_snapshot_returns_the_snapshot(driver, res):
    snap = res.snapshot(res.volume().volume_id)
    got = driver.controller.GetSnapshot(pb.GetSnapshotRequest(snapshot_id=snap.snapshot_id)).snapshot
    assert got.snapshot_id == snap.snapshot_id and got.source_volume_id == snap.source_volume_id
    assert got.ready_to_use and got.creation_time == snap.creation_time


def test_get_snapshot_without_id_is_invalid_argument_and_unknown_is_not_found(driver):
    assert_code(Code.INVALID_ARGUMENT, driver.controller.GetSnapshot, pb.GetSnapshotRequest())
    for snapshot_id in ("non-existing-snapshot-id", UNKNOWN_SNAPSHOT_ID, "../x"):
        assert_code(Code.NOT_FOUND, driver.controller.GetSnapshot, pb.GetSnapshotRequest(snapshot_id=snapshot_id))
