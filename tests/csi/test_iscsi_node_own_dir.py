"""A node plugin that shares nothing with its controller: its own data dir (its own, empty
catalog) in its own network namespace, as on a real cluster. It stages the controller's
iSCSI LUN from the publish context alone, and when it crashes and starts again its start-up
repair keeps what it staged to the end (its mounts explain it; no publication of the
controller's is needed) and releases a stage the crash cut off."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess

import grpc

from csi.catalog import Catalog
from csi.proto import csi_pb2 as pb
from csi.proto import csi_pb2_grpc
from csi_support import MiB, _force_clean, block_cap, loop_devices_under, mounts_under, read_at
from host.netns import Hosts
from iscsi_target_support import free_control_port
from pvlun.daemon import initiator_state_dir
from pvlun.host_deployment import SplitDeployment
from split_support import read_direct, write_sync

CAP = block_cap("SINGLE_NODE_WRITER")


def daemon_pid(state: str, volume_id: str) -> int | None:
    try:
        pid = int(open(os.path.join(state, volume_id, "pid")).read())
    except OSError:
        return None
    return pid if os.path.exists(f"/proc/{pid}") else None


def test_a_node_with_its_own_data_dir_stages_and_its_restart_keeps_what_it_staged(tmp_path):
    ctrl_dir, node_dir = tmp_path / "ctrl", tmp_path / "nodeA"
    ctrl_dir.mkdir()
    node_dir.mkdir()
    state = initiator_state_dir(str(node_dir), "nodeA")
    control = free_control_port()
    payload = os.urandom(64 * 1024)
    try:
        with Hosts(["storage", "nodeA"]) as hosts:
            portal = f"{hosts['storage'].address}:3260"
            with SplitDeployment(hosts, str(ctrl_dir), nodes=["nodeA"], backend="iscsi", pool_size="1Gi",
                                 controller_args=["--iscsi-portal", portal, "--iscsi-control-port", str(control)],
                                 node_dirs={"nodeA": str(node_dir)}) as deployment:
                ctl_channel = grpc.insecure_channel(f"unix://{ctrl_dir / 'csi.sock'}")
                node_sock = node_dir / "nodes" / "nodeA" / "csi.sock"
                assert stat.S_ISSOCK(node_sock.stat().st_mode) and not (ctrl_dir / "nodes" / "nodeA").exists()
                ctl = csi_pb2_grpc.ControllerStub(ctl_channel)
                vols, contexts = [], []
                for name in ("kept", "cut-off"):
                    vol = ctl.CreateVolume(pb.CreateVolumeRequest(
                        name=name, volume_capabilities=[CAP],
                        capacity_range=pb.CapacityRange(required_bytes=16 * MiB))).volume.volume_id
                    vols.append(vol)
                    contexts.append(dict(ctl.ControllerPublishVolume(pb.ControllerPublishVolumeRequest(
                        volume_id=vol, node_id="nodeA", volume_capability=CAP)).publish_context))
                staging = [tmp_path / "s0", tmp_path / "s1"]
                target = tmp_path / "t0"

                node_channel = grpc.insecure_channel(f"unix://{node_sock}")  # reconnects after a restart
                node = csi_pb2_grpc.NodeStub(node_channel)

                for vol, ctx, where in zip(vols, contexts, staging):
                    where.mkdir()
                    node.NodeStageVolume(pb.NodeStageVolumeRequest(
                        volume_id=vol, staging_target_path=str(where), volume_capability=CAP, publish_context=ctx))
                node.NodePublishVolume(pb.NodePublishVolumeRequest(
                    volume_id=vols[0], staging_target_path=str(staging[0]), target_path=str(target),
                    volume_capability=CAP, publish_context=contexts[0]))
                write_sync(str(target), 1 * MiB, payload)
                # the second stage is "cut off": its loop device and daemon stay, its staging mount goes
                subprocess.run(["umount", str(staging[1] / "lun")], check=True)
                assert not mounts_under(str(staging[1]))
                kept_pid = daemon_pid(state, vols[0])
                assert kept_pid and daemon_pid(state, vols[1])
                node_catalog = Catalog(str(node_dir / "catalog.db"))  # knows nothing the controller does
                try:
                    assert node_catalog.published_volumes() == set()
                finally:
                    node_catalog.close()

                deployment.restart_node("nodeA", signal.SIGKILL)

                assert daemon_pid(state, vols[0]) == kept_pid, "a staged volume's session was released"
                assert read_direct(str(target), 1 * MiB, len(payload)) == payload
                assert daemon_pid(state, vols[1]) is None and not os.path.exists(os.path.join(state, vols[1]))
                assert not loop_devices_under(os.path.join(state, vols[1]))
                node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=vols[0], target_path=str(target)))
                for vol, where in zip(vols, staging):
                    node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(volume_id=vol, staging_target_path=str(where)))
                    ctl.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(volume_id=vol, node_id="nodeA"))
                lun = ctrl_dir / "pool" / "volumes" / f"{vols[0]}.img"
                assert read_at(str(lun), 1 * MiB, len(payload)) == payload
                for vol in vols:
                    ctl.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol))
                ctl_channel.close()
                node_channel.close()
        assert not os.path.exists(state), os.listdir(state)
        assert not loop_devices_under(state) and not mounts_under(str(tmp_path))
    finally:
        _force_clean(state)
        shutil.rmtree(state, ignore_errors=True)
        _force_clean(str(tmp_path))
