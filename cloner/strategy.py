"""Clone strategies (see the package docstring)."""

from __future__ import annotations

import contextlib
import os

from controlplane import kubelet
from host.command import run
from controlplane.context import Context
from host.sandbox import UnsafeFile, fd_path, open_no_follow

CSI_CLONE = "csi-clone"
HOST_ASSISTED = "host-assisted"
DISK_IMG = "disk.img"


def choose_strategy(source_pvc: dict, target_volume_mode: str) -> str:
    source_mode = (source_pvc.get("spec") or {}).get("volumeMode") or "Filesystem"
    return CSI_CLONE if source_mode == target_volume_mode else HOST_ASSISTED


def _open_disk(attachment: kubelet.Attachment, flags: int, claim: str) -> int:
    """The volume's disk, open: a Block volume's device, or a Filesystem volume's disk.img —
    whatever its owner put there, so never through a link and only a regular file."""
    if attachment.block:
        return open_no_follow(attachment.path, flags, devices=True)
    try:
        return open_no_follow(os.path.join(attachment.path, DISK_IMG), flags)
    except UnsafeFile as exc:
        raise UnsafeFile(exc.errno, f"claim {claim}: {exc}") from None


def host_assisted_copy(ctx: Context, source_claim: str, source_ns: str, target_claim: str, target_ns: str,
                       owner: str, node: str | None = None) -> None:
    """Attach the source read-only and the target on `node`, convert the disk across, detach both.
    The target keeps its own size: a Filesystem target's disk.img fills the usable space.
    qemu-img (raw to raw: no image metadata is read) gets both disks through this process's
    descriptors, never their paths."""
    node = node or ctx.node_id
    src = kubelet.attach(ctx.store, ctx.csi, ctx.data_dir, source_claim, source_ns, node, owner + "/source",
                         readonly=True, access_mode="ReadOnlyMany")
    try:
        dst = kubelet.attach(ctx.store, ctx.csi, ctx.data_dir, target_claim, target_ns, node, owner + "/target")
        try:
            with contextlib.ExitStack() as close:
                source = _open_disk(src, os.O_RDONLY, source_claim)
                close.callback(os.close, source)
                target = _open_disk(dst, os.O_RDWR if dst.block else os.O_RDWR | os.O_CREAT | os.O_TRUNC,
                                    target_claim)
                close.callback(os.close, target)
                if not dst.block:
                    size = os.statvfs(dst.path)
                    usable = int(size.f_bavail * size.f_frsize * 0.945) // (1 << 20) << 20
                    os.ftruncate(target, max(usable, os.fstat(source).st_size if not src.block else 0))
                run(["qemu-img", "convert", "-W", "-m", "16", "-n", "-f", "raw", "-O", "raw", "-t", "none",
                     fd_path(source), fd_path(target)], timeout=None)
        finally:
            kubelet.detach(ctx.store, ctx.csi, dst.volume_id, node, owner + "/target")
    finally:
        kubelet.detach(ctx.store, ctx.csi, src.volume_id, node, owner + "/source")
