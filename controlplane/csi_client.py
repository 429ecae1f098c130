"""The embedded control plane's way into the driver: gRPC stubs on the driver's sockets,
exactly what the Kubernetes CSI sidecars and kubelet would use."""

from __future__ import annotations

import grpc

from csi.proto import csi_pb2 as pb
from csi.proto import csi_pb2_grpc
from controlplane import serve_record
from controlplane.serve_record import default_endpoint, node_endpoint

MODES = pb.VolumeCapability.AccessMode.Mode
ACCESS_MODES = {  # Kubernetes accessModes → CSI access mode
    "ReadWriteOnce": MODES.SINGLE_NODE_WRITER,
    "ReadOnlyMany": MODES.MULTI_NODE_READER_ONLY,
    "ReadWriteMany": MODES.MULTI_NODE_MULTI_WRITER,
    "ReadWriteOncePod": MODES.SINGLE_NODE_SINGLE_WRITER,
}


def capability(volume_mode: str, access_mode: str, fs_type: str = "",
               mount_options: list[str] | tuple[str, ...] = ()) -> pb.VolumeCapability:
    """As the sidecars and kubelet build it; a StorageClass's mountOptions become the mount
    flags of a Filesystem volume (a Block volume has none)."""
    mode = pb.VolumeCapability.AccessMode(mode=ACCESS_MODES.get(access_mode, MODES.SINGLE_NODE_WRITER))
    if volume_mode == "Block":
        return pb.VolumeCapability(block=pb.VolumeCapability.BlockVolume(), access_mode=mode)
    return pb.VolumeCapability(mount=pb.VolumeCapability.MountVolume(fs_type=fs_type, mount_flags=list(mount_options)),
                               access_mode=mode)


class CsiClient:
    def __init__(self, data_dir: str, node_ids: list[str], endpoint: str = "",
                 node_endpoints: dict[str, str] | None = None):
        main = endpoint or default_endpoint(data_dir)
        self._main = grpc.insecure_channel(main)
        self.controller = csi_pb2_grpc.ControllerStub(self._main)
        self.group = csi_pb2_grpc.GroupControllerStub(self._main)
        self.identity = csi_pb2_grpc.IdentityStub(self._main)
        self.node_ids = list(node_ids)
        self._nodes = {}
        for i, node_id in enumerate(node_ids):
            where = (node_endpoints or {}).get(node_id) or (main if i == 0 else node_endpoint(data_dir, node_id))
            channel = self._main if where == main else grpc.insecure_channel(where)
            self._nodes[node_id] = csi_pb2_grpc.NodeStub(channel)

    @classmethod
    def of_daemon(cls, data_dir: str) -> CsiClient:
        """A client for the daemon running on data_dir, at the endpoints it recorded there."""
        record = serve_record.read(data_dir)
        if record is None or not record.controller or not record.nodes:
            raise LookupError(f"no pvlun serve with both a controller and a node runs for data dir {data_dir}")
        return cls(data_dir, list(record.nodes), record.controller, record.nodes)

    def node(self, node_id: str) -> csi_pb2_grpc.NodeStub:
        return self._nodes[node_id]

    def close(self) -> None:
        self._main.close()
