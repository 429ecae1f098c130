"""Clone strategies (see the package docstring)."""

from __future__ import annotations

import os

from pvlun import kubelet
from pvlun.command import run
from pvlun.context import Context

CSI_CLONE = "csi-clone"
HOST_ASSISTED = "host-assisted"
DISK_IMG = "disk.img"


def choose_strategy(source_pvc: dict, target_volume_mode: str) -> str:
    source_mode = (source_pvc.get("spec") or {}).get("volumeMode") or "Filesystem"
    return CSI_CLONE if source_mode == target_volume_mode else HOST_ASSISTED


def _disk(attachment: kubelet.Attachment) -> str:
    return attachment.path if attachment.block else os.path.join(attachment.path, DISK_IMG)


def host_assisted_copy(ctx: Context, source_claim: str, source_ns: str, target_claim: str, target_ns: str,
                       owner: str, node: str | None = None) -> None:
    """Attach the source read-only and the target on `node`, convert the disk across, detach both.
    The target keeps its own size: a Filesystem target's disk.img fills the usable space."""
    node = node or ctx.node_id
    src = kubelet.attach(ctx.store, ctx.csi, ctx.data_dir, source_claim, source_ns, node, owner + "/source",
                         readonly=True, access_mode="ReadOnlyMany")
    try:
        dst = kubelet.attach(ctx.store, ctx.csi, ctx.data_dir, target_claim, target_ns, node, owner + "/target")
        try:
            source_disk, target_disk = _disk(src), _disk(dst)
            if not dst.block:
                size = os.statvfs(dst.path)
                usable = int(size.f_bavail * size.f_frsize * 0.945) // (1 << 20) << 20
                with open(target_disk, "wb") as f:
                    f.truncate(max(usable, os.path.getsize(source_disk) if not src.block else 0))
            run(["qemu-img", "convert", "-W", "-m", "16", "-n", "-f", "raw", "-O", "raw", "-t", "none",
                 source_disk, target_disk], timeout=None)
        finally:
            kubelet.detach(ctx.store, ctx.csi, dst.volume_id, node, owner + "/target")
    finally:
        kubelet.detach(ctx.store, ctx.csi, src.volume_id, node, owner + "/source")
