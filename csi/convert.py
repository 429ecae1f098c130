"""Between protobuf messages and the core's plain records."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from csi.catalog import Snapshot, Volume
from csi.errors import invalid
from csi.proto import csi_pb2 as pb
from csi.validation import Capability

TOPOLOGY_HOST_KEY = "topology.csi.pvlun.dev/host"

_MODES = pb.VolumeCapability.AccessMode.Mode


def reachable_from(segments: dict[str, str], host: str) -> bool:
    """Whether a topology segment admits this host: every key of ours it holds (the host
    key) must match; keys we do not know (the node key, others' keys) do not matter."""
    return segments.get(TOPOLOGY_HOST_KEY, host) == host


def capability(msg: pb.VolumeCapability, what: str = "volume_capability") -> Capability:
    """A VolumeCapability as a plain Capability; missing parts are INVALID_ARGUMENT."""
    kind = msg.WhichOneof("access_type")
    if kind is None:
        raise invalid(f"{what}.access_type (block or mount) is required")
    if not msg.HasField("access_mode"):
        raise invalid(f"{what}.access_mode is required")
    mode = _MODES.Name(msg.access_mode.mode)
    if kind == "block":
        return Capability("block", mode)
    return Capability("mount", mode, msg.mount.fs_type, tuple(msg.mount.mount_flags))


def capability_msg(cap: Capability) -> pb.VolumeCapability:
    msg = pb.VolumeCapability(access_mode=pb.VolumeCapability.AccessMode(mode=_MODES.Value(cap.mode)))
    if cap.access_type == "block":
        msg.block.SetInParent()
    else:
        msg.mount.fs_type = cap.fs_type
        msg.mount.mount_flags.extend(cap.mount_flags)
    return msg


def timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def volume_msg(vol: Volume, host: str) -> pb.Volume:
    msg = pb.Volume(
        volume_id=vol.id,
        capacity_bytes=vol.size,
        volume_context={"sizeBytes": str(vol.size), **vol.mutable},  # keys per notes/PLAN.md
        accessible_topology=[pb.Topology(segments={TOPOLOGY_HOST_KEY: host})] if host else [],
    )
    if vol.source_kind == "snapshot":
        msg.content_source.snapshot.snapshot_id = vol.source_id
    elif vol.source_kind == "volume":
        msg.content_source.volume.volume_id = vol.source_id
    return msg


def snapshot_msg(snap: Snapshot) -> pb.Snapshot:
    return pb.Snapshot(
        snapshot_id=snap.id,
        source_volume_id=snap.volume_id,
        size_bytes=snap.size,
        creation_time=timestamp(snap.created),
        ready_to_use=True,
        group_snapshot_id=snap.group_id,
    )


def condition(healthy: bool, message: str) -> pb.VolumeCondition:
    return pb.VolumeCondition(abnormal=not healthy, message=message)
