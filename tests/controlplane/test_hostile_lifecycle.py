"""Starts, stops and probes that once left things behind: start-up repair meets an attachment
on a node the daemon no longer serves (and a malformed one), a start that fails after the pool
was mounted, a clean stop and its WAL, upload readiness probes, and the split serve modes."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time

import pytest
import requests
from test_datavolume import dv, make_qcow2

from pvlun.local_run import stop_daemon


def loop_devices(path: str) -> str:
    return subprocess.run(["losetup", "-j", path], capture_output=True, text=True, check=True).stdout.strip()


def mounted(path: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == os.path.realpath(path) for line in f)


def tcp_listeners(pid: int) -> set[int]:
    """Ports of the TCP sockets process `pid` listens on."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def upload_attachments(inst, name: str) -> list[dict]:
    return [a for a in inst.store.list("VolumeAttachment") if a["spec"]["owner"] == f"upload/default/{name}"]


def test_start_up_repair_drops_attachments_on_a_node_no_longer_served_and_malformed_ones(serve, tmp_path):
    from controlplane import kubelet
    from controlplane.csi_client import CsiClient

    data_dir = str(tmp_path / "renamed")
    os.makedirs(data_dir)
    first = serve("--node-id", "old-host", "--nodes", "1", data_dir=data_dir)
    first.apply(dv("held", "    blank: {}", size="16Mi"), "--wait")
    lun = first.lun_path("held")
    kubelet.attach(first.store, CsiClient.of_daemon(data_dir), data_dir, "held", "default", "old-host", "test/holder")
    assert loop_devices(lun)  # really attached: a loop device on the LUN
    [held] = first.store.list("VolumeAttachment")
    first.store.apply({"apiVersion": "storage.k8s.io/v1", "kind": "VolumeAttachment", "metadata": {"name": "junk"},
                       "spec": {"nodeName": "old-host"}})  # no volume, no owner: what a bad manifest leaves
    first.proc.terminate()  # a clean stop: attachments stay, and so does the pool they keep busy
    assert first.proc.wait(60) == 0
    second = serve("--node-id", "new-host", "--nodes", "1", data_dir=data_dir)  # the host was renamed
    assert second.store.list("VolumeAttachment") == []
    [dropped] = [e for e in second.store.events(held) if e["reason"] == "NodeNotServed"]
    assert "'old-host'" in dropped["message"] and "new-host" in dropped["message"]
    assert [e["reason"] for e in second.store.events({"kind": "VolumeAttachment", "metadata": {"name": "junk"}})] \
        == ["RepairFailed"]
    assert loop_devices(lun) == ""  # its node side was undone through the node this daemon serves
    second.cli("delete", "dv", "held")  # nothing holds the claim any more
    second.wait(lambda: second.get("PersistentVolumeClaim", "held") is None and not os.path.exists(lun), 30,
                "the claim and its volume gone")


@pytest.mark.parametrize("flag", ["--endpoint", "--upload-address"])
def test_a_start_that_fails_after_the_pool_is_mounted_releases_the_pool_and_its_loop_device(tmp_path, flag):
    data_dir = str(tmp_path / "data")
    os.makedirs(data_dir)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        where = f"tcp://127.0.0.1:{port}" if flag == "--endpoint" else f"127.0.0.1:{port}"
        proc = subprocess.run([sys.executable, "-m", "pvlun.cli", "serve", "--data-dir", data_dir, "--pool-size", "2Gi",
                               flag, where], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "XFS reflink image" in proc.stderr  # the pool was mounted before the failure
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"pvlun serve: cannot listen on {where.removeprefix('tcp://')}"
                                                            if flag == "--upload-address" else
                                                            f"pvlun serve: cannot listen on {where}")
    assert not mounted(os.path.join(data_dir, "pool"))
    assert loop_devices(os.path.join(data_dir, "pool.img")) == ""
    assert not {"serve.pid", "serve.json"} & set(os.listdir(data_dir))


def test_a_clean_stop_checkpoints_the_catalog_so_no_wal_is_left_to_grow(serve, tmp_path):
    data_dir = str(tmp_path / "wal")
    os.makedirs(data_dir)
    inst = serve(data_dir=data_dir)
    inst.apply("".join(dv(f"w{i}", "    blank: {}", size="8Mi") + "---\n" for i in range(5)), "--wait")
    wal = os.path.join(data_dir, "catalog.db-wal")
    assert os.path.getsize(wal) > 0
    stop_daemon(inst.proc, data_dir)  # this test's own connection stays open: the file stays, empty
    assert not os.path.exists(wal) or os.path.getsize(wal) == 0
    assert {o["metadata"]["name"] for o in inst.store.list("DataVolume")} >= {f"w{i}" for i in range(5)}


