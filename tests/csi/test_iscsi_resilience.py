"""The iscsi backend across hosts when things go wrong (split_support.py: the controller and
its tgtd on a storage host, node plugins in node hosts' network namespaces):

- tgtd killed with SIGKILL: pvlun's watcher starts it again and re-exports; a node's staged
  volume resumes, the I/O issued meanwhile completes and nothing written is lost;
- a node's link down for a few seconds: its volume is reported abnormal meanwhile, the I/O
  issued during the outage completes after the link is back, data intact;
- a node-stage secret whose CHAP password is not the target's: PERMISSION_DENIED naming the
  secret's key, within seconds, not a hang.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import grpc
import pytest

from csi.proto import csi_pb2 as pb
from csi.proto import csi_pb2_grpc
from csi_support import MiB, NODE_ID, block_cap, read_at
from host.command import CommandError
from host.tgt import Tgtadm
from pvlun.daemon import initiator_state_dir
from split_support import read_direct, split_hosts, write_sync

CAP = block_cap("SINGLE_NODE_WRITER")
CHAP_USER, CHAP_PASSWORD = "resilient", "the-right-chap-secret-1"
USER_KEY, PASSWORD_KEY = "node.session.auth.username", "node.session.auth.password"
IO_SECONDS = 60  # an outage's I/O must complete this long after the target is back


class Staged:
    """A block volume made by the controller, staged and published on node one."""

    def __init__(self, data_dir: Path, root: Path, secrets: dict[str, str] | None = None):
        self.channels = [grpc.insecure_channel(f"unix://{data_dir / 'csi.sock'}"),
                         grpc.insecure_channel(f"unix://{data_dir / 'nodes' / NODE_ID / 'csi.sock'}")]
        self.controller = csi_pb2_grpc.ControllerStub(self.channels[0])
        self.node = csi_pb2_grpc.NodeStub(self.channels[1])
        self.data_dir = data_dir
        self.volume = self.controller.CreateVolume(pb.CreateVolumeRequest(
            name=f"pv-{root.name[-20:]}", volume_capabilities=[CAP], secrets=secrets or {},
            capacity_range=pb.CapacityRange(required_bytes=16 * MiB))).volume.volume_id
        self.context = dict(self.controller.ControllerPublishVolume(pb.ControllerPublishVolumeRequest(
            volume_id=self.volume, node_id=NODE_ID, volume_capability=CAP)).publish_context)
        self.staging, self.target = root / "staging", root / "target"
        self.staging.mkdir()
        self.staged = self.published = False

    def stage(self, secrets: dict[str, str] | None = None) -> None:
        self.node.NodeStageVolume(pb.NodeStageVolumeRequest(
            volume_id=self.volume, staging_target_path=str(self.staging), volume_capability=CAP,
            publish_context=self.context, secrets=secrets or {}), timeout=60)
        self.staged = True
        self.node.NodePublishVolume(pb.NodePublishVolumeRequest(
            volume_id=self.volume, staging_target_path=str(self.staging), target_path=str(self.target),
            volume_capability=CAP, publish_context=self.context), timeout=60)
        self.published = True

    def condition(self) -> pb.VolumeCondition:
        return self.node.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(
            volume_id=self.volume, volume_path=str(self.target)), timeout=30).volume_condition

    def lun_file(self) -> str:
        return str(self.data_dir / "pool" / "volumes" / f"{self.volume}.img")

    def close(self) -> None:
        """Undo it all; every call must succeed (the test's own cleanup)."""
        try:
            if self.published:
                self.node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(
                    volume_id=self.volume, target_path=str(self.target)), timeout=60)
            if self.staged:
                self.node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(
                    volume_id=self.volume, staging_target_path=str(self.staging)), timeout=60)
            self.controller.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(
                volume_id=self.volume, node_id=NODE_ID), timeout=30)
            self.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=self.volume), timeout=30)
        finally:
            for channel in self.channels:
                channel.close()


class Writer(threading.Thread):
    """One synchronous write in the background: issued during an outage, it must complete."""

    def __init__(self, path: str, offset: int, data: bytes):
        super().__init__(daemon=True)
        self.args, self.error, self.done_at = (path, offset, data), None, None

    def run(self) -> None:
        try:
            write_sync(*self.args)
        except OSError as exc:
            self.error = exc
        self.done_at = time.monotonic()


