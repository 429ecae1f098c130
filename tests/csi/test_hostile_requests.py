"""Hostile: requests built to make the driver talk too much. 100 KB IDs, names, parameter
and secret keys, paths with NUL and newlines, over real gRPC to every RPC that takes them:
each gets the right code (INVALID_ARGUMENT / NOT_FOUND, or OK where the spec makes an
unknown ID a no-op) and a short message holding at most 64 characters of the input, no
daemon host path and no Python repr — a whole 100 KB echo used to turn every such call into
RESOURCE_EXHAUSTED, the reply's header being too large. Counts and lengths are bounded too:
100,000 mount flags or a 100 KB parameter value are INVALID_ARGUMENT when asked for, not
stored to fail later ("Argument list too long"). GET_SNAPSHOT is advertised."""

from __future__ import annotations

import secrets
from typing import Any, Callable

import pytest

from csi_support import NODE_ID, SMALL, Code, assert_code, block_cap, mount_cap, unique
from csi.errors import SHOWN_CHARS, public_message
from csi.proto import csi_pb2 as pb

RPC = pb.ControllerServiceCapability.RPC.Type
OK = Code.OK


MADE: list[str] = []  # the hostile values of the request being built


def hostile(prefix: str = "") -> str:
    """About 100 KB no two windows of which repeat (random hex), with a NUL and newlines."""
    body = secrets.token_hex(50_000)
    MADE.append(f"{prefix}{body[:40_000]}\n\x00{body[40_000:80_000]}\r\n{body[80_000:]}")
    return MADE[-1]


def hostile_path() -> str:
    return "/tmp/" + hostile()


def newline_path() -> str:
    """Under the path length limit, no NUL, but a newline (mountinfo and mount(8) split on it)."""
    MADE.append(f"/tmp/{secrets.token_hex(1900)}\n/x")
    return MADE[-1]


def echoes(message: str, value: str) -> bool:
    """Does the message hold more than SHOWN_CHARS consecutive characters of value?"""
    width = SHOWN_CHARS + 1
    return any(message[i:i + width] in value for i in range(max(0, len(message) - width + 1)))


class Ids:
    """Real objects, so that a hostile field is the only thing wrong with a request."""

    def __init__(self, res):
        self.volume = res.volume(cap=block_cap()).volume_id
        self.snapshot = res.snapshot(self.volume).snapshot_id
        self.context = res.publish(self.volume, block_cap())


