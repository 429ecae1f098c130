"""CSI driver benchmark against a real `pvlun serve` subprocess.

`run()` returns (metric, value, note) rows:
- CreateVolume+DeleteVolume pairs per second, 1 and 16 concurrent clients (a channel each);
- snapshot, clone and restore time of a 10 GiB volume with 1 GiB written, on the reflink pool
  (the XFS image the driver makes on an ext4 data dir) and on a plain-copy pool (`--pool` on
  the ext4 root filesystem) side by side — issue 2's target: under 100 ms on the reflink pool;
- the serving process's RSS with 10,000 volumes in the catalog, after a ListVolumes over all.
"""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import grpc

from csi.pool import is_mountpoint
from csi.proto import csi_pb2 as pb
from csi.proto import csi_pb2_grpc as rpc
from host.command import run as run_command

MiB, GiB = 1 << 20, 1 << 30
NODE = "bench-node"
BLOCK = pb.VolumeCapability(block=pb.VolumeCapability.BlockVolume(),
                            access_mode=pb.VolumeCapability.AccessMode(mode=pb.VolumeCapability.AccessMode.SINGLE_NODE_WRITER))
Row = tuple[str, str, str]


class Driver:
    """`pvlun serve` on a data dir; `stop()` is a clean SIGTERM (which unmounts the pool image)."""

    def __init__(self, data_dir: str, pool: str | None = None, pool_size: str = "16Gi", overcommit: str = "1"):
        self.data_dir, self.pool, self.pool_size, self.overcommit = data_dir, pool, pool_size, overcommit
        self.proc: subprocess.Popen | None = None
        self.startup_seconds = 0.0

    def __enter__(self) -> "Driver":
        os.makedirs(self.data_dir, exist_ok=True)
        argv = [sys.executable, "-m", "pvlun.cli", "serve", "--data-dir", self.data_dir, "--node-id", NODE,
                "--pool-size", self.pool_size, "--overcommit", self.overcommit] + (["--pool", self.pool] if self.pool else [])
        started = time.monotonic()
        with open(os.path.join(self.data_dir, "serve.log"), "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        pid_file = os.path.join(self.data_dir, "serve.pid")
        while time.monotonic() - started < 300:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pvlun serve exited {self.proc.returncode}: {self.log_tail()}")
            try:
                if open(pid_file).read().strip() == str(self.proc.pid):
                    break
            except FileNotFoundError:
                pass
            time.sleep(0.02)
        else:
            self.stop()
            raise RuntimeError(f"pvlun serve did not come up: {self.log_tail()}")
        self.startup_seconds = time.monotonic() - started
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        pool = os.path.join(self.data_dir, "pool")
        if not self.pool and is_mountpoint(pool):
            run_command(["umount", pool], timeout=60, check=False)

    def channel(self) -> grpc.Channel:
        ch = grpc.insecure_channel("unix://" + os.path.join(self.data_dir, "csi.sock"),
                                   options=[("grpc.max_receive_message_length", 64 * MiB)])
        grpc.channel_ready_future(ch).result(timeout=10)
        return ch

    def rss(self) -> tuple[int, int]:
        """(VmRSS, VmHWM) of the serving process, in bytes."""
        values = {}
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    values[key] = int(rest.split()[0]) * 1024
        return values["VmRSS"], values["VmHWM"]

    def log_tail(self) -> str:
        with open(os.path.join(self.data_dir, "serve.log"), errors="replace") as f:
            return f.read()[-2000:]


def _create(ctl, name: str, size: int, source: pb.VolumeContentSource | None = None) -> pb.Volume:
    req = pb.CreateVolumeRequest(name=name, capacity_range=pb.CapacityRange(required_bytes=size),
                                 volume_capabilities=[BLOCK])
    if source is not None:
        req.volume_content_source.CopyFrom(source)
    return ctl.CreateVolume(req, timeout=600).volume


# ---- (a) CreateVolume + DeleteVolume per second ------------------------------------------------
def create_delete_rate(driver: Driver, clients: int, seconds: float = 5.0) -> Row:
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[str] = []
    start_gate = threading.Barrier(clients + 1)
    deadline = [0.0]

    def client(i: int) -> None:
        ch = driver.channel()
        ctl = rpc.ControllerStub(ch)
        start_gate.wait()
        n = 0
        try:
            while time.monotonic() < deadline[0]:
                t0 = time.monotonic()
                vol = _create(ctl, f"rate-{clients}-{i}-{n}", MiB)
                ctl.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id), timeout=60)
                latencies[i].append(time.monotonic() - t0)
                n += 1
        except grpc.RpcError as exc:
            errors.append(f"{exc.code().name}: {exc.details()}")
        finally:
            ch.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    deadline[0] = time.monotonic() + seconds
    t0 = time.monotonic()
    start_gate.wait()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    if errors:
        raise RuntimeError(f"{clients} clients: {errors[0]}")
    every = sorted(x for per in latencies for x in per)
    p50, p99 = every[len(every) // 2], every[int(len(every) * 0.99)]
    return (f"CreateVolume+DeleteVolume, {clients} client{'s' if clients > 1 else ''}",
            f"{len(every) / elapsed:.0f} pairs/s",
            f"{len(every)} pairs in {elapsed:.1f} s; pair latency p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms; "
            "1 MiB block volumes, XFS reflink pool, a gRPC channel per client thread (no target in the issue)")


# ---- (b) snapshot and clone of a 10 GiB volume with 1 GiB written -------------------------------
def _fill(path: str, total: int = GiB, chunk: int = 64 * MiB) -> None:
    """Write `total` bytes of random data spread over the LUN (16 extents), then fsync."""
    data = os.urandom(chunk)
    size = os.path.getsize(path)
    count = total // chunk
    with open(path, "r+b") as f:
        for i in range(count):
            f.seek(i * (size // count))
            f.write(data[i:] + data[:i])  # a rotation: no two chunks alike
        os.fsync(f.fileno())


def snapshot_clone_times(driver: Driver, label: str, repeats: int = 3) -> list[Row]:
    with driver.channel() as ch:
        ctl = rpc.ControllerStub(ch)
        vol = _create(ctl, f"big-{label}", 10 * GiB)
        publish = ctl.ControllerPublishVolume(pb.ControllerPublishVolumeRequest(
            volume_id=vol.volume_id, node_id=NODE, volume_capability=BLOCK), timeout=60)
        _fill(publish.publish_context["lunPath"])
        ctl.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(volume_id=vol.volume_id, node_id=NODE), timeout=60)
        times: dict[str, list[float]] = {"snapshot": [], "clone": [], "restore": []}
        for r in range(repeats):
            t0 = time.monotonic()
            snap = ctl.CreateSnapshot(pb.CreateSnapshotRequest(name=f"snap-{label}-{r}", source_volume_id=vol.volume_id),
                                      timeout=600).snapshot
            times["snapshot"].append(time.monotonic() - t0)
            t0 = time.monotonic()
            clone = _create(ctl, f"clone-{label}-{r}", 10 * GiB, pb.VolumeContentSource(
                volume=pb.VolumeContentSource.VolumeSource(volume_id=vol.volume_id)))
            times["clone"].append(time.monotonic() - t0)
            t0 = time.monotonic()
            restored = _create(ctl, f"restore-{label}-{r}", 10 * GiB, pb.VolumeContentSource(
                snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id=snap.snapshot_id)))
            times["restore"].append(time.monotonic() - t0)
            for volume_id in (clone.volume_id, restored.volume_id):
                ctl.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume_id), timeout=600)
            ctl.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id), timeout=600)
        ctl.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id), timeout=600)
    rows = []
    what = {"snapshot": "CreateSnapshot", "clone": "CreateVolume from the volume",
            "restore": "CreateVolume from the snapshot"}
    for op, samples in times.items():
        median = statistics.median(samples) * 1000
        target = "target < 100 ms" if label == "reflink" and op != "restore" else "no target"
        verdict = ("" if target == "no target" else " — met" if median < 100 else " — MISSED")
        rows.append((f"{op} 10 GiB (1 GiB written), {label} pool", f"{median:.1f} ms",
                     f"{target}{verdict}; {what[op]}, median of {repeats}: "
                     + ", ".join(f"{s * 1000:.1f}" for s in samples) + " ms"))
    return rows


