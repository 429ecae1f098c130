"""The volume staged or published at a path, as NodeGetVolumeStats and NodeExpandVolume see
it: which device it is (only the volume's own LUN counts, csi/staging.py's `holds_volume`),
its usage and condition, and growing it — every loop device of the LUN made to see the grown
file, then the filesystem grown, offline when a mounted ext filesystem cannot be."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from csi import attach, filesystems
from csi.errors import CsiError, not_found, shown
from csi.staging import EXT_SLACK, block_node, holds_volume, lun_of
from host.command import CommandError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VolumeAt:
    device: str
    block: bool
    mount_point: str  # "" for block


def volume_at(volume_id: str, path: str, luns: Sequence[str]) -> VolumeAt:
    """The volume staged or published at path; NOT_FOUND unless it is volume_id's."""
    missing = not_found(f"volume {volume_id} is not staged or published at {shown(path)}")
    try:
        st = os.stat(path)
    except OSError:
        raise missing from None
    if stat.S_ISBLK(st.st_mode) and attach.mount_at(path):
        found = VolumeAt(attach.device_of(path) or "", True, "")
    elif stat.S_ISDIR(st.st_mode) and attach.mount_at(path):
        found = VolumeAt(attach.device_of(path) or "", False, path)
    elif stat.S_ISDIR(st.st_mode) and attach.mount_at(block_node(path)):
        found = VolumeAt(attach.device_of(block_node(path)) or "", True, "")  # block staging path
    else:
        raise missing
    if not holds_volume(found.device, luns):
        raise missing
    return found


@dataclass(frozen=True)
class Stats:
    block: bool
    size: int
    usage: filesystems.Usage | None
    problem: str | None  # why the volume is abnormal; None when healthy


def volume_stats(volume_id: str, path: str, luns: Sequence[str]) -> Stats:
    vol = volume_at(volume_id, path, luns)
    problem = attach.lun_gone(vol.device)
    if vol.block:
        return Stats(True, attach.device_size(vol.device), None, problem)
    return Stats(False, 0, filesystems.filesystem_usage(vol.mount_point), problem)


def expand(volume_id: str, path: str, required_bytes: int, limit_bytes: int,
           luns: Sequence[str]) -> int:
    """Make every loop device of the LUN see its grown file, then grow the filesystem."""
    vol = volume_at(volume_id, path, luns)
    lun = lun_of(vol.device, volume_id)
    for loop in attach.loop_devices_for(lun):
        attach.refresh_loop(loop.path)
    size = attach.device_size(vol.device)
    if required_bytes and size < required_bytes:
        raise CsiError(grpc.StatusCode.OUT_OF_RANGE,
                     f"the LUN of {volume_id} is {size} bytes, less than the {required_bytes} required: "
                     "expand it with ControllerExpandVolume first")
    if limit_bytes and size > limit_bytes:
        raise CsiError(grpc.StatusCode.OUT_OF_RANGE,
                     f"the LUN of {volume_id} is {size} bytes, more than the limit of {limit_bytes}")
    if vol.block:
        return size
    fstype = attach.mount_at(vol.mount_point).fstype
    # Grow through a writable mount: the path asked about may be a read-only publish.
    writable = next((m.mount_point for m in attach.mounts_of(vol.device) if not m.read_only), None)
    if writable is None:
        raise CsiError(grpc.StatusCode.FAILED_PRECONDITION,
                     f"the filesystem of {volume_id} is mounted read-only only: it cannot grow")
    if not fstype.startswith("ext"):
        filesystems.grow_filesystem(vol.device, writable, fstype)
    elif filesystems.ext_filesystem_size(vol.device) + EXT_SLACK < size:
        log.info("growing the %s filesystem of %s to %d bytes", fstype, volume_id, size)
        if filesystems.can_grow_mounted_ext():
            filesystems.grow_filesystem(vol.device, writable, fstype)
        else:
            _grow_ext_unmounted(volume_id, vol.device, fstype)
    return size


def _grow_ext_unmounted(volume_id: str, device: str, fstype: str) -> None:
    """Without CAP_SYS_RESOURCE a mounted ext filesystem cannot grow: unmount every mount
    of it here, grow it offline, mount everything back as it was. Refused with
    FAILED_PRECONDITION while anything keeps it busy (open files, another namespace)."""
    table = attach.mounts_of(device)
    base = next((m for m in table if m.root == "/"), None)
    if base is None:
        raise CsiError(grpc.StatusCode.FAILED_PRECONDITION, f"no mount of the whole filesystem of {volume_id}")
    unmounted: list[attach.Mount] = []
    busy = None
    try:
        for m in reversed(table):  # binds first, the filesystem mount last
            try:
                attach.unmount(m.mount_point)
            except CommandError as exc:
                busy = exc.stderr or str(exc)
                break
            unmounted.insert(0, m)
        if busy is None and attach.device_busy(device):
            busy = "it is mounted in another mount namespace"
        if busy is None:
            filesystems.grow_unmounted_ext(device)
    finally:
        _mount_again(device, base, unmounted)
    if busy:
        raise CsiError(grpc.StatusCode.FAILED_PRECONDITION,
                     f"cannot grow the {fstype} filesystem of {volume_id}: growing it while mounted needs "
                     f"CAP_SYS_RESOURCE, which the driver lacks, and it is in use ({busy})")


def _mount_again(device: str, base: attach.Mount, unmounted: list[attach.Mount]) -> None:
    """Restore mounts taken down by _grow_ext_unmounted, in their original order."""
    failures = []
    for m in unmounted:
        per_mount = sorted(m.options & (attach.PER_MOUNT_OPTIONS - {"rw"}))
        try:
            if m.mount_id == base.mount_id:
                fs_options = [o for o in m.super_options if o not in ("rw", "ro", "seclabel")]
                attach.mount(device, m.mount_point, m.fstype, per_mount + fs_options)
            else:
                source = base.mount_point + (m.root if m.root != "/" else "")
                attach.bind_mount(source, m.mount_point, m.read_only, per_mount)
        except CommandError as exc:
            log.error("could not mount %s again at %s: %s", device, m.mount_point, exc)
            failures.append(f"{m.mount_point}: {exc}")
    if failures:
        raise CsiError(grpc.StatusCode.INTERNAL, "mounting again after growing failed: " + "; ".join(failures))
