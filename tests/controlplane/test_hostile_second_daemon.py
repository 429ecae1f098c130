"""Hostile: a second `pvlun serve` on a running instance. It used to start, run start-up
repair against the live state (detach attachments, delete volumes), overwrite serve.json and
csi.sock, and unmount the first daemon's pool when stopped; a second data dir naming the same
`--pool` deleted the first one's LUNs as orphans. Now each role (the controller, each node
ID) of a data dir and each pool is held by one daemon: a second one is refused with one line
and exit 1, having touched nothing, while a split controller and node plugins of other node
IDs still share a data dir."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from test_datavolume import dv

from controlplane import kubelet
from controlplane.csi_client import CsiClient


def second_serve(data_dir: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pvlun.cli", "serve", "--data-dir", data_dir, "--pool-size", "2Gi",
                           *extra], capture_output=True, text=True, timeout=120)


def assert_refused(proc: subprocess.CompletedProcess, *said: str) -> None:
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pvlun serve: another pvlun serve"), proc.stderr
    for text in said:
        assert text in lines[0], lines[0]


def mounted(path: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == os.path.realpath(path) for line in f)


def test_a_second_daemon_on_a_running_data_dir_is_refused_having_touched_nothing(serve, tmp_path):
    data_dir = str(tmp_path / "live")
    os.makedirs(data_dir)
    first = serve("--nodes", "1", data_dir=data_dir)
    first.apply(dv("in-use", "    blank: {}", size="16Mi"), "--wait")
    node = first.nodes()[0]
    csi = CsiClient(first.data_dir, [node])
    attached = kubelet.attach(first.store, csi, first.data_dir, "in-use", "default", node, "test/in-use")
    try:
        record = open(os.path.join(data_dir, "serve.json")).read()
        socket_inode = os.stat(os.path.join(data_dir, "csi.sock")).st_ino
        for extra in ((), ("--mode", "controller"), ("--mode", "node", "--node-id", node)):
            refused = second_serve(data_dir, *extra)
            held = "the controller" if "node" not in extra else f"node {node}"
            assert_refused(refused, f"(pid {first.proc.pid})", f"serves {held} of data dir {data_dir}")
        # the first daemon's state is as it was: no repair, no unmount, no record or socket replaced
        assert [a["spec"]["owner"] for a in first.store.list("VolumeAttachment")] == ["test/in-use"]
        assert mounted(attached.path) and mounted(os.path.join(data_dir, "pool"))
        assert open(os.path.join(data_dir, "serve.json")).read() == record
        assert os.stat(os.path.join(data_dir, "csi.sock")).st_ino == socket_inode
        assert os.path.exists(first.lun_path("in-use"))
        first.apply(dv("after", "    blank: {}", size="8Mi"), "--wait")  # and it still works
    finally:
        kubelet.detach(first.store, csi, attached.volume_id, node, "test/in-use")
        csi.close()


def test_data_dirs_sharing_a_pool_are_refused_and_the_first_ones_volumes_stay(serve, tmp_path):
    pool = str(tmp_path / "shared-pool")
    first_dir, second_dir = str(tmp_path / "one"), str(tmp_path / "two")
    for d in (first_dir, second_dir):
        os.makedirs(d)
    first = serve("--pool", pool, "--nodes", "1", data_dir=first_dir)
    first.apply(dv("kept", "    blank: {}", size="8Mi"), "--wait")
    handle = first.get("PersistentVolume", first.get("PersistentVolumeClaim", "kept")["spec"]["volumeName"])
    lun = os.path.join(pool, "volumes", handle["spec"]["csi"]["volumeHandle"] + ".img")
    assert os.path.exists(lun)
    assert_refused(second_serve(second_dir, "--pool", pool, "--nodes", "1"), f"uses the pool {pool}")
    assert os.path.exists(lun)  # no start-up repair took it for an orphan
    assert not os.path.exists(os.path.join(second_dir, "catalog.db"))
    # nor may a --pool name the pool image another daemon mounted
    image_pool = os.path.join(serve().data_dir, "pool")
    assert mounted(image_pool)
    assert_refused(second_serve(second_dir, "--pool", image_pool, "--nodes", "1"), "uses the pool")


def test_a_split_controller_and_node_plugins_of_several_node_ids_share_a_data_dir(serve, tmp_path):
    data_dir = str(tmp_path / "split")
    os.makedirs(data_dir)
    controller = serve("--mode", "controller", data_dir=data_dir)
    nodes = [serve("--mode", "node", "--node-id", f"n{i}", data_dir=data_dir) for i in (1, 2)]
    assert all(inst.proc.poll() is None for inst in [controller, *nodes])
    csi = CsiClient.of_daemon(data_dir)
    try:
        assert sorted(csi.node_ids) == ["n1", "n2"]  # each recorded its own endpoint: none replaced the other
    finally:
        csi.close()
    assert {f"serve-node-n{i}.json" for i in (1, 2)} <= set(os.listdir(data_dir))
    for i in (1, 2):
        with open(os.path.join(data_dir, f"serve-node-n{i}.json")) as f:
            assert json.load(f)["pid"] == nodes[i - 1].proc.pid
    assert_refused(second_serve(data_dir, "--mode", "node", "--node-id", "n2"), "serves node n2")
    assert_refused(second_serve(data_dir, "--nodes", "1", "--node-id", "n3"), "serves the controller")
    assert nodes[1].proc.poll() is None and controller.proc.poll() is None