# ---- (c) RSS with 10,000 volumes ---------------------------------------------------------------
def rss_with_volumes(root: str, count: int = 10_000, clients: int = 16) -> list[Row]:
    data_dir = os.path.join(root, "rss")
    rows = []
    with Driver(data_dir, pool_size="16Gi") as driver:
        idle_rss, _ = driver.rss()
        created = [0] * clients
        t0 = time.monotonic()

        def client(i: int) -> None:
            with driver.channel() as ch:
                ctl = rpc.ControllerStub(ch)
                for n in range(i, count, clients):
                    _create(ctl, f"many-{n:05d}", MiB)
                    created[i] += 1

        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        create_seconds = time.monotonic() - t0
        if sum(created) != count:
            raise RuntimeError(f"only {sum(created)} of {count} volumes were created")
        listed, list_seconds = _list_all(driver)
        rss, hwm = driver.rss()
        rows.append((f"driver RSS, {count:,} volumes", f"{rss / MiB:.0f} MiB",
                     f"the process that served {count:,} concurrent CreateVolume calls ({clients} clients, "
                     f"{create_seconds:.1f} s) then a ListVolumes over all {listed:,} ({list_seconds:.2f} s, "
                     f"pages of 500); idle at start {idle_rss / MiB:.0f} MiB, peak {hwm / MiB:.0f} MiB (no target in the issue)"))
    with Driver(data_dir, pool_size="16Gi") as driver:  # a fresh process: start-up repair scans all of them
        startup = driver.startup_seconds
        listed, list_seconds = _list_all(driver)
        rss, hwm = driver.rss()
        rows.append((f"driver RSS, {count:,} volumes, after restart", f"{rss / MiB:.0f} MiB",
                     f"fresh process: start-up (repair over {count:,} volumes, pool mount) {startup:.2f} s, "
                     f"then ListVolumes over all {listed:,} in {list_seconds:.2f} s; peak {hwm / MiB:.0f} MiB"))
    return rows


