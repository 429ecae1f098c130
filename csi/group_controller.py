"""CSI GroupController service: crash-consistent snapshots of several volumes at once."""

from __future__ import annotations

from csi import convert
from csi.lun_service import LunService
from csi.proto import csi_pb2 as pb
from csi.proto import csi_pb2_grpc
from csi.validation import require

_RPC = pb.GroupControllerServiceCapability.RPC.Type


def group_msg(group, snaps) -> pb.VolumeGroupSnapshot:
    return pb.VolumeGroupSnapshot(
        group_snapshot_id=group.id,
        snapshots=[convert.snapshot_msg(s) for s in snaps],
        creation_time=convert.timestamp(group.created),
        ready_to_use=True,
    )


class GroupControllerService(csi_pb2_grpc.GroupControllerServicer):
    def __init__(self, luns: LunService):
        self.luns = luns

    def GroupControllerGetCapabilities(self, request, context):
        cap = pb.GroupControllerServiceCapability(
            rpc=pb.GroupControllerServiceCapability.RPC(type=_RPC.CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT))
        return pb.GroupControllerGetCapabilitiesResponse(capabilities=[cap])

    def CreateVolumeGroupSnapshot(self, request, context):
        require(request.name, "name")
        require(request.source_volume_ids, "source_volume_ids")
        group, snaps = self.luns.create_group(request.name, list(request.source_volume_ids), dict(request.parameters))
        return pb.CreateVolumeGroupSnapshotResponse(group_snapshot=group_msg(group, snaps))

    def DeleteVolumeGroupSnapshot(self, request, context):
        self.luns.delete_group(request.group_snapshot_id, list(request.snapshot_ids))
        return pb.DeleteVolumeGroupSnapshotResponse()

    def GetVolumeGroupSnapshot(self, request, context):
        group, snaps = self.luns.get_group(request.group_snapshot_id, list(request.snapshot_ids))
        return pb.GetVolumeGroupSnapshotResponse(group_snapshot=group_msg(group, snaps))
