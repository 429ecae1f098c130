"""CSI Identity service."""

from __future__ import annotations

from google.protobuf.wrappers_pb2 import BoolValue

from csi.proto import csi_pb2 as pb
from csi.proto import csi_pb2_grpc
from csi import DRIVER_NAME, __version__

_SERVICE = pb.PluginCapability.Service.Type
_EXPANSION = pb.PluginCapability.VolumeExpansion.Type


class IdentityService(csi_pb2_grpc.IdentityServicer):
    def __init__(self, has_controller: bool = True, ready=lambda: True):
        self.has_controller = has_controller
        self.ready = ready

    def GetPluginInfo(self, request, context):
        return pb.GetPluginInfoResponse(name=DRIVER_NAME, vendor_version=__version__)

    def GetPluginCapabilities(self, request, context):
        caps = [pb.PluginCapability(volume_expansion=pb.PluginCapability.VolumeExpansion(type=_EXPANSION.ONLINE))]
        if self.has_controller:
            for kind in ("CONTROLLER_SERVICE", "VOLUME_ACCESSIBILITY_CONSTRAINTS", "GROUP_CONTROLLER_SERVICE"):
                caps.append(pb.PluginCapability(service=pb.PluginCapability.Service(type=_SERVICE.Value(kind))))
        return pb.GetPluginCapabilitiesResponse(capabilities=caps)

    def Probe(self, request, context):
        return pb.ProbeResponse(ready=BoolValue(value=bool(self.ready())))
