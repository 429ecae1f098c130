"""Volumes that live in the VM's run directory rather than in CSI: cloud-init seeds and emptyDisks.

The control plane attaches dataVolume / persistentVolumeClaim volumes through CSI; this
module makes the rest, so that `local_attachments(vm, run_dir)` plus the CSI-published
paths is the complete `disks` argument of `build_qemu_argv`.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from virt.cloudinit import build_nocloud_seed
from virt.qemu_args import DiskAttachment
from virt.run_dir import create_atomically, prepare_run_dir
from controlplane.vm_spec import SpecError, VmSpec

LOCAL_SOURCES = ("cloudInitNoCloud", "emptyDisk")


def build_empty_disk(path: str | os.PathLike, capacity: int, field: str = "emptyDisk.capacity") -> Path:
    """A sparse raw file of exactly `capacity` bytes for an emptyDisk volume, kept across restarts
    of the same VMI. It must fit the free space where it lives (`field` names the capacity in
    the refusal); it is made whole or not at all, and one of another size (a changed capacity,
    an earlier pvlun's failed start) is made anew: a VM never starts with a disk of the wrong size."""
    path = Path(path)
    try:
        st = os.lstat(path)
        if stat.S_ISREG(st.st_mode) and st.st_size == capacity:
            return path
    except FileNotFoundError:
        pass
    fs = os.statvfs(path.parent)
    free = fs.f_bavail * fs.f_frsize
    if capacity > free:
        raise SpecError(field, f"{capacity} bytes do not fit the {free} bytes free on the node's VM disk space")
    create_atomically(path, lambda fd: os.ftruncate(fd, capacity))
    return path


def local_attachments(vm: VmSpec, run_dir: str | os.PathLike) -> dict[str, DiskAttachment]:
    """Create (if needed) and describe the VM's cloud-init and emptyDisk volumes under run_dir."""
    run_dir = prepare_run_dir(run_dir)
    out: dict[str, DiskAttachment] = {}
    for i, volume in enumerate(vm.volumes):
        if volume.source == "cloudInitNoCloud":
            path = build_nocloud_seed(run_dir / f"{volume.name}.cidata.iso", vm, volume)
            out[volume.name] = DiskAttachment.for_path(str(path))
        elif volume.source == "emptyDisk":
            path = build_empty_disk(run_dir / f"{volume.name}.empty.img", volume.capacity or 0,
                                    f"spec.template.spec.volumes[{i}].emptyDisk.capacity")
            out[volume.name] = DiskAttachment.for_path(str(path))
    return out
