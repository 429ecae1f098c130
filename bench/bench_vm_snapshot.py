"""VM snapshots on the reflink pool: how long the guest is paused, against QMP `stop` + `cont`
alone on the same VM, and how long a VirtualMachineSnapshot takes end to end.

1. On one running sequence guest (virt/sequence_guest.py: three disks, the guest writing to
   two of them), whose disks are volumes of a `pvlun serve` (reflink pool): the guest's pause
   of `VmLauncher.quiesced()` around nothing (QMP stop + cont alone) and around the CSI group
   snapshot of its three volumes (what a VM snapshot holds the guest still for), ROUNDS each.
2. Through the daemon, as a user runs it: `pvlun apply` of a VirtualMachineSnapshot of a
   running sequence-guest VM → Succeeded, and the pause the daemon measured (its content's
   annotation), ROUNDS times.

Target from issue 11: the guest pause of a VM snapshot under 100 ms on the reflink pool."""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from csi.proto import csi_pb2 as pb
from controlplane.csi_client import CsiClient, capability
from controlplane.store import SQLiteStore
from controlplane.vm_spec import parse_virtual_machine
from bench.bench_apply import pvlun_cli
from pvlun.local_run import DirectoryServer, start_daemon, stop_daemon
from virt import sequence_guest
from virt.launcher import VmLauncher
from virt.qemu_args import DiskAttachment, Throttle

ROUNDS = 10
DISKS = {"boot": 64 << 20, "a": sequence_guest.DISK_BYTES, "b": sequence_guest.DISK_BYTES}


def _ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:.1f} ms"


def _spread(values: list[float]) -> str:
    return f"min {min(values) * 1000:.1f}, max {max(values) * 1000:.1f} ms over {len(values)}"


def _volumes(csi: CsiClient, images: Path, data_dir: str) -> dict[str, str]:
    """CSI volumes of the daemon filled with the guest's disks; volume name → its LUN file."""
    paths = {}
    for name, size in DISKS.items():
        vol = csi.controller.CreateVolume(pb.CreateVolumeRequest(
            name=f"bench-vmsnap-{name}", capacity_range=pb.CapacityRange(required_bytes=size),
            volume_capabilities=[capability("Block", "ReadWriteOnce")])).volume
        path = os.path.join(data_dir, "pool", "volumes", vol.volume_id + ".img")
        source = {"boot": images / "boot.img", "a": images / "seqa.raw"}.get(name)
        if source is not None:
            subprocess.run(["dd", f"if={source}", f"of={path}", "bs=1M", "conv=notrunc,sparse", "status=none"],
                           check=True)
        paths[name] = path
    return paths


def _pause_rows(csi: CsiClient, paths: dict[str, str], run_dir: Path) -> list[tuple[str, str, str]]:
    volumes = list(DISKS)
    spec = parse_virtual_machine({
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "metadata": {"name": "benchseq"},
        "spec": {"runStrategy": "Always", "template": {"spec": {
            "domain": {"memory": {"guest": "256Mi"}, "devices": {"autoattachPodInterface": False, "disks": [
                {"name": v, "disk": {"bus": "virtio"}, **({"bootOrder": 1} if v == "boot" else {})} for v in volumes]}},
            "volumes": [{"name": v, "persistentVolumeClaim": {"claimName": f"benchseq-{v}"}} for v in volumes]}}}}).template
    disks = {v: DiskAttachment.for_path(paths[v], throttle=Throttle()) for v in volumes}
    launcher = VmLauncher(spec, disks, run_dir)
    launcher.start()
    try:
        if not launcher.wait_for_serial("PVLUN-SEQ-RUNNING", timeout=180):
            raise RuntimeError("the sequence guest never wrote")
        ids = {v: os.path.basename(p)[:-len(".img")] for v, p in paths.items()}
        alone, held, snapshot = [], [], []
        for i in range(ROUNDS):
            with launcher.quiesced():
                pass
            alone.append(launcher.last_pause_seconds)
            with launcher.quiesced():
                began = time.monotonic()
                group = csi.group.CreateVolumeGroupSnapshot(pb.CreateVolumeGroupSnapshotRequest(
                    name=f"bench-vmsnap-{i}", source_volume_ids=list(ids.values()))).group_snapshot
                snapshot.append(time.monotonic() - began)
            held.append(launcher.last_pause_seconds)
            csi.group.DeleteVolumeGroupSnapshot(pb.DeleteVolumeGroupSnapshotRequest(
                group_snapshot_id=group.group_snapshot_id))
            time.sleep(0.1)
    finally:
        launcher.stop(grace=0)
    return [
        ("guest pause: QMP stop + cont alone", _ms(alone), f"median; {_spread(alone)}; same VM as below, "
                                                          f"QEMU {launcher.accel}"),
        ("guest pause: stop + group snapshot of 3 volumes + cont", _ms(held),
         f"median; {_spread(held)}; target < 100 ms on the reflink pool"),
        ("  of which CreateVolumeGroupSnapshot", _ms(snapshot), f"median; {_spread(snapshot)}"),
    ]


