"""pvlun split over hosts (pvlun/host_deployment.py on host/netns.py): the controller on the
storage host, a node plugin in each node host's network namespace, all reached over their
unix sockets from the root namespace; a volume made by the controller is staged and published
by the node plugin of node A. (The file backend is single-host: this proves the plumbing.)"""

from __future__ import annotations

import os

from controlplane.csi_client import CsiClient
from csi.proto import csi_pb2 as pb
from host.netns import Hosts
from pvlun.host_deployment import SplitDeployment

MiB = 1 << 20


def net_namespace(pid: int) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def block_cap() -> pb.VolumeCapability:
    return pb.VolumeCapability(block=pb.VolumeCapability.BlockVolume(), access_mode=pb.VolumeCapability.AccessMode(
        mode=pb.VolumeCapability.AccessMode.Mode.Value("MULTI_NODE_MULTI_WRITER")))


def test_node_plugins_serve_from_their_own_namespaces_and_stage_the_controllers_volume(tmp_path):
    data_dir = str(tmp_path / "d")
    os.makedirs(data_dir)
    with Hosts(["storage", "nodeA", "nodeB"], migration=["nodeA", "nodeB"]) as hosts, \
            SplitDeployment(hosts, data_dir) as deployment:
        assert list(deployment.nodes) == ["nodeA", "nodeB"]
        for role, proc in deployment.processes.items():
            host = "storage" if role == "controller" else role.removeprefix("node-")
            assert net_namespace(proc.pid) == os.stat(f"/run/netns/{hosts[host].namespace}").st_ino, role
            assert net_namespace(proc.pid) != net_namespace(os.getpid())
        csi = CsiClient.of_daemon(data_dir)
        try:
            assert sorted(csi.node_ids) == ["nodeA", "nodeB"]
            for node in ("nodeA", "nodeB"):
                assert csi.node(node).NodeGetInfo(pb.NodeGetInfoRequest()).node_id == node
            volume = csi.controller.CreateVolume(pb.CreateVolumeRequest(
                name="split-hosts", capacity_range=pb.CapacityRange(required_bytes=16 * MiB),
                volume_capabilities=[block_cap()])).volume.volume_id
            context = dict(csi.controller.ControllerPublishVolume(pb.ControllerPublishVolumeRequest(
                volume_id=volume, node_id="nodeA", volume_capability=block_cap())).publish_context)
            staging, target = tmp_path / "staging", tmp_path / "target"
            staging.mkdir()
            node_a = csi.node("nodeA")
            node_a.NodeStageVolume(pb.NodeStageVolumeRequest(volume_id=volume, staging_target_path=str(staging),
                                                             volume_capability=block_cap(), publish_context=context))
            node_a.NodePublishVolume(pb.NodePublishVolumeRequest(
                volume_id=volume, staging_target_path=str(staging), target_path=str(target),
                volume_capability=block_cap(), publish_context=context))
            with open(target, "r+b") as device:  # the node plugin's block device, seen from the root namespace
                device.write(b"written through node A")
                os.fsync(device.fileno())
                device.seek(0)
                assert device.read(22) == b"written through node A"
            node_a.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=volume, target_path=str(target)))
            node_a.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(volume_id=volume, staging_target_path=str(staging)))
            csi.controller.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(volume_id=volume,
                                                                                         node_id="nodeA"))
            csi.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume))
        finally:
            csi.close()
        processes = list(deployment.processes.values())
    assert all(proc.returncode == 0 for proc in processes)  # each stopped cleanly on SIGTERM
    assert not os.path.ismount(os.path.join(data_dir, "pool"))