def _list_all(driver: Driver) -> tuple[int, float]:
    t0 = time.monotonic()
    n, token = 0, ""
    with driver.channel() as ch:
        ctl = rpc.ControllerStub(ch)
        while True:
            resp = ctl.ListVolumes(pb.ListVolumesRequest(max_entries=500, starting_token=token), timeout=120)
            n += len(resp.entries)
            token = resp.next_token
            if not token:
                return n, time.monotonic() - t0


def run() -> list[Row]:
    root = tempfile.mkdtemp(prefix="pvlun-bench-csi-", dir="/var/tmp")  # ext4 here: no reflinks
    rows: list[Row] = []
    try:
        with Driver(os.path.join(root, "rate"), pool_size="8Gi") as driver:
            for clients in (1, 16):
                rows.append(create_delete_rate(driver, clients))
        for label, pool in (("reflink", None), ("plain-copy", os.path.join(root, "plain", "pool-on-ext4"))):
            # thin (a sparse pool image): the 10 GiB volume, its snapshot, restores and clones are
            # promised 50 GiB and write 1 GiB; a thick pool would take all of it from the host
            with Driver(os.path.join(root, label), pool=pool, pool_size="64Gi", overcommit="4") as driver:
                rows += snapshot_clone_times(driver, label)
        rows += rss_with_volumes(root)
    finally:
        for data_dir in os.listdir(root):
            pool = os.path.join(root, data_dir, "pool")
            if os.path.isdir(pool) and is_mountpoint(pool):
                run_command(["umount", pool], timeout=60, check=False)
        shutil.rmtree(root, ignore_errors=True)
    return rows
