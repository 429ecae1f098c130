"""A volume's disk back out as a file (like `virtctl vmexport download`), sparse.

`qemu-img convert` skips zero blocks by itself (`-S 4k`), so a raw export is a sparse file
and a qcow2 export allocates only clusters holding data.
"""

from __future__ import annotations

import os
from typing import Literal

from pvlun.command import CommandError, run

from . import errors
from .errors import ImportFailed
from .pipeline import DISK_IMG


def export_volume(source_path: str, out_path: str, fmt: Literal["raw", "qcow2"] = "raw") -> str:
    """Write the disk of a volume (a device/raw file, or a Filesystem volume's dir) to `out_path`."""
    if fmt not in ("raw", "qcow2"):
        raise ImportFailed(errors.INVALID_SOURCE, f"export format must be raw or qcow2, not {fmt!r}")
    disk = os.path.join(source_path, DISK_IMG) if os.path.isdir(source_path) else source_path
    if not os.path.exists(disk):
        raise ImportFailed(errors.NOT_FOUND, f"{disk} does not exist")
    tmp = out_path + ".part"
    try:
        run(["qemu-img", "convert", "-W", "-m", "16", "-S", "4k", "-f", "raw", "-O", fmt, disk, tmp], timeout=None)
        os.replace(tmp, out_path)
    except CommandError as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise ImportFailed(errors.INTERNAL, f"export failed: {errors.tool_text(exc.stderr)}") from None
    return out_path
