"""Filesystems on LUN devices: probe, make (only on a blank device), grow, measure.

Every tool runs through `host.command.run`; a failure carries the tool's stderr.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from host.command import CommandError, output, run

SUPPORTED_FILESYSTEMS = ("ext4", "ext3", "ext2", "xfs", "btrfs")
DEFAULT_FILESYSTEM = "ext4"

# Fast mkfs: no discard pass over a fresh sparse LUN, ext4 inode tables zeroed lazily.
# Always 4 KiB blocks/sectors: a loop device's logical sector size follows the LUN file's
# direct-I/O alignment, 512 for a fresh file but 4096 once XFS has reflinked it (snapshot,
# clone, restore); a filesystem made with 1 KiB blocks (mke2fs's choice below 512 MiB) or
# 512-byte XFS sectors could not be mounted again after that.
_MKFS = {
    "ext4": ["mkfs.ext4", "-q", "-b", "4096", "-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard"],
    "ext3": ["mkfs.ext3", "-q", "-b", "4096", "-E", "lazy_itable_init=1,nodiscard"],
    "ext2": ["mkfs.ext2", "-q", "-b", "4096", "-E", "lazy_itable_init=1,nodiscard"],
    "xfs": ["mkfs.xfs", "-q", "-K", "-s", "size=4096"],
    "btrfs": ["mkfs.btrfs", "-q", "--nodiscard"],
}


class DeviceNotBlank(Exception):
    """The device holds something that is not a filesystem (a partition table, ...)."""


def filesystem_type(device: str) -> str | None:
    """The filesystem on the device, None if the device is blank. Raises DeviceNotBlank
    when it holds anything else: such a device must never be formatted."""
    proc = run(["blkid", "--probe", "--output", "export", device], check=False)
    if proc.returncode == 2:
        return None  # nothing found
    if proc.returncode != 0:
        raise CommandError(["blkid"], proc.returncode, proc.stderr.decode(errors="replace"))
    info = dict(line.split("=", 1) for line in proc.stdout.decode().splitlines() if "=" in line)
    if info.get("TYPE") and info.get("USAGE", "filesystem") == "filesystem":
        return info["TYPE"]
    what = info.get("TYPE") or info.get("PTTYPE") or "unknown data"
    raise DeviceNotBlank(f"{device} holds {what}, not a filesystem; refusing to format it")


def make_filesystem(device: str, fstype: str) -> None:
    """Format a blank device. The mkfs tools run without force flags, so they too refuse
    a device that turns out to hold a filesystem."""
    run(_MKFS[fstype] + [device], timeout=300)


_CAP_SYS_RESOURCE = 24


def can_grow_mounted_ext() -> bool:
    """Online ext2/3/4 growth (EXT4_IOC_RESIZE_FS) needs CAP_SYS_RESOURCE, which some
    containers drop; offline growth at staging time does not."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> _CAP_SYS_RESOURCE & 1)
    return False


def ext_filesystem_size(device: str) -> int:
    """Bytes covered by the ext2/3/4 filesystem on an (unmounted) device."""
    fields = {}
    for line in output(["dumpe2fs", "-h", device], timeout=60).splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return int(fields["Block count"]) * int(fields["Block size"])


def grow_unmounted_ext(device: str) -> None:
    """Grow an unmounted ext2/3/4 filesystem to its device: resize2fs insists on a
    fresh forced check first (e2fsck -p exits 1 or 2 after fixing harmless things)."""
    proc = run(["e2fsck", "-f", "-p", device], timeout=1800, check=False)
    if proc.returncode not in (0, 1, 2):
        raise CommandError(["e2fsck"], proc.returncode, (proc.stderr + proc.stdout).decode(errors="replace"))
    run(["resize2fs", device], timeout=1800)


def grow_filesystem(device: str, mount_point: str, fstype: str) -> None:
    """Grow a mounted filesystem to fill its (already refreshed) device."""
    if fstype.startswith("ext"):
        run(["resize2fs", device], timeout=600)
    elif fstype == "xfs":
        run(["xfs_growfs", mount_point], timeout=600)
    elif fstype == "btrfs":
        run(["btrfs", "filesystem", "resize", "max", mount_point], timeout=600)
    else:
        raise ValueError(f"cannot grow a {fstype} filesystem")


@dataclass(frozen=True)
class Usage:
    total_bytes: int
    available_bytes: int
    used_bytes: int
    total_inodes: int
    available_inodes: int
    used_inodes: int


def filesystem_usage(path: str) -> Usage:
    s = os.statvfs(path)
    return Usage(
        total_bytes=s.f_blocks * s.f_frsize,
        available_bytes=s.f_bavail * s.f_frsize,
        used_bytes=(s.f_blocks - s.f_bfree) * s.f_frsize,
        total_inodes=s.f_files,
        available_inodes=s.f_favail,
        used_inodes=s.f_files - s.f_ffree,
    )