def cases() -> list[tuple[str, str, Callable[[Ids], Any], set]]:
    """(service, method, request from the real IDs, the codes the spec allows)."""
    found, invalid, gone = {Code.NOT_FOUND}, {Code.INVALID_ARGUMENT}, {OK, Code.NOT_FOUND}
    cap, rng = mount_cap(), pb.CapacityRange(required_bytes=SMALL)

    def create(**fields) -> pb.CreateVolumeRequest:
        fields.setdefault("name", unique())
        fields.setdefault("volume_capabilities", [cap])
        return pb.CreateVolumeRequest(capacity_range=rng, **fields)

    def src_snapshot(i: str) -> pb.VolumeContentSource:
        return pb.VolumeContentSource(snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id=i))

    def src_volume(i: str) -> pb.VolumeContentSource:
        return pb.VolumeContentSource(volume=pb.VolumeContentSource.VolumeSource(volume_id=i))

    c, g, n = "controller", "group", "node"
    return [
        (c, "CreateVolume", lambda ids: create(name=hostile()), invalid),
        (c, "CreateVolume", lambda ids: create(parameters={hostile(): "1"}), invalid),
        (c, "CreateVolume", lambda ids: create(parameters={"maxIOPS": hostile()}), invalid),
        (c, "CreateVolume", lambda ids: create(mutable_parameters={hostile(): "1"}), invalid),
        (c, "CreateVolume", lambda ids: create(secrets={hostile(): hostile()},
                                               volume_content_source=src_snapshot(hostile("snap-"))), found),
        (c, "CreateVolume", lambda ids: create(volume_content_source=src_volume(hostile("vol-"))), found),
        (c, "CreateVolume", lambda ids: create(volume_capabilities=[mount_cap(fs_type=hostile())]), invalid),
        (c, "CreateVolume", lambda ids: create(volume_capabilities=[mount_cap(flags=(hostile(),))]), invalid),
        (c, "DeleteVolume", lambda ids: pb.DeleteVolumeRequest(volume_id=hostile("vol-"), secrets={hostile(): "x"}),
         {OK}),
        (c, "ControllerPublishVolume", lambda ids: pb.ControllerPublishVolumeRequest(
            volume_id=hostile("vol-"), node_id=NODE_ID, volume_capability=block_cap()), found),
        (c, "ControllerPublishVolume", lambda ids: pb.ControllerPublishVolumeRequest(
            volume_id=ids.volume, node_id=hostile(), volume_capability=block_cap()), invalid | found),
        (c, "ControllerUnpublishVolume", lambda ids: pb.ControllerUnpublishVolumeRequest(
            volume_id=hostile("vol-"), node_id=hostile()), {OK}),
        (c, "ValidateVolumeCapabilities", lambda ids: pb.ValidateVolumeCapabilitiesRequest(
            volume_id=hostile("vol-"), volume_capabilities=[cap]), found),
        (c, "ListVolumes", lambda ids: pb.ListVolumesRequest(starting_token=hostile()), {Code.ABORTED}),
        (c, "GetCapacity", lambda ids: pb.GetCapacityRequest(parameters={hostile(): hostile()}), {OK}),
        (c, "ControllerGetVolume", lambda ids: pb.ControllerGetVolumeRequest(volume_id=hostile("vol-")), found),
        (c, "ControllerExpandVolume", lambda ids: pb.ControllerExpandVolumeRequest(
            volume_id=hostile("vol-"), capacity_range=rng), found),
        (c, "ControllerModifyVolume", lambda ids: pb.ControllerModifyVolumeRequest(
            volume_id=hostile("vol-"), mutable_parameters={"maxIOPS": "10"}), found),
        (c, "ControllerModifyVolume", lambda ids: pb.ControllerModifyVolumeRequest(
            volume_id=ids.volume, mutable_parameters={hostile(): hostile()}), invalid),
        (c, "CreateSnapshot", lambda ids: pb.CreateSnapshotRequest(name=unique(), source_volume_id=hostile("vol-")),
         found),
        (c, "CreateSnapshot", lambda ids: pb.CreateSnapshotRequest(name=hostile(), source_volume_id=ids.volume),
         invalid),
        (c, "DeleteSnapshot", lambda ids: pb.DeleteSnapshotRequest(snapshot_id=hostile("snap-")), {OK}),
        (c, "ListSnapshots", lambda ids: pb.ListSnapshotsRequest(snapshot_id=hostile("snap-")), {OK}),
        (c, "ListSnapshots", lambda ids: pb.ListSnapshotsRequest(source_volume_id=hostile("vol-")), {OK}),
        (c, "ListSnapshots", lambda ids: pb.ListSnapshotsRequest(starting_token=hostile()), {Code.ABORTED}),
        (c, "GetSnapshot", lambda ids: pb.GetSnapshotRequest(snapshot_id=hostile("snap-")), found),
        (g, "CreateVolumeGroupSnapshot", lambda ids: pb.CreateVolumeGroupSnapshotRequest(
            name=hostile(), source_volume_ids=[ids.volume]), invalid),
        (g, "CreateVolumeGroupSnapshot", lambda ids: pb.CreateVolumeGroupSnapshotRequest(
            name=unique(), source_volume_ids=[hostile("vol-")]), found),
        (g, "GetVolumeGroupSnapshot", lambda ids: pb.GetVolumeGroupSnapshotRequest(
            group_snapshot_id=hostile("grp-")), found),
        (g, "DeleteVolumeGroupSnapshot", lambda ids: pb.DeleteVolumeGroupSnapshotRequest(
            group_snapshot_id=hostile("grp-")), {OK}),
        (n, "NodeStageVolume", lambda ids: pb.NodeStageVolumeRequest(
            volume_id=hostile("vol-"), staging_target_path="/tmp/pvlun-hostile", volume_capability=block_cap(),
            publish_context=ids.context), found),
        (n, "NodeStageVolume", lambda ids: pb.NodeStageVolumeRequest(
            volume_id=ids.volume, staging_target_path=hostile_path(), volume_capability=block_cap(),
            publish_context=ids.context), invalid),
        (n, "NodeStageVolume", lambda ids: pb.NodeStageVolumeRequest(
            volume_id=ids.volume, staging_target_path="/tmp/pvlun-hostile", volume_capability=block_cap(),
            publish_context={"lunPath": hostile_path()}), invalid),
        (n, "NodeStageVolume", lambda ids: pb.NodeStageVolumeRequest(
            volume_id=ids.volume, staging_target_path=newline_path(), volume_capability=block_cap(),
            publish_context=ids.context), invalid),
        (n, "NodeUnstageVolume", lambda ids: pb.NodeUnstageVolumeRequest(
            volume_id=hostile("vol-"), staging_target_path="/tmp/pvlun-hostile"), found),
        (n, "NodeUnstageVolume", lambda ids: pb.NodeUnstageVolumeRequest(
            volume_id=ids.volume, staging_target_path=hostile_path()), invalid),
        (n, "NodePublishVolume", lambda ids: pb.NodePublishVolumeRequest(
            volume_id=ids.volume, staging_target_path="/tmp/pvlun-hostile", target_path=hostile_path(),
            volume_capability=block_cap(), publish_context=ids.context), invalid),
        (n, "NodePublishVolume", lambda ids: pb.NodePublishVolumeRequest(
            volume_id=hostile("vol-"), staging_target_path="/tmp/pvlun-hostile", target_path="/tmp/pvlun-t",
            volume_capability=block_cap(), publish_context=ids.context), found),
        (n, "NodeUnpublishVolume", lambda ids: pb.NodeUnpublishVolumeRequest(
            volume_id=ids.volume, target_path=hostile_path()), invalid),
        (n, "NodeUnpublishVolume", lambda ids: pb.NodeUnpublishVolumeRequest(
            volume_id=hostile("vol-"), target_path="/tmp/pvlun-t"), found),
        (n, "NodeGetVolumeStats", lambda ids: pb.NodeGetVolumeStatsRequest(
            volume_id=hostile("vol-"), volume_path="/tmp/pvlun-t"), found),
        (n, "NodeGetVolumeStats", lambda ids: pb.NodeGetVolumeStatsRequest(
            volume_id=ids.volume, volume_path=hostile_path()), found | invalid),
        (n, "NodeExpandVolume", lambda ids: pb.NodeExpandVolumeRequest(
            volume_id=hostile("vol-"), volume_path="/tmp/pvlun-t"), found),
    ]


