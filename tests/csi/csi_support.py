"""The conformance suite's driver: a real `pvlun serve` subprocess per test module,
reached over gRPC on its unix socket, the way csi-sanity and the CSI sidecars reach it.

`driver` (module scope) runs once per backend:
- `file`: one server on a fresh data dir with two nodes (`<node-id>` on the main socket,
  `<node-id>-2` on DATA/nodes/<node-id>-2/csi.sock);
- `iscsi`: a split deployment over network namespaces (split_support.py): the controller and
  its tgtd on a storage host, each node plugin on a node host of its own, reaching its LUNs
  over iSCSI only. Tests that do not apply to it are marked file_only (conftest.py).
At the end it stops everything with SIGTERM and checks that it exited 0, that its socket was
mode 0600, and that no pool mount and no loop device of its data dir are left behind.
`res` (function scope) records what a test creates and tears it down afterwards in LIFO
order with the calls csi-sanity's cleanup makes, each of which must succeed; like
csi-sanity's Setup/Teardown it also owns a target dir and a staging dir that must be empty
at the end.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import grpc
import pytest

from csi.proto import csi_pb2 as pb
from csi.proto import csi_pb2_grpc
from pvlun.local_run import small_xfs_pool

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
NODE_ID = "conformance-node"
NODE2_ID = NODE_ID + "-2"
POOL_SIZE = 16 * GiB
SMALL = 64 * MiB
Code = grpc.StatusCode
Mode = pb.VolumeCapability.AccessMode.Mode
PVLUN = str(Path(sys.executable).with_name("pvlun"))


# ---------------------------------------------------------------- request helpers


def mount_cap(mode: str = "SINGLE_NODE_WRITER", fs_type: str = "", flags: tuple[str, ...] = ()) -> pb.VolumeCapability:
    return pb.VolumeCapability(mount=pb.VolumeCapability.MountVolume(fs_type=fs_type, mount_flags=list(flags)),
                               access_mode=pb.VolumeCapability.AccessMode(mode=Mode.Value(mode)))


def block_cap(mode: str = "SINGLE_NODE_WRITER") -> pb.VolumeCapability:
    return pb.VolumeCapability(block=pb.VolumeCapability.BlockVolume(),
                               access_mode=pb.VolumeCapability.AccessMode(mode=Mode.Value(mode)))


def unique(prefix: str = "pv") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def rpc_error(call: Callable, request: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(request)
    return info.value


def assert_code(code: grpc.StatusCode, call: Callable, request: Any) -> str:
    """The call fails with exactly `code` (and no response); returns the message."""
    err = rpc_error(call, request)
    assert err.code() == code, f"expected {code.name}, got {err.code().name}: {err.details()}"
    return err.details() or ""


def write_at(path: str, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        assert os.pwrite(fd, data, offset) == len(data)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_at(path: str, offset: int, length: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


# IDs a caller may send that are not ours: the shapes csi-sanity uses and path escapes.
MALFORMED_IDS = ["fake-vol-id", "fake-vol-id-0123456789", "../etc/passwd", "/etc/passwd",
                 "vol-" + "0" * 31 + "\x00", "vol-../../catalog.db", "VOL-" + "A" * 32]
UNKNOWN_VOLUME_ID = "vol-" + "0" * 32  # well-formed, never created


# ---------------------------------------------------------------- the driver process


def loop_devices_under(root: str) -> list[str]:
    out = subprocess.run(["losetup", "--list", "--json"], capture_output=True, text=True, check=True).stdout
    devices = json.loads(out or '{"loopdevices": []}')["loopdevices"]
    return [d["name"] for d in devices if (d.get("back-file") or "").startswith(root + "/")]


def mounts_under(root: str) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return [p for p in points if p == root or p.startswith(root + "/")]


def _force_clean(root: str) -> None:
    """Best effort after a failure: do not leave mounts or loop devices on the machine.
    Loop devices first (a busy one detaches once released), while their paths still
    show under root, then lazy unmounts."""
    for dev in loop_devices_under(root):
        subprocess.run(["losetup", "--detach", dev], capture_output=True)
    for point in sorted(mounts_under(root), key=len, reverse=True):
        subprocess.run(["umount", "--lazy", point], capture_output=True)


@dataclass
class Driver:
    """What the tests talk to: the controller on DATA/csi.sock, node one (on the same socket
    unless `node_socket` names its own) and node two on DATA/nodes/<node-id>-2/csi.sock."""

    data_dir: Path
    proc: subprocess.Popen | None
    stderr_path: Path
    socket_mode: int
    backend: str = "file"
    node_socket: Path | None = None  # node one's socket, when not the controller's
    log_paths: tuple[Path, ...] = ()  # every process's log (default: stderr_path)
    stopper: Callable[[], int] | None = None  # stops a deployment that is not `proc`
    channels: list[grpc.Channel] = field(default_factory=list)

    def __post_init__(self) -> None:
        main = grpc.insecure_channel(f"unix://{self.data_dir / 'csi.sock'}")
        second = grpc.insecure_channel(f"unix://{self.data_dir / 'nodes' / NODE2_ID / 'csi.sock'}")
        first = grpc.insecure_channel(f"unix://{self.node_socket}") if self.node_socket else main
        self.channels = [main, second] + ([first] if self.node_socket else [])
        self.identity = csi_pb2_grpc.IdentityStub(main)
        self.controller = csi_pb2_grpc.ControllerStub(main)
        self.node = csi_pb2_grpc.NodeStub(first)
        self.group = csi_pb2_grpc.GroupControllerStub(main)
        self.identity2 = csi_pb2_grpc.IdentityStub(second)
        self.controller2 = csi_pb2_grpc.ControllerStub(second)
        self.node2 = csi_pb2_grpc.NodeStub(second)

    @property
    def pool(self) -> Path:
        return self.data_dir / "pool"

    def lun(self, volume_id: str) -> Path:
        return self.pool / "volumes" / f"{volume_id}.img"

    def node_file(self, volume_id: str) -> Path:
        """The file node one's loop device reads for a staged volume: the LUN file itself on
        the file backend; on iscsi the FUSE export of the node's qemu-storage-daemon."""
        if self.backend == "iscsi":
            from pvlun.daemon import initiator_state_dir

            return Path(initiator_state_dir(str(self.data_dir), NODE_ID)) / volume_id / "export"
        return self.lun(volume_id)

    def snapshot_file(self, snapshot_id: str) -> Path:
        return self.pool / "snapshots" / f"{snapshot_id}.img"

    def disk_state(self) -> dict[str, tuple[int, int]]:
        """Every file and directory of the LUN pool: (size, mtime)."""
        state: dict[str, tuple[int, int]] = {}
        for dirpath, dirs, files in os.walk(self.pool):
            for name in dirs + files:
                st = (Path(dirpath) / name).lstat()
                state[str((Path(dirpath) / name).relative_to(self.data_dir))] = (st.st_size, st.st_mtime_ns)
        return state

    def calls(self) -> list[dict]:
        """The structured per-call log records the server(s) wrote to stderr so far, in time order."""
        records = []
        for path in self.log_paths or (self.stderr_path,):
            for line in path.read_text(errors="replace").splitlines():
                if line.startswith("{"):  # every per-call record is a whole JSON line
                    records.append(json.loads(line))
        return sorted(records, key=lambda r: r["time"]) if self.log_paths else records

    def stop(self) -> int:
        for channel in self.channels:
            channel.close()
        if self.stopper is not None:
            return self.stopper()
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


