"""A volume's disk back out as a file (like `virtctl vmexport download`), sparse.

`qemu-img convert` skips zero blocks by itself (`-S 4k`), so a raw export is a sparse file
and a qcow2 export allocates only clusters holding data. A Filesystem volume's disk.img is
whatever its owner left there: it is opened here without following a link and only as a
regular file, and qemu-img (reading it as raw: no metadata of it is followed) gets that very
file through this process's descriptor, never its path.
"""

from __future__ import annotations

import os
from typing import Literal

from host.command import CommandError, run
from host.sandbox import UnsafeFile, fd_path, open_no_follow

from . import errors
from .errors import ImportFailed
from .pipeline import DISK_IMG


def export_volume(source_path: str, out_path: str, fmt: Literal["raw", "qcow2"] = "raw") -> str:
    """Write the disk of a volume (a device/raw file, or a Filesystem volume's dir) to `out_path`."""
    if fmt not in ("raw", "qcow2"):
        raise ImportFailed(errors.INVALID_SOURCE, f"export format must be raw or qcow2, not {fmt!r}")
    filesystem = os.path.isdir(source_path)
    disk = os.path.join(source_path, DISK_IMG) if filesystem else source_path
    try:
        fd = open_no_follow(disk, devices=not filesystem)
    except FileNotFoundError:
        raise ImportFailed(errors.NOT_FOUND, f"the volume holds no {DISK_IMG}" if filesystem
                           else "the volume's device is gone") from None
    except UnsafeFile as exc:
        raise ImportFailed(errors.INVALID_SOURCE, f"cannot export the volume: {exc}") from None
    tmp = out_path + ".part"
    try:
        run(["qemu-img", "convert", "-W", "-m", "16", "-S", "4k", "-f", "raw", "-O", fmt, fd_path(fd), tmp],
            timeout=None)
        os.replace(tmp, out_path)
    except CommandError as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        text = exc.stderr.replace(fd_path(fd), "the volume's disk")
        raise ImportFailed(errors.INTERNAL, f"export failed: {errors.tool_text(text)}") from None
    finally:
        os.close(fd)
    return out_path
