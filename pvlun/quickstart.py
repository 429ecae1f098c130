"""`make quickstart`: the main job on the embedded default, step by step, on a temporary
instance — a volume written through a node publish, snapshotted, cloned, expanded and
checked; a disk image imported through a DataVolume; a VM booted from it and live-migrated;
a golden image cloned for two VMs, one snapshotted, changed and restored."""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.table import Table

from csi.proto import csi_pb2 as pb
from controlplane.csi_client import CsiClient, capability
from pvlun.local_run import DirectoryServer, start_daemon, stop_daemon

MiB = 1 << 20
console = Console(stderr=False)


class Steps:
    def __init__(self) -> None:
        self.rows: list[tuple[str, float, str]] = []

    def run(self, name: str, fn: Callable[[], str | None]) -> None:
        start = time.monotonic()
        result = fn() or "ok"
        elapsed = time.monotonic() - start
        self.rows.append((name, elapsed, result))
        console.print(f"[green]✓[/green] {name} [dim]({elapsed * 1000:.0f} ms)[/dim] {result}")

    def table(self) -> Table:
        table = Table(title="pvlun quickstart")
        table.add_column("step")
        table.add_column("time", justify="right")
        table.add_column("result")
        for name, elapsed, result in self.rows:
            table.add_row(name, f"{elapsed * 1000:.0f} ms", result)
        return table


@contextmanager
def serve(data_dir: str) -> Iterator[subprocess.Popen]:
    proc = start_daemon(data_dir, "--nodes", "2", pool_size="16Gi")
    try:
        yield proc
    finally:
        stop_daemon(proc, data_dir)


@contextmanager
def http_server(directory: str) -> Iterator[str]:
    server = DirectoryServer(directory)
    try:
        yield server.url
    finally:
        server.stop()


def csi_steps(steps: Steps, csi: CsiClient, work: str) -> None:
    node_id = csi.node_ids[0]
    cap = capability("Block", "ReadWriteOnce")
    node = csi.node(node_id)
    pattern = os.urandom(4 * MiB)
    state: dict[str, str] = {}

    def create() -> str:
        vol = csi.controller.CreateVolume(pb.CreateVolumeRequest(
            name="quickstart-vol", capacity_range=pb.CapacityRange(required_bytes=1 << 30), volume_capabilities=[cap]))
        state["vol"] = vol.volume.volume_id
        return f"{vol.volume.volume_id} ({vol.volume.capacity_bytes >> 20} MiB)"

    def attach(volume_id: str, name: str) -> str:
        ctx = csi.controller.ControllerPublishVolume(pb.ControllerPublishVolumeRequest(
            volume_id=volume_id, node_id=node_id, volume_capability=cap)).publish_context
        staging = os.path.join(work, "staging", name)
        target = os.path.join(work, "publish", name)
        os.makedirs(staging, exist_ok=True)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        node.NodeStageVolume(pb.NodeStageVolumeRequest(volume_id=volume_id, publish_context=ctx,
                                                       staging_target_path=staging, volume_capability=cap))
        node.NodePublishVolume(pb.NodePublishVolumeRequest(volume_id=volume_id, publish_context=ctx,
                                                           staging_target_path=staging, target_path=target,
                                                           volume_capability=cap))
        return target

    def detach(volume_id: str, name: str) -> None:
        node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=volume_id,
                                                               target_path=os.path.join(work, "publish", name)))
        node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(volume_id=volume_id,
                                                           staging_target_path=os.path.join(work, "staging", name)))
        csi.controller.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(volume_id=volume_id, node_id=node_id))

    def write() -> str:
        device = attach(state["vol"], "vol")
        with open(device, "r+b") as f:
            f.seek(16 * MiB)
            f.write(pattern)
            f.flush()
            os.fsync(f.fileno())
        detach(state["vol"], "vol")
        return f"4 MiB at offset 16 MiB through {device}"

    def snapshot() -> str:
        snap = csi.controller.CreateSnapshot(pb.CreateSnapshotRequest(name="quickstart-snap", source_volume_id=state["vol"]))
        state["snap"] = snap.snapshot.snapshot_id
        return state["snap"]

    def copy_of(name: str, source: pb.VolumeContentSource) -> Callable[[], str]:
        def create() -> str:
            vol = csi.controller.CreateVolume(pb.CreateVolumeRequest(
                name=f"quickstart-{name}", volume_capabilities=[cap], volume_content_source=source,
                capacity_range=pb.CapacityRange(required_bytes=1 << 30)))
            state[name] = vol.volume.volume_id
            return state[name]
        return create

    def expand() -> str:
        rsp = csi.controller.ControllerExpandVolume(pb.ControllerExpandVolumeRequest(
            volume_id=state["clone"], capacity_range=pb.CapacityRange(required_bytes=2 << 30), volume_capability=cap))
        return f"clone now {rsp.capacity_bytes >> 20} MiB"

    def check() -> str:
        for name in ("restore", "clone"):
            device = attach(state[name], name)
            with open(device, "rb") as f:
                f.seek(16 * MiB)
                same = f.read(len(pattern)) == pattern
                size = f.seek(0, os.SEEK_END)
            detach(state[name], name)
            if not same:
                raise RuntimeError(f"the {name} does not hold the bytes written")
        return f"restore and clone hold the 4 MiB written; clone device {size >> 20} MiB"

    steps.run("CreateVolume (1 GiB, block)", create)
    steps.run("write through NodePublish", write)
    steps.run("CreateSnapshot", snapshot)
    steps.run("CreateVolume from snapshot", lambda: copy_of("restore", pb.VolumeContentSource(
        snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id=state["snap"])))())
    steps.run("CreateVolume clone", lambda: copy_of("clone", pb.VolumeContentSource(
        volume=pb.VolumeContentSource.VolumeSource(volume_id=state["vol"])))())
    steps.run("ControllerExpandVolume to 2 GiB", expand)
    steps.run("check data in restore and clone", check)