CASES = cases()


@pytest.mark.parametrize("service, method, build, codes", CASES,
                         ids=[f"{m}-{i}" for i, (_, m, _, _) in enumerate(CASES)])
def test_a_hostile_request_gets_the_right_code_and_a_short_message(driver, res, service, method, build, codes):
    ids = Ids(res)
    MADE.clear()
    request = build(ids)
    stub = {"controller": driver.controller, "group": driver.group, "node": driver.node}[service]
    values = list(MADE)
    assert values, "the request holds no hostile value"
    try:
        getattr(stub, method)(request)
        code, message = OK, ""
    except Exception as exc:  # grpc.RpcError
        code, message = exc.code(), exc.details() or ""
    assert code in codes, f"{method}: {code.name}: {message[:300]}"
    assert len(message) <= 400, message[:500]
    assert not any(echoes(message, v) for v in values), message
    assert str(driver.data_dir) not in message and "/pool/" not in message and "Error(" not in message
    assert not any(len(record["volume"]) > 200 for record in driver.calls()[-3:])  # nor in the call log


def bounded_cases() -> list[tuple[str, str, Callable[[Ids], Any], str]]:
    """(service, method, request from the real IDs, what the refusal names): each request
    holds one field far beyond its bound, built of harmless entries."""
    many_flags = mount_cap(flags=tuple(["noatime"] * 100_000))
    comma_flags = mount_cap(flags=(",".join(["noatime"] * 100_000),))
    long_flags = mount_cap(flags=tuple(f"uid={i:0200d}" for i in range(60)))
    c, g, n = "controller", "group", "node"

    def create(**fields) -> pb.CreateVolumeRequest:
        fields.setdefault("volume_capabilities", [mount_cap()])
        return pb.CreateVolumeRequest(name=unique(), capacity_range=pb.CapacityRange(required_bytes=SMALL), **fields)

    return [
        (c, "CreateVolume", lambda ids: create(volume_capabilities=[many_flags]), "mount_flags holds 100000 entries"),
        (c, "CreateVolume", lambda ids: create(volume_capabilities=[comma_flags]), "mount_flags holds 100000 entries"),
        (c, "CreateVolume", lambda ids: create(volume_capabilities=[long_flags]), "mount_flags add up to"),
        (c, "CreateVolume", lambda ids: create(parameters={"pvlun.dev/note": "x" * 100_000}),
         "has a value of 100000 characters"),
        (c, "CreateVolume", lambda ids: create(parameters={f"pvlun.dev/k{i}": "1" for i in range(10_000)}),
         "parameters holds 10000 entries"),
        (c, "CreateVolume", lambda ids: create(volume_capabilities=[mount_cap()] * 10_000),
         "volume_capabilities holds 10000 entries"),
        (c, "ValidateVolumeCapabilities", lambda ids: pb.ValidateVolumeCapabilitiesRequest(
            volume_id=ids.volume, volume_capabilities=[block_cap()] * 10_000), "volume_capabilities holds"),
        (c, "CreateSnapshot", lambda ids: pb.CreateSnapshotRequest(
            name=unique(), source_volume_id=ids.volume, parameters={"note": "x" * 100_000}), "has a value of"),
        (g, "CreateVolumeGroupSnapshot", lambda ids: pb.CreateVolumeGroupSnapshotRequest(
            name=unique(), source_volume_ids=[f"vol-{i:032x}" for i in range(5_000)]), "source_volume_ids holds"),
        (n, "NodeStageVolume", lambda ids: pb.NodeStageVolumeRequest(
            volume_id=ids.volume, staging_target_path="/tmp/pvlun-bounded", volume_capability=many_flags,
            publish_context=ids.context), "mount_flags holds 100000 entries"),
    ]


