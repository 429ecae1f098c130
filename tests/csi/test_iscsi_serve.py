"""`pvlun serve --backend iscsi`: the daemon runs its own tgtd, CreateVolume's secrets make a
CHAP account and are never logged, publish answers for a node of another host, /metrics and
`pvlun luns` count the LUNs, and a clean stop ends tgtd."""

from __future__ import annotations

import subprocess
import time
import urllib.request

from csi.proto import csi_pb2 as pb
from csi_support import PVLUN, block_cap, running_driver
from host.tgt import Tgtadm, control_port_free
from iscsi_target_support import free_control_port, free_port

SECRET = "serve-chap-secret-77"


def test_serve_with_the_iscsi_backend(tmp_path):
    portal, control = f"127.0.0.1:{free_port()}", free_control_port()
    data = tmp_path / "data"
    with running_driver(data, "--backend", "iscsi", "--iscsi-portal", portal,
                        "--iscsi-control-port", str(control)) as drv:
        vol = drv.controller.CreateVolume(pb.CreateVolumeRequest(
            name="pv-1", volume_capabilities=[block_cap("MULTI_NODE_MULTI_WRITER")],
            capacity_range=pb.CapacityRange(required_bytes=8 << 20),
            parameters={"targetGroup": "gold"},  # requisite another host: iSCSI reaches it
            accessibility_requirements=pb.TopologyRequirement(requisite=[pb.Topology(
                segments={"topology.csi.pvlun.dev/host": "elsewhere"})]),
            secrets={"node.session.auth.username": "gold", "node.session.auth.password": SECRET})).volume
        assert list(vol.accessible_topology) == []  # every node reaches it over the network
        ctx = dict(drv.controller.ControllerPublishVolume(pb.ControllerPublishVolumeRequest(
            volume_id=vol.volume_id, node_id="worker-7", volume_capability=block_cap("MULTI_NODE_MULTI_WRITER"),
        )).publish_context)
        assert ctx == {"backend": "iscsi", "portal": portal, "targetIQN": "iqn.2026-12.dev.pvlun:gold-1", "lun": "1",
                       "initiatorName": "iqn.2026-12.dev.pvlun:node.worker-7", "chapUser": "gold",
                       "volumeID": vol.volume_id}
        target = Tgtadm(control).show()[1]
        assert target.accounts == ["gold"] and target.acl == ["iqn.2026-12.dev.pvlun:node.worker-7"]
        where, deadline = data / "metrics.url", time.monotonic() + 30  # written once the control plane runs
        while not where.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        metrics = urllib.request.urlopen(where.read_text(), timeout=10).read().decode()
        assert 'pvlun_iscsi_luns{group="gold",target="iqn.2026-12.dev.pvlun:gold-1"} 1.0' in metrics
        assert 'pvlun_iscsi_lun_limit{group="gold",target="iqn.2026-12.dev.pvlun:gold-1"} 509.0' in metrics
        assert 'pvlun_iscsi_node_luns{node="worker-7"} 1.0' in metrics
        table = subprocess.run([PVLUN, "luns", "--data-dir", str(data)], capture_output=True, text=True, timeout=60)
        assert table.returncode == 0, table.stderr
        assert table.stdout.split("\n")[1].split() == ["target", "iqn.2026-12.dev.pvlun:gold-1", "1/509", "worker-7:1"]
        drv.controller.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(
            volume_id=vol.volume_id, node_id="worker-7"))
        assert Tgtadm(control).show()[1].acl == []
        drv.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id))
        assert Tgtadm(control).show()[1].luns == {}
    assert control_port_free(control)  # tgtd ended with pvlun
    assert SECRET not in drv.stderr_path.read_text() and SECRET not in (data / "tgtd.log").read_text()


def test_a_node_stages_an_iscsi_volume_through_the_target_and_its_bytes_reach_the_lun_file(tmp_path):
    """The whole path on one machine: the controller exports the LUN on pvlun's tgtd, the node
    plugin of the same daemon logs in with its own initiator name (its ACL entry), stages the
    volume through qemu-storage-daemon's FUSE export behind a loop device, and what is written
    to the published device is in the pool's LUN file."""
    from csi_support import NODE_ID, read_at, write_at

    portal, control = f"127.0.0.1:{free_port()}", free_control_port()
    data = tmp_path / "d"
    payload = b"pvlun-over-iscsi" * 256
    with running_driver(data, "--backend", "iscsi", "--iscsi-portal", portal,
                        "--iscsi-control-port", str(control)) as drv:
        cap = block_cap("MULTI_NODE_MULTI_WRITER")
        vol = drv.controller.CreateVolume(pb.CreateVolumeRequest(
            name="pv-e2e", volume_capabilities=[cap], capacity_range=pb.CapacityRange(required_bytes=16 << 20))).volume
        ctx = dict(drv.controller.ControllerPublishVolume(pb.ControllerPublishVolumeRequest(
            volume_id=vol.volume_id, node_id=NODE_ID, volume_capability=cap)).publish_context)
        assert ctx["backend"] == "iscsi" and ctx["portal"] == portal
        staging, target = tmp_path / "staging", tmp_path / "publish" / "dev"
        staging.mkdir()
        target.parent.mkdir()
        drv.node.NodeStageVolume(pb.NodeStageVolumeRequest(volume_id=vol.volume_id, publish_context=ctx,
                                                           staging_target_path=str(staging), volume_capability=cap))
        drv.node.NodePublishVolume(pb.NodePublishVolumeRequest(
            volume_id=vol.volume_id, publish_context=ctx, staging_target_path=str(staging),
            target_path=str(target), volume_capability=cap))
        write_at(str(target), 1 << 20, payload)
        lun_file = next((data / "pool" / "volumes").glob(f"{vol.volume_id}*.img"))
        assert read_at(str(lun_file), 1 << 20, len(payload)) == payload
        drv.node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=vol.volume_id, target_path=str(target)))
        drv.node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(volume_id=vol.volume_id,
                                                               staging_target_path=str(staging)))
        drv.controller.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(
            volume_id=vol.volume_id, node_id=NODE_ID))
        assert Tgtadm(control).show()[1].acl == []
        drv.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id))
    assert control_port_free(control)
    assert subprocess.run(["pgrep", "-f", f"qemu-storage-daemon.*{vol.volume_id}"], capture_output=True).returncode == 1


def test_a_file_volume_of_an_iscsi_serve_says_the_file_backend_is_single_node(tmp_path):
    from csi_support import Code, assert_code

    portal, control = f"127.0.0.1:{free_port()}", free_control_port()
    with running_driver(tmp_path / "d", "--backend", "iscsi", "--iscsi-portal", portal,
                        "--iscsi-control-port", str(control)) as drv:
        cap = block_cap()
        vol = drv.controller.CreateVolume(pb.CreateVolumeRequest(
            name="pv-file", volume_capabilities=[cap], parameters={"backend": "file"},
            capacity_range=pb.CapacityRange(required_bytes=8 << 20))).volume
        message = assert_code(Code.NOT_FOUND, drv.controller.ControllerPublishVolume, pb.ControllerPublishVolumeRequest(
            volume_id=vol.volume_id, node_id="elsewhere", volume_capability=cap))
        assert "the file backend is single-node" in message and "backend: iscsi" in message
        assert "iscsi backend is single-node" not in message