def import_steps(steps: Steps, data_dir: str, work: str) -> None:
    images = os.path.join(work, "images")
    os.makedirs(images)
    image = os.path.join(images, "disk.qcow2")
    raw = os.path.join(work, "disk.raw")

    def make_image() -> str:
        with open(raw, "wb") as f:
            f.truncate(64 * MiB)
            f.seek(MiB)
            f.write(b"PVLUN-QUICKSTART".ljust(512, b"."))
            f.seek(32 * MiB)
            f.write(os.urandom(8 * MiB))
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, image], check=True)
        return f"qcow2, 64 MiB virtual, {os.path.getsize(image) >> 20} MiB file"

    steps.run("generate a qcow2 disk image", make_image)
    with http_server(images) as url:
        manifest = f"""apiVersion: cdi.kubevirt.io/v1beta1
kind: DataVolume
metadata:
  name: quickstart-disk
spec:
  source:
    http:
      url: {url}/disk.qcow2
  storage:
    volumeMode: Block
    resources:
      requests:
        storage: 128Mi
"""
        path = os.path.join(work, "dv.yaml")
        with open(path, "w") as f:
            f.write(manifest)

        def apply() -> str:
            subprocess.run([sys.executable, "-m", "pvlun.cli", "apply", "-f", path, "--wait", "--timeout", "300",
                            "--data-dir", data_dir], check=True)
            return "DataVolume quickstart-disk Succeeded"

        steps.run("pvlun apply --wait (http qcow2 DataVolume)", apply)

    def verify() -> str:
        from controlplane.store import SQLiteStore

        store = SQLiteStore(os.path.join(data_dir, "catalog.db"))
        pvc = store.get("PersistentVolumeClaim", "quickstart-disk", "default")
        pv = store.get("PersistentVolume", pvc["spec"]["volumeName"])
        lun = os.path.join(data_dir, "pool", "volumes", pv["spec"]["csi"]["volumeHandle"] + ".img")
        with open(raw, "rb") as a, open(lun, "rb") as b:
            want = hashlib.sha256(a.read()).hexdigest()
            got = hashlib.sha256(b.read(64 * MiB)).hexdigest()
        if want != got:
            raise RuntimeError("the imported volume differs from the source image")
        return f"sha256 {got[:16]}… matches; LUN allocates {os.stat(lun).st_blocks * 512 >> 20} MiB"

    steps.run("verify the imported bytes", verify)




