"""Running `qemu-img convert` with progress, and making a Block target read as zeros again.

qemu-img convert is long-running, so it is started with Popen (not host.command.run) and
its `-p` output is read as it goes; a convert that goes silent for the import's stall
timeout (`transfer_watch`) is reported as stalled, and a cancelled import kills it.
It runs sandboxed like every qemu-img on untrusted data: it sees the image's node and the
target (a private device node, or the file lent to the sandbox user for the run), nothing
else, so a format trick that slipped past the checks finds no host file to read.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import stat
import subprocess
import time
from typing import Callable

from host.command import CommandError, run
from host.sandbox import lent

from . import errors, transfer_watch
from .errors import ImportFailed
from .formats import ImageNode

_PROGRESS = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")


class Stalled(Exception):
    """qemu-img printed nothing for the stall timeout."""


def run_with_progress(argv: list[str], progress: Callable[[float], None], *,
                      describe: Callable[[str], str] = errors.tool_text) -> None:
    """qemu-img convert -p, long-running: read its progress as it goes (hence Popen, not run).
    `describe` turns its stderr into the failure's message."""
    watch = transfer_watch.current()
    stall = transfer_watch.stall_seconds()
    with transfer_watch.watched_process(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE) as (proc, err):
        assert proc.stdout is not None
        with proc.stdout:
            fd = proc.stdout.fileno()
            last = time.monotonic()
            pending = b""
            while True:
                ready, _, _ = select.select([fd], [], [], min(stall, 1.0))
                if not ready:
                    if watch is not None:
                        watch.check()
                    if time.monotonic() - last > stall:
                        raise Stalled()
                    continue
                chunk = os.read(fd, 4096)
                if not chunk:
                    break
                last = time.monotonic()
                pending += chunk
                # every step qemu-img printed, also when a fast convert's steps come in one read
                # (a step cut off at the read's end waits for the rest of it)
                end = 0
                for match in _PROGRESS.finditer(pending):
                    progress(float(match.group(1)) / 100.0)
                    end = match.end()
                pending = pending[end:][-64:]
        if proc.wait() != 0:
            err.seek(0)
            text = err.read().decode(errors="replace")
            reason = errors.TRANSFER_FAILED if "curl" in text.lower() or "http" in text.lower() else errors.INVALID_IMAGE
            raise ImportFailed(reason, f"qemu-img convert failed: {describe(text)}")


def convert_into(node: ImageNode, disk_path: str, progress: Callable[[float], None]) -> None:
    """Convert the image into the disk (a device or a raw file that reads as zeros), sandboxed."""
    argv = ["qemu-img", "convert", "-p", "-W", "-m", "16", "-n", "--target-is-zero"]
    if _direct_io_works(disk_path):
        # O_DIRECT into the volume: no second copy in the page cache, and the final
        # fsync has little left to do (measured on a loop device: 0.9 s instead of 1.2-2.2 s)
        argv += ["-t", "none"]
    argv += [*node.object_args(), "-O", "raw", node.spec, disk_path]
    block = stat.S_ISBLK(os.stat(disk_path, follow_symlinks=False).st_mode)  # a link is no disk: lent() refuses it
    handed = {"devices": [disk_path]} if block else {"writable": [disk_path]}
    with (contextlib.nullcontext() if block else lent(disk_path)), node.sandbox(**handed) as box:
        run_with_progress(box.wrap(argv), progress, describe=lambda text: node.tool_text(text.replace(disk_path, "<volume>")))


def _direct_io_works(path: str) -> bool:
    """Can the target be written with O_DIRECT (a block device, most local filesystems)?"""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_DIRECT | os.O_NOFOLLOW))
        return True
    except OSError:
        return False


def zero_target(path: str, size: int, *, check: bool = False) -> None:
    """Make a Block target read as zeros again: punch the file, or zero-out the device. Best
    effort after a failure; with `check`, what could not be zeroed raises."""
    try:
        mode = os.stat(path).st_mode
        if stat.S_ISBLK(mode):
            run(["blkdiscard", "--zeroout", path], timeout=None)
        else:
            run(["fallocate", "--punch-hole", "--offset", "0", "--length", str(size), path])
    except (CommandError, OSError):
        if check:
            raise
