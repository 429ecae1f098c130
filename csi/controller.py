"""CSI Controller service: validate the request's shape, call the core, build the reply."""

from __future__ import annotations

import socket

from csi import convert
from csi.errors import CsiError, exhausted, invalid
from csi.lun_service import LunService
from csi.proto import csi_pb2 as pb
from csi.proto import csi_pb2_grpc
from csi.validation import MAX_CAPABILITIES, check_capability, check_count, require

_RPC = pb.ControllerServiceCapability.RPC.Type
CAPABILITIES = [
    "CREATE_DELETE_VOLUME", "PUBLISH_UNPUBLISH_VOLUME", "LIST_VOLUMES", "GET_CAPACITY",
    "CREATE_DELETE_SNAPSHOT", "LIST_SNAPSHOTS", "CLONE_VOLUME", "EXPAND_VOLUME",
    "LIST_VOLUMES_PUBLISHED_NODES", "VOLUME_CONDITION", "GET_VOLUME", "SINGLE_NODE_MULTI_WRITER",
    "MODIFY_VOLUME", "PUBLISH_READONLY", "GET_SNAPSHOT",
]


class ControllerService(csi_pb2_grpc.ControllerServicer):
    def __init__(self, luns: LunService, host: str | None = None):
        self.luns = luns
        self.host = host or socket.gethostname()

    def ControllerGetCapabilities(self, request, context):
        return pb.ControllerGetCapabilitiesResponse(capabilities=[
            pb.ControllerServiceCapability(rpc=pb.ControllerServiceCapability.RPC(type=_RPC.Value(c)))
            for c in CAPABILITIES])

    def CreateVolume(self, request, context):
        require(request.name, "name")
        require(request.volume_capabilities, "volume_capabilities")
        check_count(request.volume_capabilities, "volume_capabilities", MAX_CAPABILITIES)
        caps = [convert.capability(c, f"volume_capabilities[{i}]") for i, c in enumerate(request.volume_capabilities)]
        kind, source_id = "", ""
        if request.HasField("volume_content_source"):
            src = request.volume_content_source
            kind = src.WhichOneof("type") or ""
            if kind == "snapshot":
                source_id = src.snapshot.snapshot_id
            elif kind == "volume":
                source_id = src.volume.volume_id
            else:
                raise invalid("volume_content_source must name a snapshot or a volume")
            require(source_id, f"volume_content_source.{kind} id")
        if request.HasField("accessibility_requirements") and not self.luns.wants_export(dict(request.parameters)):
            self._check_topology(request.accessibility_requirements)
        rng = request.capacity_range
        vol = self.luns.create_volume(request.name, rng.required_bytes, rng.limit_bytes, caps,
                                      dict(request.parameters), dict(request.mutable_parameters), kind, source_id,
                                      secrets=dict(request.secrets))
        return pb.CreateVolumeResponse(volume=convert.volume_msg(vol, self._host_of(vol.id)))

    def _host_of(self, volume_id: str) -> str:
        """The host a volume is reachable from: this one, or "" for an exported (iSCSI)
        volume, which every node reaches over the network (no accessible_topology)."""
        return "" if self.luns.exported(volume_id) else self.host

    def _check_topology(self, requirements: pb.TopologyRequirement) -> None:
        """Volumes live on this host: some requisite segment must admit it (preferred is advisory)."""
        requisite = [dict(t.segments) for t in requirements.requisite]
        if requisite and not any(convert.reachable_from(seg, self.host) for seg in requisite):
            raise exhausted(f"the volume can only be reachable on host {self.host} "
                            f"({convert.TOPOLOGY_HOST_KEY}={self.host}); the requisite topology excludes it")

    def DeleteVolume(self, request, context):
        self.luns.delete_volume(request.volume_id)
        return pb.DeleteVolumeResponse()

    def ControllerPublishVolume(self, request, context):
        require(request.volume_id, "volume_id")
        require(request.node_id, "node_id")
        if not request.HasField("volume_capability"):
            raise invalid("volume_capability is required")
        cap = convert.capability(request.volume_capability)
        ctx = self.luns.publish(request.volume_id, request.node_id, cap, request.readonly)
        return pb.ControllerPublishVolumeResponse(publish_context=ctx)

    def ControllerUnpublishVolume(self, request, context):
        self.luns.unpublish(request.volume_id, request.node_id)
        return pb.ControllerUnpublishVolumeResponse()

    def ValidateVolumeCapabilities(self, request, context):
        require(request.volume_id, "volume_id")
        require(request.volume_capabilities, "volume_capabilities")
        check_count(request.volume_capabilities, "volume_capabilities", MAX_CAPABILITIES)
        caps = [convert.capability(c) for c in request.volume_capabilities]
        vol = self.luns.get_volume(request.volume_id)
        stored_types = {c["access_type"] for c in vol.capabilities}
        for cap in caps:
            try:
                check_capability(cap)
            except CsiError as exc:  # unsupported: not confirmed
                return pb.ValidateVolumeCapabilitiesResponse(message=str(exc))
            if stored_types and cap.access_type not in stored_types:
                return pb.ValidateVolumeCapabilitiesResponse(
                    message=f"volume was created for {', '.join(sorted(stored_types))} access")
        confirmed = pb.ValidateVolumeCapabilitiesResponse.Confirmed(
            volume_context=dict(request.volume_context), volume_capabilities=request.volume_capabilities,
            parameters=dict(request.parameters), mutable_parameters=dict(request.mutable_parameters))
        return pb.ValidateVolumeCapabilitiesResponse(confirmed=confirmed)

    def ListVolumes(self, request, context):
        vols, token = self.luns.list_volumes(request.max_entries, request.starting_token)
        entries = []
        for vol in vols:
            status = pb.ListVolumesResponse.VolumeStatus(
                published_node_ids=self.luns.published_nodes(vol.id),
                volume_condition=convert.condition(*self.luns.volume_healthy(vol.id)))
            entries.append(pb.ListVolumesResponse.Entry(volume=convert.volume_msg(vol, self._host_of(vol.id)), status=status))
        return pb.ListVolumesResponse(entries=entries, next_token=token)

    def GetCapacity(self, request, context):
        for cap in request.volume_capabilities:
            try:
                check_capability(convert.capability(cap))
            except CsiError:
                return pb.GetCapacityResponse(available_capacity=0)
        parameters = dict(request.parameters)
        try:
            # an exported (iscsi) volume reaches every host's nodes, as CreateVolume and
            # ControllerPublishVolume serve them; a file backend LUN only this host's
            if request.HasField("accessible_topology") and not self.luns.wants_export(parameters) \
                    and not convert.reachable_from(dict(request.accessible_topology.segments), self.host):
                return pb.GetCapacityResponse(available_capacity=0)
            available = self.luns.available_capacity(parameters)
        except CsiError:  # parameters no volume could be made with
            available = 0
        return pb.GetCapacityResponse(available_capacity=available)

    def ControllerGetVolume(self, request, context):
        vol = self.luns.get_volume(request.volume_id)
        status = pb.ControllerGetVolumeResponse.VolumeStatus(
            published_node_ids=self.luns.published_nodes(vol.id),
            volume_condition=convert.condition(*self.luns.volume_healthy(vol.id)))
        return pb.ControllerGetVolumeResponse(volume=convert.volume_msg(vol, self._host_of(vol.id)), status=status)

    def ControllerExpandVolume(self, request, context):
        require(request.volume_id, "volume_id")
        if not request.HasField("capacity_range"):
            raise invalid("capacity_range is required")
        if request.HasField("volume_capability"):
            convert.capability(request.volume_capability)
        vol, node_needed = self.luns.expand_volume(
            request.volume_id, request.capacity_range.required_bytes, request.capacity_range.limit_bytes)
        return pb.ControllerExpandVolumeResponse(capacity_bytes=vol.size, node_expansion_required=node_needed)

    def ControllerModifyVolume(self, request, context):
        self.luns.modify_volume(request.volume_id, dict(request.mutable_parameters))
        return pb.ControllerModifyVolumeResponse()

    def CreateSnapshot(self, request, context):
        require(request.source_volume_id, "source_volume_id")
        require(request.name, "name")
        snap = self.luns.create_snapshot(request.name, request.source_volume_id, dict(request.parameters))
        return pb.CreateSnapshotResponse(snapshot=convert.snapshot_msg(snap))

    def DeleteSnapshot(self, request, context):
        self.luns.delete_snapshot(request.snapshot_id)
        return pb.DeleteSnapshotResponse()

    def ListSnapshots(self, request, context):
        snaps, token = self.luns.list_snapshots(
            request.max_entries, request.starting_token, request.snapshot_id, request.source_volume_id)
        return pb.ListSnapshotsResponse(
            entries=[pb.ListSnapshotsResponse.Entry(snapshot=convert.snapshot_msg(s)) for s in snaps],
            next_token=token)

    def GetSnapshot(self, request, context):
        snap = self.luns.get_snapshot(request.snapshot_id)
        return pb.GetSnapshotResponse(snapshot=convert.snapshot_msg(snap))