def tgtd_pid(control_port: int) -> int:
    """pvlun's tgtd, by its command line (it runs in the storage host's namespace)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv[:4] == [b"tgtd", b"-f", b"-C", str(control_port).encode()]:
                return int(entry)
    raise AssertionError(f"no tgtd on control port {control_port}")


def wait_for(what: str, check, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"still not {what} after {timeout:g} s"
        time.sleep(0.1)


def test_tgtd_killed_comes_back_with_its_luns_and_the_nodes_io_resumes_intact(tmp_path):
    before, during = os.urandom(256 * 1024), os.urandom(256 * 1024)
    with split_hosts(tmp_path) as (hosts, deployment, control):
        vol = Staged(tmp_path / "data", tmp_path)
        try:
            vol.stage()
            write_sync(str(vol.target), 0, before)
            old = tgtd_pid(control)
            os.kill(old, signal.SIGKILL)
            writer = Writer(str(vol.target), 4 * MiB, during)
            writer.start()  # issued while tgtd is down (or restarting): it waits, then lands
            wait_for("restarted", lambda: (pid := _maybe(tgtd_pid, control)) not in (None, old))
            wait_for("re-exported", lambda: _lun_exported(control, vol.context), timeout=15)
            writer.join(IO_SECONDS)
            assert not writer.is_alive(), "the write issued while tgtd was down never completed"
            assert writer.error is None, writer.error
            assert read_direct(str(vol.target), 0, len(before)) == before
            assert read_direct(str(vol.target), 4 * MiB, len(during)) == during
            assert read_at(vol.lun_file(), 4 * MiB, len(during)) == during  # on the storage host's LUN
            wait_for("healthy again", lambda: not vol.condition().abnormal)
        finally:
            vol.close()


def _maybe(function, *args):
    try:
        return function(*args)
    except AssertionError:
        return None


def _lun_exported(control: int, context: dict[str, str]) -> bool:
    try:
        targets = Tgtadm(control).show()
    except CommandError:  # still starting
        return False
    return any(t.iqn == context["targetIQN"] and int(context["lun"]) in t.luns for t in targets.values())


def test_a_node_whose_link_goes_down_reports_it_and_its_io_completes_after_the_link_is_back(tmp_path):
    before, during = os.urandom(128 * 1024), os.urandom(128 * 1024)
    outage = 4.0
    with split_hosts(tmp_path) as (hosts, deployment, control):
        vol = Staged(tmp_path / "data", tmp_path)
        try:
            vol.stage()
            daemon = int((Path(initiator_state_dir(str(tmp_path / "data"), NODE_ID)) / vol.volume / "pid").read_text())
            assert os.stat(f"/proc/{daemon}/ns/net").st_ino == os.stat(f"/run/netns/{hosts['nodeA'].namespace}").st_ino
            write_sync(str(vol.target), 0, before)
            assert not vol.condition().abnormal
            down_at = time.monotonic()
            hosts.link_down("nodeA", outage)  # back by itself after `outage` seconds
            writer = Writer(str(vol.target), 2 * MiB, during)
            writer.start()
            condition = vol.condition()
            assert time.monotonic() - down_at < outage, "NodeGetVolumeStats took the whole outage"
            assert condition.abnormal and vol.context["portal"] in condition.message, condition
            writer.join(outage + IO_SECONDS)
            assert not writer.is_alive(), "the write issued during the outage never completed"
            assert writer.error is None, writer.error
            assert writer.done_at - down_at > outage - 0.5, "the write completed while the node had no network"
            assert read_direct(str(vol.target), 0, len(before)) == before
            assert read_direct(str(vol.target), 2 * MiB, len(during)) == during
            assert read_at(vol.lun_file(), 2 * MiB, len(during)) == during
            wait_for("healthy again", lambda: not vol.condition().abnormal)
        finally:
            vol.close()


@pytest.mark.parametrize("stage_secrets", [
    {USER_KEY: CHAP_USER, PASSWORD_KEY: "not-the-chap-secret-2"},
    {PASSWORD_KEY: "not-the-chap-secret-2"},  # the user comes from the publish context
], ids=["wrong-password", "wrong-password-no-user"])
def test_a_chap_mismatch_fails_fast_naming_the_secret_and_stages_nothing(tmp_path, stage_secrets):
    with split_hosts(tmp_path) as (hosts, deployment, control):
        vol = Staged(tmp_path / "data", tmp_path, secrets={USER_KEY: CHAP_USER, PASSWORD_KEY: CHAP_PASSWORD})
        try:
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as info:
                vol.stage(stage_secrets)
            assert time.monotonic() - started < 15, "a CHAP mismatch took too long to be reported"
            err = info.value
            assert err.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.FAILED_PRECONDITION), err
            assert PASSWORD_KEY in err.details() and CHAP_USER in err.details(), err.details()
            assert "not-the-chap-secret-2" not in err.details() and CHAP_PASSWORD not in err.details()
            assert os.listdir(vol.staging) == [] and not vol.target.exists()
            # the right secret stages it (the mismatch left nothing in the way)
            vol.stage({USER_KEY: CHAP_USER, PASSWORD_KEY: CHAP_PASSWORD})
            write_sync(str(vol.target), 0, b"chap" * 1024)
            assert read_at(vol.lun_file(), 0, 4096) == b"chap" * 1024
        finally:
            vol.close()
        logs = [p.read_text(errors="replace") for p in (tmp_path / "data").glob("*.log")]
        assert not any(CHAP_PASSWORD in text or "not-the-chap-secret-2" in text for text in logs)