def wait_for(predicate: Callable[[], object], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.1)


def vm_steps(steps: Steps, data_dir: str, work: str) -> None:
    """Import a tiny boot disk, boot it, live-migrate it while it ticks; then a golden image
    cloned for two VMs, one snapshotted, changed and restored (quickstart_snapshots)."""
    from pvlun.quickstart_snapshots import snapshot_steps
    from virt.guest_images import build_tick_disk, tick_vm_manifest

    images = os.path.join(work, "vm-images")
    os.makedirs(images)
    build_tick_disk(os.path.join(images, "tick.raw"), marker="PVLUN-BOOT")

    def cli(*args: str, input: str | None = None) -> str:
        out = subprocess.run([sys.executable, "-m", "pvlun.cli", *args, "--data-dir", data_dir], input=input,
                             capture_output=True, text=True, timeout=300)
        if out.returncode != 0:
            raise RuntimeError(f"pvlun {' '.join(args)}: {out.stderr.strip()}")
        return out.stdout

    def serial() -> str:
        return cli("logs", "vm/quickstart-vm")

    with http_server(images) as url:
        steps.run("pvlun apply --wait (VM + DataVolume template)",
                  lambda: cli("apply", "-f", "-", "--wait", "--timeout", "300",
                              input=tick_vm_manifest("quickstart-vm", f"{url}/tick.raw"))
                  .strip().splitlines()[-1])

    def marker() -> str:
        wait_for(lambda: "PVLUN-BOOT" in serial(), "the guest's boot marker")
        wait_for(lambda: "tick 3" in serial(), "the guest ticking")
        return "guest printed PVLUN-BOOT and ticks on the serial console"

    steps.run("guest boot marker", marker)
    steps.run("live migration to the second node",
              lambda: cli("vm", "migrate", "quickstart-vm", "--wait").strip().splitlines()[-1])

    def still_ticking() -> str:
        before = serial().count("tick")
        wait_for(lambda: serial().count("tick") >= before + 3, "ticks on the target")
        log = serial()
        if log.count("PVLUN-BOOT") != 1:  # the history holds the one boot before the migration
            raise RuntimeError("the guest rebooted on the target")
        last = [line for line in log.splitlines() if line.startswith("tick")][-1]
        return f"no reboot; still ticking on the target ({last})"

    steps.run("guest still running on the target", still_ticking)
    steps.run("pvlun vm stop", lambda: cli("vm", "stop", "quickstart-vm", "--wait").strip().splitlines()[-1])
    with http_server(images) as url:
        snapshot_steps(steps, data_dir, url, cli, wait_for)


def main(args: argparse.Namespace | None = None) -> int:
    work = os.path.realpath(tempfile.mkdtemp(prefix="pvlun-quickstart-"))  # node paths may hold no link
    data_dir = os.path.join(work, "data")
    os.makedirs(data_dir)
    steps = Steps()
    ok = False
    try:
        started = time.monotonic()
        with serve(data_dir):
            steps.rows.append(("start pvlun serve (embedded, 2 nodes)", time.monotonic() - started, data_dir))
            host = socket.gethostname()  # serve's default node id
            csi = CsiClient(data_dir, [host, f"{host}-2"])
            csi_steps(steps, csi, work)
            import_steps(steps, data_dir, work)
            vm_steps(steps, data_dir, work)
            ok = True
    except Exception as exc:
        console.print(f"[red]quickstart failed:[/red] {exc}")
    finally:
        console.print(steps.table())
        if ok:
            shutil.rmtree(work, ignore_errors=True)
        else:
            console.print(f"kept {work} for inspection (serve.log is in data/)")
    return 0 if ok else 1
