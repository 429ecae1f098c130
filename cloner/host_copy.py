"""The `copy` strategy (CDI's host-assisted clone): both volumes attached on one node, the
source read-only, its disk streamed into the target by cloner.sparse_copy (sparse, verified by
checksum). A Filesystem volume holds its disk as disk.img and a Block volume holds it raw, so
this is also how a disk crosses volume modes."""

from __future__ import annotations

import contextlib
import os

from cloner.sparse_copy import copy_sparse
from controlplane.dv_spec import FILESYSTEM_OVERHEAD
from controlplane import kubelet
from controlplane.context import Context
from host.sandbox import UnsafeFile, open_no_follow

DISK_IMG = "disk.img"


class TooSmall(Exception):
    """The target cannot hold the source's disk."""


def _open_disk(attachment: kubelet.Attachment, flags: int, claim: str) -> int:
    """The volume's disk, open: a Block volume's device, or a Filesystem volume's disk.img —
    whatever its owner put there, so never through a link and only a regular file."""
    if attachment.block:
        return open_no_follow(attachment.path, flags, devices=True)
    try:
        return open_no_follow(os.path.join(attachment.path, DISK_IMG), flags)
    except UnsafeFile as exc:
        raise UnsafeFile(exc.errno, f"claim {claim}: {exc}") from None


def _usable_bytes(mount: str) -> int:
    """What a Filesystem volume's disk.img may grow to: its free space less CDI's filesystem
    overhead (5.5 %), whole MiB."""
    size = os.statvfs(mount)
    return int(size.f_bavail * size.f_frsize * 0.945) // (1 << 20) << 20


def host_assisted_copy(ctx: Context, source_claim: str, source_ns: str, target_claim: str, target_ns: str,
                       owner: str, node: str | None = None) -> int:
    """Attach the source read-only and the target on `node`, copy the disk across, detach both.
    The target keeps its own size: a Filesystem target's disk.img fills its usable space. The
    bytes written; TooSmall, ChecksumMismatch or OSError when the copy cannot be used."""
    node = node or ctx.node_id
    src = kubelet.attach(ctx.store, ctx.csi, ctx.data_dir, source_claim, source_ns, node, owner + "/source",
                         readonly=True, access_mode="ReadOnlyMany")
    try:
        dst = kubelet.attach(ctx.store, ctx.csi, ctx.data_dir, target_claim, target_ns, node, owner + "/target")
        try:
            with contextlib.ExitStack() as close:
                source = _open_disk(src, os.O_RDONLY, source_claim)
                close.callback(os.close, source)
                length = os.lseek(source, 0, os.SEEK_END)
                target = _open_disk(dst, os.O_RDWR if dst.block else os.O_RDWR | os.O_CREAT | os.O_TRUNC,
                                    target_claim)
                close.callback(os.close, target)
                usable = None if dst.block else _usable_bytes(dst.path)
                # a Filesystem target's disk.img is the source's size if that is within CDI's filesystem
                # overhead of the room (a clone of the same size); a disk much larger than the room is refused
                room = os.lseek(target, 0, os.SEEK_END) if usable is None else \
                    (max(usable, length) if usable >= length * (1 - FILESYSTEM_OVERHEAD) else usable)
                if room < length:
                    raise TooSmall(f"claim {target_ns}/{target_claim} holds {room} bytes, less than the "
                                   f"{length} of the source's disk")
                if not dst.block:
                    os.ftruncate(target, room)
                return copy_sparse(source, target, length)
        finally:
            kubelet.detach(ctx.store, ctx.csi, dst.volume_id, node, owner + "/target")
    finally:
        kubelet.detach(ctx.store, ctx.csi, src.volume_id, node, owner + "/source")


def grow_disk_image(attachment: kubelet.Attachment) -> int:
    """A Filesystem volume's disk.img grown (never shrunk) to fill its usable space, after the
    volume and its filesystem were expanded; its new size."""
    fd = _open_disk(attachment, os.O_RDWR, attachment.volume_id)
    try:
        size = max(_usable_bytes(attachment.path), os.fstat(fd).st_size)
        os.ftruncate(fd, size)
        return size
    finally:
        os.close(fd)
