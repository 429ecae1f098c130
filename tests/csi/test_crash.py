"""Crash safety of the driver: kill -9 at random points, restart, prove the catalog and the
pool agree (no orphan file, no temporary, no lost volume) and that retried calls succeed
and are idempotent. Crash states injected by hand, and kills at exact points inside
one call, are in test_crash_points.py.

The random rounds are seeded; the seed is printed (pytest -s) and in every failure
message. Re-run one with PVLUN_CRASH_SEED=<seed>.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import grpc
import pytest

from csi.catalog import READY
from csi.pool import is_mountpoint
from csi.proto import csi_pb2 as pb
from csi.proto import csi_pb2_grpc as rpc
from host.command import run

MiB = 1 << 20
ROUNDS_PER_POOL = 12
WORKERS = 3
MARKER_LEN = 4096
FILLER = random.Random(7).randbytes(2 * MiB)  # data written into each blank volume, copied by copies
BLOCK = pb.VolumeCapability(block=pb.VolumeCapability.BlockVolume(),
                            access_mode=pb.VolumeCapability.AccessMode(mode=pb.VolumeCapability.AccessMode.SINGLE_NODE_WRITER))
INTERRUPTED = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN}  # server died


# ---- the driver as a subprocess ------------------------------------------------------------
class DriverProcess:
    """`pvlun serve` on one data dir, which survives kill -9 and restarts."""

    def __init__(self, data_dir: str, pool: str | None):
        self.data_dir, self.pool = data_dir, pool
        self.pool_dir = pool or os.path.join(data_dir, "pool")
        self.proc: subprocess.Popen | None = None
        self.channel: grpc.Channel | None = None

    def start(self) -> None:
        argv = [sys.executable, "-m", "pvlun.cli", "serve", "--data-dir", self.data_dir,
                "--node-id", "crash-node", "--pool-size", "2Gi",
                "--overcommit", "64"] + (["--pool", self.pool] if self.pool else [])
        with open(os.path.join(self.data_dir, "serve.log"), "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        pid_file = os.path.join(self.data_dir, "serve.pid")  # written once the servers listen
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"pvlun serve exited {self.proc.returncode}: {self.log_tail()}"
            try:
                if open(pid_file).read().strip() == str(self.proc.pid):
                    break
            except FileNotFoundError:
                pass
            time.sleep(0.02)
        else:
            raise AssertionError(f"pvlun serve did not come up: {self.log_tail()}")
        self.channel = grpc.insecure_channel("unix://" + os.path.join(self.data_dir, "csi.sock"))
        grpc.channel_ready_future(self.channel).result(timeout=10)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def close_channel(self) -> None:
        if self.channel:
            self.channel.close()
            self.channel = None

    def stop(self) -> None:
        self.close_channel()
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)

    def controller(self) -> rpc.ControllerStub:
        return rpc.ControllerStub(self.channel)

    def groups(self) -> rpc.GroupControllerStub:
        return rpc.GroupControllerStub(self.channel)

    def repair_lines(self) -> list[str]:
        with open(os.path.join(self.data_dir, "serve.log"), errors="replace") as f:
            return [line.split("start-up repair: ", 1)[1].strip() for line in f if "start-up repair:" in line]

    def log_tail(self) -> str:
        with open(os.path.join(self.data_dir, "serve.log"), errors="replace") as f:
            return f.read()[-3000:]


# ---- what the clients were told -------------------------------------------------------------
@dataclass
class Vol:
    id: str
    size: int
    marker: bytes


@dataclass
class Snap:
    id: str
    volume_id: str
    size: int
    marker: bytes
    group: str = ""


@dataclass
class Model:
    """Every object whose create returned OK and whose delete did not: it must survive."""
    volumes: dict[str, Vol] = field(default_factory=dict)
    snapshots: dict[str, Snap] = field(default_factory=dict)
    groups: dict[str, tuple[str, list[str]]] = field(default_factory=dict)  # name -> (id, member names)
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class Call:
    """One RPC a worker made; kept when the kill interrupted it, to be retried."""
    what: str  # the RPC's name
    request: Any
    finish: Callable[[Any], str]  # updates the model from the response; returns the object's ID
    uncertain: set[str]  # names that may or may not exist if the call was cut short
    expand: tuple[str, int, int] | None = None  # (volume name, old size, new size)

    def send(self, driver: "DriverProcess") -> Any:
        service = driver.groups() if "Group" in self.what else driver.controller()
        return getattr(service, self.what)(self.request, timeout=30)


def marker_for(name: str) -> bytes:
    return name.encode().ljust(MARKER_LEN, b"\0")


def read_marker(pool_dir: str, kind: str, object_id: str) -> bytes:
    with open(os.path.join(pool_dir, kind, object_id + ".img"), "rb") as f:
        return f.read(MARKER_LEN)


class Worker:
    """Runs random create/snapshot/clone/expand/group/delete calls on objects only it owns."""

    def __init__(self, prefix: str, rng: random.Random, driver: DriverProcess, model: Model):
        self.prefix, self.rng, self.driver, self.model = prefix, rng, driver, model
        self.counter = 0
        self.done = 0
        self.interrupted: Call | None = None
        self.error: str | None = None

    def _name(self, kind: str) -> str:
        self.counter += 1
        return f"{self.prefix}-{kind}{self.counter}"

    def _mine(self, table: dict) -> list[str]:
        return [n for n in table if n.startswith(self.prefix + "-")]

    def plan(self) -> Call:
        m = self.model
        with m.lock:  # other workers add and drop their own entries meanwhile
            vols = self._mine(m.volumes)
            snaps = [n for n in self._mine(m.snapshots) if not m.snapshots[n].group]
            groups = self._mine(m.groups)
        choices = [("create", 3 if len(vols) < 8 else 0.3)]
        if vols:
            choices += [("snapshot", 2), ("clone", 1.5), ("expand", 1), ("delete", 2 if len(vols) > 2 else 0.2)]
        if snaps:
            choices += [("restore", 1.5), ("delete_snapshot", 1.5)]
        if len(vols) >= 2:
            choices += [("group", 1)]
        if groups:
            choices += [("delete_group", 1)]
        what = self.rng.choices([c for c, _ in choices], [w for _, w in choices])[0]
        return getattr(self, "_" + what)(vols, snaps, groups)

    def _create(self, vols, snaps, groups) -> Call:
        name = self._name("v")
        size = self.rng.choice([4, 8, 16]) * MiB
        req = pb.CreateVolumeRequest(name=name, capacity_range=pb.CapacityRange(required_bytes=size),
                                     volume_capabilities=[BLOCK])

        def finish(resp) -> str:
            vol = resp.volume
            assert vol.capacity_bytes == size
            path = os.path.join(self.driver.pool_dir, "volumes", vol.volume_id + ".img")
            with open(path, "r+b") as f:  # as a guest would: bytes in, then fsync
                f.write(marker_for(name))
                f.seek(MiB)
                f.write(FILLER)
                os.fsync(f.fileno())
            with self.model.lock:
                self.model.volumes[name] = Vol(vol.volume_id, size, marker_for(name))
            return vol.volume_id
        return Call("CreateVolume", req, finish, {name})

    def _copy(self, source: pb.VolumeContentSource, size: int, marker: bytes) -> Call:
        name = self._name("c")
        req = pb.CreateVolumeRequest(name=name, capacity_range=pb.CapacityRange(required_bytes=size),
                                     volume_capabilities=[BLOCK], volume_content_source=source)

        def finish(resp) -> str:
            vol = resp.volume
            assert vol.capacity_bytes == size
            assert read_marker(self.driver.pool_dir, "volumes", vol.volume_id) == marker, f"clone {name} lost its bytes"
            with self.model.lock:
                self.model.volumes[name] = Vol(vol.volume_id, size, marker)
            return vol.volume_id
        return Call("CreateVolume", req, finish, {name})

    def _clone(self, vols, snaps, groups) -> Call:
        src = self.model.volumes[self.rng.choice(vols)]
        source = pb.VolumeContentSource(volume=pb.VolumeContentSource.VolumeSource(volume_id=src.id))
        return self._copy(source, src.size, src.marker)

    def _restore(self, vols, snaps, groups) -> Call:
        src = self.model.snapshots[self.rng.choice(snaps)]
        source = pb.VolumeContentSource(snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id=src.id))
        return self._copy(source, src.size, src.marker)

    def _snapshot(self, vols, snaps, groups) -> Call:
        name, vol = self._name("s"), self.model.volumes[self.rng.choice(vols)]
        req = pb.CreateSnapshotRequest(name=name, source_volume_id=vol.id)

        def finish(resp) -> str:
            snap = resp.snapshot
            assert snap.ready_to_use and snap.source_volume_id == vol.id and snap.size_bytes == vol.size
            with self.model.lock:
                self.model.snapshots[name] = Snap(snap.snapshot_id, vol.id, vol.size, vol.marker)
            return snap.snapshot_id
        return Call("CreateSnapshot", req, finish, {name})

    def _expand(self, vols, snaps, groups) -> Call:
        name = self.rng.choice(vols)
        vol = self.model.volumes[name]
        new = vol.size + self.rng.choice([1, 4]) * MiB
        req = pb.ControllerExpandVolumeRequest(volume_id=vol.id, capacity_range=pb.CapacityRange(required_bytes=new))

        def finish(resp) -> str:
            assert resp.capacity_bytes == new
            vol.size = new
            return vol.id
        return Call("ControllerExpandVolume", req, finish, set(), (name, vol.size, new))

    def _delete(self, vols, snaps, groups) -> Call:
        name = self.rng.choice(vols)
        req = pb.DeleteVolumeRequest(volume_id=self.model.volumes[name].id)

        def finish(resp) -> str:
            with self.model.lock:
                self.model.volumes.pop(name, None)
            return ""
        return Call("DeleteVolume", req, finish, {name})

    def _delete_snapshot(self, vols, snaps, groups) -> Call:
        name = self.rng.choice(snaps)
        req = pb.DeleteSnapshotRequest(snapshot_id=self.model.snapshots[name].id)

        def finish(resp) -> str:
            with self.model.lock:
                self.model.snapshots.pop(name, None)
            return ""
        return Call("DeleteSnapshot", req, finish, {name})

    def _group(self, vols, snaps, groups) -> Call:
        name = self._name("g")
        members = [self.model.volumes[n] for n in self.rng.sample(vols, min(len(vols), self.rng.choice([2, 3])))]
        req = pb.CreateVolumeGroupSnapshotRequest(name=name, source_volume_ids=[v.id for v in members])
        by_id = {v.id: v for v in members}

        def finish(resp) -> str:
            group = resp.group_snapshot
            assert group.ready_to_use and sorted(s.source_volume_id for s in group.snapshots) == sorted(by_id)
            with self.model.lock:
                for s in group.snapshots:
                    vol = by_id[s.source_volume_id]
                    self.model.snapshots[f"\x1fgroup/{name}-{vol.id}"] = Snap(s.snapshot_id, vol.id, vol.size, vol.marker, name)
                self.model.groups[name] = (group.group_snapshot_id, [f"\x1fgroup/{name}-{i}" for i in by_id])
            return group.group_snapshot_id
        return Call("CreateVolumeGroupSnapshot", req, finish,
                    {name} | {f"\x1fgroup/{name}-{i}" for i in by_id})

    def _delete_group(self, vols, snaps, groups) -> Call:
        name = self.rng.choice(groups)
        group_id, members = self.model.groups[name]
        req = pb.DeleteVolumeGroupSnapshotRequest(group_snapshot_id=group_id)

        def finish(resp) -> str:
            with self.model.lock:
                self.model.groups.pop(name, None)
                for m in members:
                    self.model.snapshots.pop(m, None)
            return ""
        return Call("DeleteVolumeGroupSnapshot", req, finish, {name, *members})

    def run(self, killed: threading.Event) -> None:
        try:
            self._loop(killed)
        except Exception as exc:  # a bug in the test itself must fail the test, not vanish with the thread
            self.error = f"worker {self.prefix}: {exc!r}"

    def _loop(self, killed: threading.Event) -> None:
        while not killed.is_set():
            call = self.plan()
            try:
                resp = call.send(self.driver)
            except grpc.RpcError as exc:
                if killed.is_set() and exc.code() in INTERRUPTED:  # set before the SIGKILL is sent
                    self.interrupted = call
                else:
                    self.error = f"{call.what} {call.request} failed before any kill: {exc.code()} {exc.details()}"
                return
            try:
                call.finish(resp)
            except Exception as exc:  # an assertion on the reply: report it, do not hang the round
                self.error = f"{call.what} {call.request}: {exc!r}"
                return
            self.done += 1


# ---- agreement checks -----------------------------------------------------------------------
def catalog_rows(data_dir: str) -> dict[str, dict[str, sqlite3.Row]]:
    """The catalog as the driver left it, read-only, bypassing the driver."""
    db = sqlite3.connect(f"file:{os.path.join(data_dir, 'catalog.db')}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    try:
        return {table: {r["name"]: r for r in db.execute(f"SELECT * FROM {table}")}
                for table in ("volumes", "snapshots", "group_snapshots")}
    finally:
        db.close()


def listed(driver: DriverProcess) -> tuple[set[str], set[str]]:
    """Volume and snapshot IDs the driver lists, paging 7 at a time."""
    ctl, vols, snaps = driver.controller(), set(), set()
    for method, req_type, into, key in ((ctl.ListVolumes, pb.ListVolumesRequest, vols, "volume"),
                                        (ctl.ListSnapshots, pb.ListSnapshotsRequest, snaps, "snapshot")):
        token = ""
        while True:
            resp = method(req_type(max_entries=7, starting_token=token), timeout=30)
            for e in resp.entries:
                obj = getattr(e, key)
                into.add(obj.volume_id if key == "volume" else obj.snapshot_id)
            token = resp.next_token
            if not token:
                break
    return vols, snaps


def check_agreement(driver: DriverProcess, model: Model, uncertain: set[str],
                    expands: dict[str, tuple[int, int]], where: str) -> None:
    """Catalog == pool == model, except for names a cut-short call may or may not have made."""
    rows = catalog_rows(driver.data_dir)
    for table, by_name in rows.items():
        bad = [(n, r["state"]) for n, r in by_name.items() if r["state"] != READY]
        assert not bad, f"{where}: {table} rows still in flight after repair: {bad}"
    for kind, table in (("volumes", "volumes"), ("snapshots", "snapshots")):
        names = os.listdir(os.path.join(driver.pool_dir, kind))
        assert not [n for n in names if n.startswith(".")], f"{where}: temporaries left in {kind}: {names}"
        files = {n[:-4] for n in names if n.endswith(".img")}
        assert len(files) == len(names), f"{where}: stray files in {kind}: {names}"
        ids = {r["id"]: r for r in rows[table].values()}
        assert files - set(ids) == set(), f"{where}: orphan {kind} files: {files - set(ids)}"
        assert set(ids) - files == set(), f"{where}: {kind} lost their files: {set(ids) - files}"
        for object_id, r in ids.items():
            size = os.stat(os.path.join(driver.pool_dir, kind, object_id + ".img")).st_size
            assert size == r["size"], f"{where}: {kind} {r['name']} file is {size} bytes, catalog says {r['size']}"
    expected = {"volumes": model.volumes, "snapshots": model.snapshots, "group_snapshots": model.groups}
    for table, objects in expected.items():
        missing = set(objects) - set(rows[table]) - uncertain
        extra = set(rows[table]) - set(objects) - uncertain
        assert not missing, f"{where}: {table} acknowledged to a client are lost: {sorted(missing)}"
        assert not extra, f"{where}: {table} nobody was told about (or deleted) are present: {sorted(extra)}"
    for name, vol in model.volumes.items():
        if name in rows["volumes"]:
            r = rows["volumes"][name]
            assert r["id"] == vol.id, f"{where}: volume {name} changed ID"
            allowed = set(expands[name]) if name in expands else {vol.size}
            assert r["size"] in allowed, f"{where}: volume {name} is {r['size']} bytes, expected {allowed}"
            assert read_marker(driver.pool_dir, "volumes", vol.id) == vol.marker, f"{where}: volume {name} lost its bytes"
    for name, snap in model.snapshots.items():
        if name in rows["snapshots"]:
            r = rows["snapshots"][name]
            assert (r["id"], r["volume_id"], r["size"]) == (snap.id, snap.volume_id, snap.size), f"{where}: snapshot {name} differs"
            assert read_marker(driver.pool_dir, "snapshots", snap.id) == snap.marker, f"{where}: snapshot {name} lost its bytes"
    for name, (group_id, _) in model.groups.items():
        if name in rows["group_snapshots"]:
            assert rows["group_snapshots"][name]["id"] == group_id, f"{where}: group {name} changed ID"
    vol_ids, snap_ids = listed(driver)
    assert vol_ids == {r["id"] for r in rows["volumes"].values()}, f"{where}: ListVolumes disagrees with the catalog"
    assert snap_ids == {r["id"] for r in rows["snapshots"].values()}, f"{where}: ListSnapshots disagrees with the catalog"


def retry(driver: DriverProcess, call: Call, where: str) -> None:
    """The interrupted call, sent again twice with the same request: both succeed, same result."""
    try:
        first = call.send(driver)
        object_id = call.finish(first)
        second = call.send(driver)
    except grpc.RpcError as exc:
        raise AssertionError(f"{where}: retried {call.what} {call.request} failed: {exc.code()} {exc.details()}")
    assert call.finish(second) == object_id, f"{where}: retried {call.what} is not idempotent"


# ---- the random kill test -------------------------------------------------------------------
@pytest.fixture(scope="module")
def crash_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    yield root
    for pool in root.glob("*/pool"):  # kill -9 leaves the XFS pool image mounted
        if is_mountpoint(str(pool)):
            run(["umount", str(pool)], timeout=60, check=False)
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("pool_kind", ["reflink", "copy"])
def test_kill9_at_random_points_then_restart_repairs_and_retries_succeed(crash_root, pool_kind):
    seed = int(os.environ.get("PVLUN_CRASH_SEED", random.SystemRandom().randrange(1 << 32)))
    print(f"\ncrash test ({pool_kind} pool) seed {seed}  (re-run: PVLUN_CRASH_SEED={seed})")
    rng = random.Random(f"{seed}-{pool_kind}")
    data_dir = os.path.join(crash_root, pool_kind)
    os.makedirs(data_dir)
    driver = DriverProcess(data_dir, os.path.join(data_dir, "plainpool") if pool_kind == "copy" else None)
    model = Model()
    pending: list[Call] = []
    total_ops = total_interrupted = 0
    try:
        driver.start()
        if pool_kind == "reflink":
            assert is_mountpoint(driver.pool_dir), "expected the XFS reflink pool image on an ext4 data dir"
        for round_no in range(ROUNDS_PER_POOL + 1):
            where = f"seed {seed} {pool_kind} round {round_no}"
            uncertain = set().union(*(c.uncertain for c in pending)) if pending else set()
            expands = {c.expand[0]: c.expand[1:] for c in pending if c.expand}
            check_agreement(driver, model, uncertain, expands, where + " after restart")
            for call in pending:
                retry(driver, call, where)
            check_agreement(driver, model, set(), {}, where + " after retries")
            if round_no == ROUNDS_PER_POOL:
                break
            killed = threading.Event()
            workers = [Worker(f"r{round_no}w{i}", random.Random(rng.random()), driver, model) for i in range(WORKERS)]
            threads = [threading.Thread(target=w.run, args=(killed,)) for w in workers]
            for t in threads:
                t.start()
            delay = rng.uniform(0.05, 0.8)
            time.sleep(delay)
            killed.set()
            driver.kill9()
            for t in threads:
                t.join(60)
            errors = [w.error for w in workers if w.error]
            assert not errors, f"{where}: {errors}"
            pending = [w.interrupted for w in workers if w.interrupted]
            total_ops += sum(w.done for w in workers)
            total_interrupted += len(pending)
            print(f"  round {round_no}: killed after {delay:.3f}s, {sum(w.done for w in workers)} calls done, "
                  f"interrupted: {[c.what for c in pending]}")
            driver.close_channel()
            driver.start()
        print(f"  {total_ops} calls acknowledged, {total_interrupted} cut short and retried; "
              f"start-up repairs: {driver.repair_lines()[1:]}")
        assert total_ops > 0 and total_interrupted > 0
    finally:
        driver.stop()
    if pool_kind == "reflink":
        assert not is_mountpoint(driver.pool_dir), "a clean stop unmounts the pool image"
