"""A crowd through the embedded control plane, as a user makes one: `pvlun apply -f FILE
--wait` of 100 and of 1,000 blank DataVolumes (1 MiB, Block) on `pvlun serve --nodes 2`
with its default attach limit. Reference, measured in the same run on the same daemon:
the same number of CreateVolume calls straight over gRPC (what the provisioner must do
at least; the rest is claims, attach, blank fill, detach and status)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time

from csi.proto import csi_pb2 as pb
from controlplane.csi_client import CsiClient, capability
from pvlun.local_run import start_daemon, stop_daemon

Row = tuple[str, str, str]
COUNTS = (100, 1000)


def manifest(count: int, prefix: str) -> str:
    return "".join(f"""---
apiVersion: cdi.kubevirt.io/v1beta1
kind: DataVolume
metadata: {{name: {prefix}-{i}}}
spec:
  source: {{blank: {{}}}}
  storage: {{volumeMode: Block, resources: {{requests: {{storage: 1Mi}}}}}}
""" for i in range(count))


def apply_wait(data_dir: str, count: int) -> float:
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "pvlun.cli", "apply", "-f", "-", "--wait", "--timeout", "1200",
                          "--data-dir", data_dir], input=manifest(count, f"crowd{count}"),
                         capture_output=True, text=True, timeout=1500)
    if out.returncode != 0:
        raise RuntimeError(f"apply of {count} DataVolumes failed: {out.stderr.strip()[-500:]}")
    return time.monotonic() - started


def create_volumes(data_dir: str, count: int) -> float:
    """`count` CreateVolume calls in a row over the daemon's socket (then deleted, untimed)."""
    client = CsiClient(data_dir, [])
    made = []
    try:
        started = time.monotonic()
        for i in range(count):
            made.append(client.controller.CreateVolume(pb.CreateVolumeRequest(
                name=f"reference-{count}-{i}", capacity_range=pb.CapacityRange(required_bytes=1 << 20),
                volume_capabilities=[capability("Block", "ReadWriteOnce")])).volume.volume_id)
        elapsed = time.monotonic() - started
        for volume_id in made:
            client.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume_id))
        return elapsed
    finally:
        client.close()


def run() -> list[Row]:
    work = tempfile.mkdtemp(prefix="pvlun-bench-crowd-")
    serve = start_daemon(work, "--nodes", "2")
    rows: list[Row] = []
    try:
        for count in COUNTS:
            took = apply_wait(work, count)
            reference = create_volumes(work, count)
            rows.append((f"pvlun apply --wait, {count:,} blank DataVolumes", f"{took:.1f} s",
                         f"{count / took:.0f}/s; {took / reference:.1f}x {count:,} CreateVolume calls straight over "
                         f"gRPC ({reference:.1f} s, same daemon, same run); 2 nodes, 256 attach slots each"))
    finally:
        stop_daemon(serve, work)
        shutil.rmtree(work, ignore_errors=True)
    return rows
