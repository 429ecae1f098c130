"""Stage and publish volumes on this host, deriving the state from the system (their stats
and growth: csi/node_volume.py).

Layout (see notes/PLAN.md):
- block staging: the LUN's loop device bind-mounted onto the file STAGING/lun;
  publish binds STAGING/lun onto the target file (read-only publish: a separate
  read-only loop device, since a ro bind mount does not stop writes to a device node);
- mount staging: the loop device (mkfs'd when blank) mounted on STAGING; publish binds
  STAGING onto the target directory (remounted ro when read-only); both nosuid,nodev
  unless the capability's mount flags ask suid/dev.
Paths are made and mounted onto without following links (csi/node_paths.py).
Every function is idempotent: it looks at what is already there before acting.
Callers serialise calls per volume.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Sequence

import grpc

from csi import attach, filesystems, node_paths
from csi.errors import CsiError, not_found, shown
from csi.validation_node import Access

log = logging.getLogger(__name__)

BLOCK_NODE = "lun"  # the file under STAGING that a block volume's device is bound onto
EXT_SLACK = 4 << 20


def _error(code: grpc.StatusCode, message: str) -> CsiError:
    return CsiError(code, message)


def block_node(staging: str) -> str:
    return os.path.join(staging, BLOCK_NODE)


def holds_volume(device: str | None, luns: Sequence[str]) -> bool:
    """Is this device the volume's LUN: a loop device whose backing file is one of `luns`
    (the volume's LUN file in each pool volumes dir, real paths)? Anything else - another
    block device, a tmpfs or overlay (no device), a loop device on any other file - is not
    ours and must never be unmounted, reported on or grown."""
    if not device or not luns or not attach.is_loop(device):
        return False
    backing = attach.loop_backing_file(device)
    if backing is None:
        return False
    if backing in luns:
        return True
    path, deleted = attach.deleted_backing(backing)
    if deleted and not os.path.lexists(backing):
        return path in luns  # the LUN was deleted while attached
    return any(attach.backing_file_is(device, lun) for lun in luns)  # same inode, another name


def _release(device: str | None) -> None:
    """Detach a loop device once nothing mounts it any more."""
    if (device and attach.is_loop(device) and attach.loop_backing_file(device) is not None
            and not attach.device_in_use(device)):
        log.info("detaching %s", device)
        attach.detach_loop(device)


def staged(staging: str) -> tuple[str | None, bool] | None:
    """(device, is_block) of what is staged at `staging`, None when nothing is."""
    node = block_node(staging)
    if attach.mount_at(node):
        return attach.device_of(node), True
    if attach.mount_at(staging):
        return attach.device_of(staging), False
    return None


# ---------------------------------------------------------------- stage / unstage


def stage(volume_id: str, lun: str, staging: str, access: Access) -> None:
    if os.path.islink(lun):
        raise _error(grpc.StatusCode.INVALID_ARGUMENT, f"the LUN of volume {volume_id} is a symbolic link, not a file")
    if not os.path.isfile(lun):
        raise not_found(f"volume {volume_id}: its LUN is missing from the pool")
    node_paths.make_dirs(staging)
    current = staged(staging)
    if current is not None:
        _check_staged_matches(volume_id, lun, staging, current, access)
        return
    device = attach.find_or_attach_loop(lun)
    try:
        if access.block:
            node = block_node(staging)
            if not os.path.lexists(node):
                node_paths.create_file(node)
            attach.bind_mount(device, node)
        else:
            _mount_filesystem(device, staging, access)
    except BaseException:
        if access.block and not attach.mount_at(block_node(staging)):
            _remove(block_node(staging))
        _release(device)
        raise
    log.info("staged %s (%s) at %s", volume_id, device, staging)


def _check_staged_matches(volume_id: str, lun: str, staging: str,
                          current: tuple[str | None, bool], access: Access) -> None:
    device, block = current
    conflict = grpc.StatusCode.ALREADY_EXISTS
    if block != access.block:
        have = "block" if block else "mount"
        raise _error(conflict, f"{shown(staging)} already stages a volume with {have} access")
    if device is None or not attach.backing_file_is(device, lun):
        raise _error(conflict, f"{shown(staging)} already stages another volume, not {volume_id}")
    if not block:
        fstype = attach.mount_at(staging).fstype
        if access.fs_type and fstype != access.fs_type:
            raise _error(conflict, f"{volume_id} is staged at {shown(staging)} as {fstype}, not {access.fs_type}")


def hardened(flags: tuple[str, ...]) -> list[str]:
    """The mount options of a filesystem volume: nosuid,nodev unless its StorageClass asks
    for suid or dev (mountOptions) - a file system a workload filled must not give it
    set-user-ID programs or device nodes on the host. Block volumes are device nodes
    themselves: never nodev."""
    options = list(flags)
    if "suid" not in options and "nosuid" not in options:
        options.append("nosuid")
    if "dev" not in options and "nodev" not in options:
        options.append("nodev")
    return options


def _mount_filesystem(device: str, staging: str, access: Access) -> None:
    read_only = access.read_only_mode or "ro" in access.mount_flags
    fstype = filesystems.filesystem_type(device)
    if fstype is None:
        if read_only:
            raise _error(grpc.StatusCode.FAILED_PRECONDITION,
                         "the volume is blank and the access mode is read-only: nothing to mount")
        fstype = access.fs_type or filesystems.DEFAULT_FILESYSTEM
        log.info("formatting %s as %s", device, fstype)
        filesystems.make_filesystem(device, fstype)
    elif access.fs_type and fstype != access.fs_type:
        raise _error(grpc.StatusCode.FAILED_PRECONDITION,
                     f"the volume holds a {fstype} filesystem, not the requested {access.fs_type}")
    elif fstype.startswith("ext") and not read_only and not attach.device_busy(device):
        # The LUN grew while it was not staged (offline expansion): grow the filesystem now,
        # before mounting, which needs no CAP_SYS_RESOURCE. A leftover too small for a
        # block group is never used by resize2fs, hence the slack.
        if filesystems.ext_filesystem_size(device) + EXT_SLACK < attach.device_size(device):
            log.info("growing the %s filesystem of %s offline", fstype, device)
            filesystems.grow_unmounted_ext(device)
    options = hardened(access.mount_flags)
    if read_only and "ro" not in options:
        options.append("ro")
    if fstype == "xfs" and "nouuid" not in options:
        options.append("nouuid")  # clones and snapshots share the origin's XFS UUID
    attach.mount(device, staging, fstype, options)
    if fstype in ("xfs", "btrfs") and not read_only:
        filesystems.grow_filesystem(device, staging, fstype)  # a no-op unless the LUN grew meanwhile


def unstage(volume_id: str, staging: str, luns: Sequence[str]) -> None:
    """Unmount what stages volume_id at `staging` (only mounts of its own LUN's loop device)
    and detach the device. Something else mounted there: NOT_FOUND, and nothing is touched."""
    node = block_node(staging)
    devices: list[str] = []
    ours = True
    for path in (node, staging):
        ours = _unmount_ours(volume_id, path, luns, devices)
        if path == node and devices:
            _remove(node)
        if not ours:
            break
    if not devices and ours and _is_empty_file(node):
        _remove(node)  # left by a stage interrupted before its bind mount
    for device in dict.fromkeys(devices):
        _release(device)
    if not devices and not ours:
        raise not_found(f"{shown(staging)} holds something else, not volume {volume_id}: left alone")


def _unmount_ours(volume_id: str, path: str, luns: Sequence[str], devices: list[str]) -> bool:
    """Unmount the mounts stacked at `path` while they are volume_id's (appending their
    devices); False when a mount there is not ours (left mounted)."""
    while attach.mount_at(path):
        device = attach.device_of(path)
        if device is None or not holds_volume(device, luns):
            log.warning("not unmounting %s: it is not volume %s (device %s)", path, volume_id, device)
            return False
        attach.unmount(path)
        devices.append(device)
    return True


def _is_empty_file(path: str) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_size == 0


def _is_empty_dir(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode) and not os.listdir(path)
    except OSError:
        return False


def _remove(path: str) -> None:
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            os.rmdir(path)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exc.errno != errno.ENOTEMPTY:
            raise
        log.warning("not removing %s: not empty", path)


# ---------------------------------------------------------------- publish / unpublish


def publish(volume_id: str, staging: str, target: str, access: Access, read_only: bool,
            luns: Sequence[str]) -> None:
    current = staged(staging)
    if current is None:
        raise _error(grpc.StatusCode.FAILED_PRECONDITION, f"volume {volume_id} is not staged at {shown(staging)}")
    device, block = current
    if block != access.block:
        have = "block" if block else "mount"
        raise _error(grpc.StatusCode.FAILED_PRECONDITION, f"{volume_id} is staged for {have} access at {shown(staging)}")
    if not holds_volume(device, luns):
        raise _error(grpc.StatusCode.FAILED_PRECONDITION, f"{shown(staging)} stages another volume, not {volume_id}")
    if attach.mount_at(target):
        _check_published_matches(volume_id, device, target, access, read_only)
        return
    created = _make_target(target, access.block)
    ro_device = None
    try:
        if not access.block:
            attach.bind_mount(staging, target, read_only, hardened(access.mount_flags))
        elif read_only:
            ro_device = attach.find_or_attach_loop(lun_of(device, volume_id), read_only=True)
            attach.bind_mount(ro_device, target, read_only=True)
        else:
            attach.bind_mount(block_node(staging), target)
    except BaseException:
        if created and not attach.mount_at(target):
            _remove(target)
        _release(ro_device)
        raise
    log.info("published %s at %s%s", volume_id, target, " (read-only)" if read_only else "")


def lun_of(device: str, volume_id: str) -> str:
    problem = attach.lun_gone(device)
    backing = attach.loop_backing_file(device)
    if problem or backing is None:
        raise _error(grpc.StatusCode.FAILED_PRECONDITION, problem or f"{device} of {volume_id} is not a loop device")
    return backing


def _make_target(target: str, block: bool) -> bool:
    """Create the target (a file for block, a directory for mount) if missing; kubelet
    creates it for mount volumes, csi-sanity leaves it to the driver."""
    if os.path.lexists(target):
        st = os.lstat(target)
        want_dir = not block
        if stat.S_ISDIR(st.st_mode) != want_dir or stat.S_ISLNK(st.st_mode):
            what = "a regular file" if block else "a directory"
            raise _error(grpc.StatusCode.FAILED_PRECONDITION, f"target_path {shown(target)} exists and is not {what}")
        return False
    if block:
        node_paths.create_file(target)
    else:
        node_paths.make_dirs(target)
    return True


def _check_published_matches(volume_id: str, staged_device: str, target: str,
                             access: Access, read_only: bool) -> None:
    conflict = grpc.StatusCode.ALREADY_EXISTS
    device = attach.device_of(target)
    if device is None:
        raise _error(conflict, f"something else is mounted at {shown(target)}")
    block = stat.S_ISBLK(os.stat(target).st_mode)
    if block != access.block:
        have = "block" if block else "mount"
        raise _error(conflict, f"{volume_id} is already published at {shown(target)} with {have} access")
    if block:
        same = device == staged_device or attach.backing_file_is(device, lun_of(staged_device, volume_id))
        published_ro = attach.device_read_only(device)
    else:
        same = device == staged_device
        published_ro = attach.mount_at(target).read_only
    if not same:
        raise _error(conflict, f"{shown(target)} already holds another volume, not {volume_id}")
    if published_ro != read_only:
        have = "read-only" if published_ro else "read-write"
        raise _error(conflict, f"{volume_id} is already published {have} at {shown(target)}")


def unpublish(volume_id: str, target: str, luns: Sequence[str]) -> None:
    """Unmount volume_id's publish at target (only binds of its own LUN's loop device or of
    its staging mount) and delete the target, as the spec asks. Something else mounted
    there: NOT_FOUND, and nothing is touched. Nothing mounted: only an empty directory or
    empty file (what a publish creates) is removed."""
    devices: list[str] = []
    ours = _unmount_ours(volume_id, target, luns, devices)
    if ours and (devices or _is_empty_dir(target) or _is_empty_file(target)):
        _remove(target)  # the spec: the SP deletes the file or directory at target_path
    for device in dict.fromkeys(devices):
        _release(device)  # frees a read-only publish's own loop device; staged ones stay in use
    if not devices and not ours:
        raise not_found(f"{shown(target)} holds something else, not volume {volume_id}: left alone")