def start_driver(data_dir: Path, *extra: str, pool_size: int | None = POOL_SIZE) -> Driver:
    data_dir.mkdir(parents=True, exist_ok=True)
    stderr_path = data_dir.parent / f"{data_dir.name}.stderr"
    sock = data_dir / "csi.sock"
    second = data_dir / "nodes" / NODE2_ID / "csi.sock"
    with open(stderr_path, "wb") as err:
        proc = subprocess.Popen(
            [PVLUN, "serve", "--data-dir", str(data_dir), "--node-id", NODE_ID, "--nodes", "2",
             *(["--pool-size", str(pool_size)] if pool_size else []), *extra],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + 60
    while not (sock.exists() and second.exists()):
        if proc.poll() is not None:
            raise RuntimeError(f"pvlun serve exited {proc.returncode}: {stderr_path.read_text()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"pvlun serve did not open {sock}: {stderr_path.read_text()}")
        time.sleep(0.05)
    mode = stat.S_IMODE(sock.stat().st_mode)
    driver = Driver(data_dir, proc, stderr_path, mode)
    grpc.channel_ready_future(driver.channels[0]).result(timeout=10)
    grpc.channel_ready_future(driver.channels[1]).result(timeout=10)
    return driver


BACKENDS = ("file", "iscsi")


@pytest.fixture(scope="module", params=BACKENDS)
def driver(tmp_path_factory, request):
    """A running `pvlun serve` (module-level SERVE_ARGS adds flags), per backend."""
    if request.param == "iscsi":
        from split_support import split_driver

        with split_driver(tmp_path_factory.mktemp("pvlun"), getattr(request.module, "SERVE_ARGS", ())) as drv:
            yield drv
        return
    data_dir = tmp_path_factory.mktemp("pvlun") / "data"
    try:
        drv = start_driver(data_dir, *getattr(request.module, "SERVE_ARGS", ()))
    except BaseException:
        _force_clean(str(data_dir))  # a server that died after mounting its pool leaves it mounted
        raise
    try:
        yield drv
    finally:
        if drv.proc.poll() is None:
            rc = drv.stop()
        else:
            rc = drv.proc.returncode
        left_mounts = mounts_under(str(data_dir))
        left_loops = loop_devices_under(str(data_dir))
        _force_clean(str(data_dir))
    assert rc == 0, f"pvlun serve exited {rc}: {drv.stderr_path.read_text()[-3000:]}"
    assert drv.socket_mode == 0o600, oct(drv.socket_mode)
    assert not left_mounts, f"left mounted after a clean stop: {left_mounts}"
    assert not left_loops, f"loop devices left attached: {left_loops}"


@contextmanager
def running_driver(data_dir: Path, *args: str, pool_size: int | None = POOL_SIZE):
    """A `pvlun serve` of a test's own; stopped cleanly, leaving no mount or loop device."""
    drv = start_driver(data_dir, *args, pool_size=pool_size)
    try:
        yield drv
    finally:
        rc = drv.stop() if drv.proc.poll() is None else drv.proc.returncode
        left = mounts_under(str(data_dir)) + loop_devices_under(str(data_dir))
        _force_clean(str(data_dir))
        assert rc == 0, drv.stderr_path.read_text()[-3000:]
        assert not left, left


@contextmanager
def xfs_pool(image: Path, size: int):
    """A small real XFS reflink pool of `size` bytes, mounted (see pvlun.local_run)."""
    with small_xfs_pool(str(image), size) as mount_point:
        yield Path(mount_point)


# ---------------------------------------------------------------- per-test resources


class Resources:
    """What a test made, undone LIFO like csi-sanity's cleanup: node unpublish/unstage
    (OK or NOT_FOUND), controller unpublish (must be OK) and delete (must be OK)."""

    def __init__(self, driver: Driver, root: Path):
        self.d = driver
        self.ctl = driver.controller
        self.target_dir = root / "csi-mount"
        self.staging = root / "csi-staging"
        os.mkdir(self.target_dir)
        os.mkdir(self.staging)
        self.target = self.target_dir / "target"
        self._undo: list[tuple[str, tuple]] = []

    # controller side
    def volume(self, name: str | None = None, size: int = SMALL, cap: pb.VolumeCapability | None = None,
               limit: int | None = None, **fields: Any) -> pb.Volume:
        request = pb.CreateVolumeRequest(
            name=name or unique("vol"), volume_capabilities=[cap or mount_cap()],
            capacity_range=pb.CapacityRange(required_bytes=size, limit_bytes=size if limit is None else limit),
            **fields)
        vol = self.ctl.CreateVolume(request).volume
        self._undo.append(("volume", (vol.volume_id,)))
        return vol

    def snapshot(self, volume_id: str, name: str | None = None) -> pb.Snapshot:
        snap = self.ctl.CreateSnapshot(pb.CreateSnapshotRequest(name=name or unique("snap"),
                                                                source_volume_id=volume_id)).snapshot
        self._undo.append(("snapshot", (snap.snapshot_id,)))
        return snap

    def group(self, volume_ids: list[str], name: str | None = None) -> pb.VolumeGroupSnapshot:
        grp = self.d.group.CreateVolumeGroupSnapshot(pb.CreateVolumeGroupSnapshotRequest(
            name=name or unique("grp"), source_volume_ids=volume_ids)).group_snapshot
        self._undo.append(("group", (grp.group_snapshot_id,)))
        return grp

    def publish(self, volume_id: str, cap: pb.VolumeCapability, node_id: str = NODE_ID,
                readonly: bool = False) -> dict[str, str]:
        rsp = self.ctl.ControllerPublishVolume(pb.ControllerPublishVolumeRequest(
            volume_id=volume_id, node_id=node_id, volume_capability=cap, readonly=readonly))
        self._undo.append(("publish", (volume_id, node_id)))
        return dict(rsp.publish_context)

    # node side
    def stage(self, volume_id: str, cap: pb.VolumeCapability, ctx: dict[str, str], staging: Path | None = None,
              node: Any = None) -> None:
        staging = staging or self.staging
        (node or self.d.node).NodeStageVolume(pb.NodeStageVolumeRequest(
            volume_id=volume_id, staging_target_path=str(staging), volume_capability=cap, publish_context=ctx))
        self._undo.append(("stage", (volume_id, str(staging), node or self.d.node)))

    def node_publish(self, volume_id: str, cap: pb.VolumeCapability, ctx: dict[str, str], target: Path | None = None,
                     staging: Path | None = None, readonly: bool = False, node: Any = None) -> Path:
        target = target or self.target
        (node or self.d.node).NodePublishVolume(pb.NodePublishVolumeRequest(
            volume_id=volume_id, staging_target_path=str(staging or self.staging), target_path=str(target),
            volume_capability=cap, publish_context=ctx, readonly=readonly))
        self._undo.append(("node_publish", (volume_id, str(target), node or self.d.node)))
        return target

    def attach(self, volume_id: str, cap: pb.VolumeCapability, readonly: bool = False) -> Path:
        """ControllerPublish + NodeStage + NodePublish on the first node; the target path."""
        ctx = self.publish(volume_id, cap, readonly=readonly)
        self.stage(volume_id, cap, ctx)
        return self.node_publish(volume_id, cap, ctx, readonly=readonly)

    def cleanup(self) -> None:
        ok_or_missing = (Code.OK, Code.NOT_FOUND)
        while self._undo:
            kind, args = self._undo.pop()
            if kind == "node_publish":
                volume_id, target, node = args
                self._must(ok_or_missing, node.NodeUnpublishVolume,
                           pb.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=target))
            elif kind == "stage":
                volume_id, staging, node = args
                self._must(ok_or_missing, node.NodeUnstageVolume,
                           pb.NodeUnstageVolumeRequest(volume_id=volume_id, staging_target_path=staging))
            elif kind == "publish":
                self._must((Code.OK,), self.ctl.ControllerUnpublishVolume,
                           pb.ControllerUnpublishVolumeRequest(volume_id=args[0], node_id=args[1]))
            elif kind == "snapshot":
                self._must((Code.OK,), self.ctl.DeleteSnapshot, pb.DeleteSnapshotRequest(snapshot_id=args[0]))
            elif kind == "group":
                self._must((Code.OK,), self.d.group.DeleteVolumeGroupSnapshot,
                           pb.DeleteVolumeGroupSnapshotRequest(group_snapshot_id=args[0]))
            elif kind == "volume":
                self._must((Code.OK,), self.ctl.DeleteVolume, pb.DeleteVolumeRequest(volume_id=args[0]))

    @staticmethod
    def _must(codes: tuple, call: Callable, request: Any) -> None:
        try:
            call(request)
        except grpc.RpcError as err:
            assert err.code() in codes, f"cleanup {type(request).__name__}: {err.code().name}: {err.details()}"


@pytest.fixture
def res(driver, tmp_path):
    resources = Resources(driver, tmp_path)
    yield resources
    try:
        resources.cleanup()
    finally:
        left = mounts_under(str(tmp_path))
        _force_clean(str(tmp_path))
    assert not left, f"still mounted after cleanup: {left}"
    # csi-sanity's Teardown removes both dirs with os.Remove: anything left makes the next Setup fail.
    assert os.listdir(resources.target_dir) == [], "left in the target dir"
    assert os.listdir(resources.staging) == [], "left in the staging dir"
    os.rmdir(resources.target_dir)
    os.rmdir(resources.staging)