def _daemon_rows(data_dir: str, url: str) -> list[tuple[str, str, str]]:
    store = SQLiteStore(os.path.join(data_dir, "catalog.db"))
    pvlun_cli(data_dir, "apply", "-f", "-", input=sequence_guest.vm_manifest("benchvm", url))
    deadline = time.monotonic() + 240
    while True:
        try:
            if "PVLUN-SEQ-RUNNING" in pvlun_cli(data_dir, "logs", "vm/benchvm"):
                break
        except RuntimeError:  # no console output yet
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("the sequence guest VM never wrote")
        time.sleep(0.2)
    took, paused = [], []
    for i in range(ROUNDS):
        name = f"benchsnap-{i}"
        began = time.monotonic()
        pvlun_cli(data_dir, "apply", "-f", "-", input=f"""apiVersion: snapshot.kubevirt.io/v1beta1
kind: VirtualMachineSnapshot
metadata: {{name: {name}}}
spec: {{source: {{apiGroup: kubevirt.io, kind: VirtualMachine, name: benchvm}}}}
""")
        while ((store.get("VirtualMachineSnapshot", name) or {}).get("status") or {}).get("phase") != "Succeeded":
            if time.monotonic() - began > 60:
                raise RuntimeError(f"{name} did not succeed: {store.get('VirtualMachineSnapshot', name)}")
            time.sleep(0.01)
        took.append(time.monotonic() - began)
        status = store.get("VirtualMachineSnapshot", name)["status"]
        content = store.get("VirtualMachineSnapshotContent", status["virtualMachineSnapshotContentName"])
        paused.append(float(content["metadata"]["annotations"]["pvlun.dev/guest-pause-seconds"]))
    pvlun_cli(data_dir, "vm", "stop", "benchvm", "--wait")
    return [
        ("VM snapshot: pvlun apply → Succeeded (3 volumes, guest writing)", _ms(took),
         f"median; {_spread(took)}; the CLI process, the control loop, the quiesce, the group snapshot, "
         "6 records and the VolumeSnapshots' binding"),
        ("  its guest pause (measured by the daemon)", _ms(paused), f"median; {_spread(paused)}; target < 100 ms"),
    ]


def run() -> list[tuple[str, str, str]]:
    work = Path(tempfile.mkdtemp(prefix="pvlun-bench-vmsnap-"))
    data_dir, images = str(work / "data"), work / "images"
    os.makedirs(data_dir)
    images.mkdir()
    sequence_guest.build_boot_disk(images / "boot.img")
    sequence_guest.build_disk_a(images / "seqa.img")
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(images / "seqa.img"), str(images / "seqa.raw")], check=True)
    web = DirectoryServer(str(images))
    serve = start_daemon(data_dir)
    try:
        csi = CsiClient.of_daemon(data_dir)
        try:
            rows = _pause_rows(csi, _volumes(csi, images, data_dir), work / "run")
        finally:
            csi.close()
        rows += _daemon_rows(data_dir, web.url)
    finally:
        stop_daemon(serve, data_dir)
        web.stop()
        shutil.rmtree(work, ignore_errors=True)
    return rows


if __name__ == "__main__":
    for row in run():
        print(" | ".join(row))
