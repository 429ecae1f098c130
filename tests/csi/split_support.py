"""The conformance suite's driver on the iscsi backend, split over hosts: the controller and
its tgtd in a storage host's network namespace (the target listens on the storage host's
198.18 address), each node plugin in a node host's own namespace (pvlun/host_deployment.py
on host/netns.py). A node reaches its LUNs only over iSCSI — its qemu-storage-daemons run in
its namespace — while its CSI socket, mounts and loop devices are the machine's, so the
tests call and check it from here as they do the file backend's.

`split_driver` yields the same Driver the file backend's fixture does and, at the end,
checks what a clean stop must leave: every process exited 0, tgtd's control port is free,
and no mount, loop device or qemu-storage-daemon state of the data dir or the nodes' iSCSI
initiators is left. Whatever is left after a failure is released (lazy unmounts, loop
detach, the namespaces with every process in them).
"""

from __future__ import annotations

import mmap
import os
import shutil
import stat
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import grpc

from csi_support import NODE2_ID, NODE_ID, POOL_SIZE, Driver, _force_clean, loop_devices_under, mounts_under
from host.netns import Hosts
from host.tgt import control_port_free
from iscsi_target_support import free_control_port
from pvlun.daemon import initiator_state_dir
from pvlun.host_deployment import SplitDeployment

STORAGE, NODE_HOSTS = "storage", {"nodeA": NODE_ID, "nodeB": NODE2_ID}
PORTAL_PORT = 3260  # the storage host's namespace is ours alone: the standard port is free there


def _pool_size(serve_args: Sequence[str]) -> tuple[str, list[str]]:
    """--pool-size out of a module's SERVE_ARGS (the controller's pool), the rest for everyone."""
    args = list(serve_args)
    if "--pool-size" in args:
        at = args.index("--pool-size")
        size = args[at + 1]
        del args[at:at + 2]
        return size, args
    return str(POOL_SIZE), args


def read_direct(path: str, offset: int, length: int) -> bytes:
    """Read past the page cache: what the device (and so the target) holds now."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, length)
        os.preadv(fd, [buf], offset)
        return bytes(buf)
    finally:
        os.close(fd)


def write_sync(path: str, offset: int, data: bytes) -> None:
    """Write and wait until the device has it (O_DSYNC through the loop device, FUSE, iSCSI)."""
    fd = os.open(path, os.O_WRONLY | os.O_DSYNC)
    try:
        assert os.pwrite(fd, data, offset) == len(data)
        os.fsync(fd)
    finally:
        os.close(fd)


def state_dirs(data_dir: Path) -> list[str]:
    """The node plugins' userspace initiator state dirs (a qemu-storage-daemon per staged volume)."""
    return [initiator_state_dir(str(data_dir), node_id) for node_id in NODE_HOSTS.values()]


@contextmanager
def split_hosts(root: Path, serve_args: Sequence[str] = ()) -> Iterator[tuple[Hosts, SplitDeployment, int]]:
    """Hosts storage/nodeA/nodeB and pvlun on them with the iscsi backend (node IDs NODE_ID,
    NODE2_ID; data dir ROOT/data), and tgtd's control port; everything under root and of the
    nodes' initiators released on leaving, also after a failure."""
    data_dir = root / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    pool_size, args = _pool_size(serve_args)
    control = free_control_port()
    try:
        with Hosts([STORAGE, *NODE_HOSTS]) as hosts:
            portal = f"{hosts[STORAGE].address}:{PORTAL_PORT}"
            deployment = SplitDeployment(
                hosts, str(data_dir), storage=STORAGE, nodes=list(NODE_HOSTS), backend="iscsi",
                controller_args=["--iscsi-portal", portal, "--iscsi-control-port", str(control), *args],
                node_args=args, pool_size=pool_size, node_ids=NODE_HOSTS)
            try:
                with deployment:
                    yield hosts, deployment, control
            finally:  # loop devices on a storage daemon's export: found by path only while it still serves
                for where in state_dirs(data_dir):
                    _force_clean(where)
    finally:  # the namespaces took the storage daemons along; root also holds the tests' staging paths
        for where in state_dirs(data_dir):
            _force_clean(where)
            shutil.rmtree(where, ignore_errors=True)
        _force_clean(str(root))


def leftovers(data_dir: Path) -> list[str]:
    """Mounts and loop devices of the data dir and the nodes' initiators, and initiator state."""
    left = mounts_under(str(data_dir)) + loop_devices_under(str(data_dir))
    for where in state_dirs(data_dir):
        left += mounts_under(where) + loop_devices_under(where)
        if os.path.exists(where):  # a clean stop removes even the empty dir
            left.append(f"{where}: {os.listdir(where)}")
    return left


@contextmanager
def split_driver(root: Path, serve_args: Sequence[str] = ()) -> Iterator[Driver]:
    """The conformance Driver of a split iscsi deployment (see the module docstring)."""
    data_dir = root / "data"
    with split_hosts(root, serve_args) as (hosts, deployment, control):
        processes = dict(deployment.processes)
        logs = [data_dir / "serve-controller.log"] + [data_dir / f"serve-node-{n}.log" for n in NODE_HOSTS.values()]
        sock = data_dir / "csi.sock"

        def stop() -> int:
            deployment.stop()
            return max(abs(p.returncode or 0) for p in processes.values())

        def exits() -> str:
            return "; ".join(f"{role} exited {p.returncode}" for role, p in processes.items())

        drv = Driver(data_dir, None, logs[0], stat.S_IMODE(sock.stat().st_mode), backend="iscsi",
                     node_socket=data_dir / "nodes" / NODE_ID / "csi.sock", log_paths=tuple(logs), stopper=stop)
        for channel in drv.channels:
            grpc.channel_ready_future(channel).result(timeout=10)
        try:
            yield drv
        finally:
            rc = drv.stop()
            left = leftovers(data_dir)
            tgtd_gone = control_port_free(control)
    assert rc == 0, f"{exits()}: " + " | ".join(
        p.read_text(errors="replace")[-1500:] for p in logs if p.exists())
    assert drv.socket_mode == 0o600, oct(drv.socket_mode)
    assert not left, f"left behind after a clean stop: {left}"
    assert tgtd_gone, "pvlun's tgtd outlived the controller"