BOUNDED = bounded_cases()


@pytest.mark.parametrize("service, method, build, said", BOUNDED,
                         ids=[f"{m}-{i}" for i, (_, m, _, _) in enumerate(BOUNDED)])
def test_counts_and_lengths_beyond_their_bounds_are_invalid_argument(driver, res, service, method, build, said):
    ids = Ids(res)
    stub = {"controller": driver.controller, "group": driver.group, "node": driver.node}[service]
    before = {v.volume.volume_id for v in driver.controller.ListVolumes(pb.ListVolumesRequest()).entries}
    message = assert_code(Code.INVALID_ARGUMENT, getattr(stub, method), build(ids))
    assert said in message and len(message) <= 400, message[:500]
    after = {v.volume.volume_id for v in driver.controller.ListVolumes(pb.ListVolumesRequest()).entries}
    assert after == before  # nothing made to fail later


@pytest.mark.file_only("the LUN file is unlinked under a running target: tgtd keeps it open and serves it, so an "
                       "iSCSI stage succeeds (tests/csi/test_iscsi_resilience.py covers a target that goes away)")
def test_a_missing_lun_is_named_without_the_pool_path(driver, res):
    vol = res.volume(cap=block_cap())
    ctx = res.publish(vol.volume_id, block_cap())
    driver.lun(vol.volume_id).unlink()
    msg = assert_code(Code.NOT_FOUND, driver.node.NodeStageVolume, pb.NodeStageVolumeRequest(
        volume_id=vol.volume_id, staging_target_path=str(res.staging), volume_capability=block_cap(),
        publish_context=ctx))
    assert "LUN is missing from the pool" in msg and str(driver.pool) not in msg
    # a lunPath the caller sent that points into the pool is not echoed
    other = res.volume(cap=block_cap())
    msg = assert_code(Code.INVALID_ARGUMENT, driver.node.NodeStageVolume, pb.NodeStageVolumeRequest(
        volume_id=vol.volume_id, staging_target_path=str(res.staging), volume_capability=block_cap(),
        publish_context={"lunPath": str(driver.lun(other.volume_id))}))
    assert "is not the LUN of" in msg and str(driver.data_dir) not in msg


def test_every_message_is_capped_and_pool_paths_become_lun_names():
    lun = "/var/lib/pvlun/pool/volumes/vol-" + "ab" * 16 + ".img"
    said = public_message(f"cannot open {lun} (deleted): Permission denied; also '{lun}'")
    assert said == f"cannot open vol-{'ab' * 16}.img: Permission denied; also 'vol-{'ab' * 16}.img'"
    long = public_message("x" * 100_000)
    assert len(long) <= 1024 and "100000 characters" in long


def test_get_snapshot_is_advertised_and_follows_the_spec(driver, res):
    caps = driver.controller.ControllerGetCapabilities(pb.ControllerGetCapabilitiesRequest()).capabilities
    assert "GET_SNAPSHOT" in {RPC.Name(c.rpc.type) for c in caps}
    snap = res.snapshot(res.volume().volume_id)
    got = driver.controller.GetSnapshot(pb.GetSnapshotRequest(snapshot_id=snap.snapshot_id)).snapshot
    assert got.snapshot_id == snap.snapshot_id and got.size_bytes == snap.size_bytes and got.ready_to_use
    assert assert_code(Code.INVALID_ARGUMENT, driver.controller.GetSnapshot, pb.GetSnapshotRequest()) == \
        "snapshot_id is required"
    assert_code(Code.NOT_FOUND, driver.controller.GetSnapshot, pb.GetSnapshotRequest(snapshot_id="snap-" + "0" * 32))
    driver.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    assert_code(Code.NOT_FOUND, driver.controller.GetSnapshot, pb.GetSnapshotRequest(snapshot_id=snap.snapshot_id))
