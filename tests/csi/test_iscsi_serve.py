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
                       "initiatorName": "iqn.2026-12.dev.pvlun:node.worker-7", "chapUser": "gold"}
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
