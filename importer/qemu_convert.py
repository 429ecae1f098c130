"""Running `qemu-img convert` with progress, and making a Block target read as zeros again.

qemu-img convert is long-running, so it is started with Popen (not pvlun.command.run) and
its `-p` output is read as it goes; a convert that goes silent is reported as stalled.
"""

from __future__ import annotations

import os
import re
import select
import stat
import subprocess
import tempfile
from typing import Callable

from pvlun.command import CommandError, run

from . import errors
from .errors import ImportFailed

STALL_SECONDS = 120  # a direct convert that reports no progress for this long is retried via scratch

_PROGRESS = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")


class Stalled(Exception):
    """qemu-img printed nothing for `stall` seconds."""


def run_with_progress(argv: list[str], progress: Callable[[float], None], stall: float = STALL_SECONDS) -> None:
    """qemu-img convert -p, long-running: read its progress as it goes (hence Popen, not run)."""
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err)
        try:
            assert proc.stdout is not None
            fd = proc.stdout.fileno()
            while True:
                ready, _, _ = select.select([fd], [], [], stall)
                if not ready:
                    raise Stalled()
                chunk = os.read(fd, 4096)
                if not chunk:
                    break
                found = _PROGRESS.findall(chunk)
                if found:
                    progress(float(found[-1]) / 100.0)
            rc = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            if proc.stdout is not None:
                proc.stdout.close()
        if rc != 0:
            err.seek(0)
            text = err.read().decode(errors="replace")
            reason = errors.TRANSFER_FAILED if "curl" in text.lower() or "http" in text.lower() else errors.INVALID_IMAGE
            raise ImportFailed(reason, f"qemu-img convert failed: {errors.tool_text(text)}")


def zero_target(path: str, size: int) -> None:
    """Make a Block target read as zeros again: punch the file, or zero-out the device."""
    try:
        mode = os.stat(path).st_mode
        if stat.S_ISBLK(mode):
            run(["blkdiscard", "--zeroout", path], timeout=None)
        else:
            run(["fallocate", "--punch-hole", "--offset", "0", "--length", str(size), path])
    except (CommandError, OSError):
        pass
