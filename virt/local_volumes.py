"""Volumes that live in the VM's run directory rather than in CSI: cloud-init seeds and emptyDisks.

The control plane attaches dataVolume / persistentVolumeClaim volumes through CSI; this
module makes the rest, so that `local_attachments(vm, run_dir)` plus the CSI-published
paths is the complete `disks` argument of `build_qemu_argv`.
"""

from __future__ import annotations

import os
from pathlib import Path

from virt.cloudinit import build_nocloud_seed
from virt.qemu_args import DiskAttachment
from virt.spec import VmSpec

LOCAL_SOURCES = ("cloudInitNoCloud", "emptyDisk")


def build_empty_disk(path: str | os.PathLike, capacity: int) -> Path:
    """A sparse raw file for an emptyDisk volume (kept across restarts of the same VMI)."""
    path = Path(path)
    if not path.exists():
        with open(path, "wb") as f:
            f.truncate(capacity)
    return path


def local_attachments(vm: VmSpec, run_dir: str | os.PathLike) -> dict[str, DiskAttachment]:
    """Create (if needed) and describe the VM's cloud-init and emptyDisk volumes under run_dir."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    out: dict[str, DiskAttachment] = {}
    for volume in vm.volumes:
        if volume.source == "cloudInitNoCloud":
            path = build_nocloud_seed(run_dir / f"{volume.name}.cidata.iso", vm, volume)
            out[volume.name] = DiskAttachment.for_path(str(path))
        elif volume.source == "emptyDisk":
            path = build_empty_disk(run_dir / f"{volume.name}.empty.img", volume.capacity or 0)
            out[volume.name] = DiskAttachment.for_path(str(path))
    return out