def test_upload_readiness_probes_and_requests_that_are_no_upload_attach_nothing(instance, tmp_path):
    from importer.upload_gateway import endpoint, mint_token

    instance.apply(dv("probed", "    upload: {}", size="32Mi"))
    instance.wait(lambda: (instance.get("DataVolume", "probed").get("status") or {}).get("phase") == "UploadReady",
                  what="UploadReady")
    url, ca = endpoint(instance.data_dir)
    auth = {"Authorization": f"Bearer {mint_token(instance.data_dir, 'default', 'probed')}"}
    for _ in range(3):
        probe = requests.get(f"{url}/v1beta1/upload", headers=auth, verify=ca, timeout=10)
        assert probe.status_code == 200 and probe.text.strip() == "ready"
    assert requests.post(f"{url}/v1beta1/upload", headers=auth, data=b"", verify=ca, timeout=10).status_code == 400
    host, port = url.removeprefix("https://").split(":")
    tls = ssl.create_default_context(cafile=ca)
    with socket.create_connection((host, int(port))) as raw, tls.wrap_socket(raw, server_hostname=host) as s:
        s.sendall((f"PUT /v1beta1/upload HTTP/1.1\r\nHost: {host}\r\nAuthorization: {auth['Authorization']}\r\n"
                   f"Content-Length: {1 << 20}\r\n\r\n").encode())  # headers only, and then the client waits
        for _ in range(10):
            assert upload_attachments(instance, "probed") == []
            instance.wait(lambda: True, 0.1)
    assert upload_attachments(instance, "probed") == []
    status = instance.get("DataVolume", "probed")["status"]
    assert status["phase"] == "UploadReady" and status.get("restartCount", 0) == 0
    image = str(tmp_path / "probed.qcow2")
    raw_image = make_qcow2(image, 16)
    instance.cli("image-upload", "--dv", "probed", "--image-path", image)
    assert upload_attachments(instance, "probed") == []
    with open(raw_image, "rb") as a, open(instance.lun_path("probed"), "rb") as b:
        assert a.read() == b.read(16 << 20)


def test_split_serve_modes_open_no_upload_endpoint_and_are_found_from_the_data_dir(serve, instance, tmp_path):
    from csi.proto import csi_pb2 as pb
    from controlplane.csi_client import CsiClient

    data_dir = str(tmp_path / "split")
    os.makedirs(data_dir)
    controller = serve("--mode", "controller", data_dir=data_dir)
    node = serve("--mode", "node", "--node-id", "split-node", data_dir=data_dir)
    for inst in (controller, node):
        assert tcp_listeners(inst.proc.pid) == set()
    assert not os.path.exists(os.path.join(data_dir, "upload", "url"))
    csi = CsiClient.of_daemon(data_dir)  # the controller's socket and the node's, from what they recorded
    assert csi.node_ids == ["split-node"]
    assert csi.node("split-node").NodeGetInfo(pb.NodeGetInfoRequest()).node_id == "split-node"
    assert csi.controller.ControllerGetCapabilities(pb.ControllerGetCapabilitiesRequest()).capabilities
    with open(os.path.join(instance.data_dir, "upload", "url")) as f:  # mode all: the part that imports has one
        upload_port = int(f.read().rsplit(":", 1)[1])
    assert upload_port in tcp_listeners(instance.proc.pid)


@pytest.mark.parametrize("flags,fragment", [
    (["--node-id", "bad/id"], "argument --node-id: 'bad/id' is not a valid node ID"),
    (["--node-id", "-leading-dash"], "argument --node-id"),
    (["--node-id", "n" * 128, "--nodes", "2"], "--node-id is too long for --nodes 2"),
    (["--nodes", "0"], "argument --nodes: the number of nodes must be at least 1, not 0"),
    (["--nodes", "-1"], "argument --nodes: the number of nodes must be at least 1, not -1"),
    (["--max-volumes-per-node", "0"], "argument --max-volumes-per-node: the volumes per node must be at least 1"),
    (["--max-volumes-per-node", "many"], "argument --max-volumes-per-node: 'many' is not a whole number"),
], ids=["slash", "dash", "too-long-with-nodes", "nodes-0", "nodes-negative", "volumes-0", "volumes-word"])
def test_serve_refuses_bad_options_in_one_line_before_it_starts(tmp_path, flags, fragment):
    data_dir = str(tmp_path / "never")
    proc = subprocess.run([sys.executable, "-m", "pvlun.cli", "serve", "--data-dir", data_dir, *flags],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode in (1, 2), proc.stderr
    [line] = proc.stderr.splitlines()
    assert line.startswith("pvlun serve: ") and fragment in line, line
    assert not os.path.exists(data_dir)  # nothing was started, not even the data dir made


def test_a_sigterm_stop_is_clean_and_a_second_sigterm_is_harmless(serve, tmp_path):
    data_dir = str(tmp_path / "stops")
    os.makedirs(data_dir)
    inst = serve(data_dir=data_dir)
    inst.apply("".join(dv(f"s{i}", "    blank: {}", size="8Mi") + "---\n" for i in range(3)), "--wait")
    inst.apply(dv("s-late", "    blank: {}", size="8Mi"))  # the controllers have work in hand at the stop
    inst.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    inst.proc.send_signal(signal.SIGTERM)  # a second one while the first stop runs
    assert inst.proc.wait(60) == 0
    with open(os.path.join(data_dir, "serve.log")) as f:
        log = f.read()
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]
    assert log.count("signal 15: stopping") == 1
    assert not mounted(os.path.join(data_dir, "pool"))
    assert loop_devices(os.path.join(data_dir, "pool.img")) == ""
    wal = os.path.join(data_dir, "catalog.db-wal")
    assert not os.path.exists(wal) or os.path.getsize(wal) == 0
    again = serve(data_dir=data_dir)  # and it starts again on what it left
    assert {o["metadata"]["name"] for o in again.store.list("DataVolume")} >= {"s0", "s1", "s2", "s-late"}


def test_a_socket_path_longer_than_the_kernel_allows_is_refused_before_the_pool_is_taken(tmp_path):
    data_dir = tmp_path / ("d" * 60) / "data"
    proc = subprocess.run([sys.executable, "-m", "pvlun.cli", "serve", "--data-dir", str(data_dir), "--pool-size", "2Gi",
                           "--nodes", "2"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("pvlun serve: socket ") and "a Unix socket path may have at most 107" in last, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (data_dir / "pool.img").exists()
