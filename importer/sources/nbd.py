"""A source qemu reads in place, served by nbdkit from its sandbox, with the checked bytes pinned.

An image read in place is inspected (`qemu-img info`, `qemu-img check`) and then converted,
each by its own qemu-img over the same nbdkit. A source that changes in between (a server
that answers the conversion with other bytes than the checks, a local file rewritten) must
not get bytes nobody checked converted: a clean VMDK for the checks and one whose descriptor
names a host file for the conversion would read that file into the volume.

So nbdkit runs with its cache filter pinning what the checks read: while the flag file
exists (`cache-on-read=/PATH`) every block read is kept, and a kept block is served from the
cache from then on; `seal()` removes the flag before the conversion, so the data it reads
later is not kept. qemu opens an image by reading its header and metadata, and which offsets
it reads depends only on the bytes it got and the size: given the same bytes at the same
offsets and the same size (the truncate filter fixes it to the size the checks saw), the
conversion's open reads only blocks the checks read, and sees exactly what was checked.
Only data blocks come fresh from the source, and data is what any image may hold anyway.

The cache holds the 64 KiB blocks the checks read (headers, tables: measured 512 KiB for a
qcow2 of 2100 MiB virtual and 512 MiB data, the same after the conversion) in an unlinked file
in the export's own directory; with no `cache-max-size` nothing is evicted, and a failed cache
write fails the read. Measured on bench_import's qcow2 from nginx, 7 runs interleaved: 0.70 s
median pinned against 0.72 s before (noise); a VDI of the same data 0.78 s against 0.61 s.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from typing import Iterator

from host.sandbox import TOOLS_ONLY, Sandbox, prepare_dir

from .. import errors, transfer_watch
from ..scratch import NBD_PREFIX
from .base import DirectRead


class NbdExport(DirectRead):
    """The nbdkit serving one source to the qemu-img runs of one import (subclasses name the plugin)."""

    network = False

    def __init__(self, size: int, what: str):
        super().__init__({"driver": "nbd"})
        self.size, self.what = size, what
        self._proc: subprocess.Popen | None = None
        self._dir: str | None = None
        self._pin: str | None = None
        self._stderr = None
        self._unwatch = lambda: None

    def plugin(self) -> contextlib.AbstractContextManager[tuple[list[str], dict, tuple[int, ...]]]:
        """(plugin and its parameters, what the sandbox must hold, descriptors to pass) for one start."""
        raise NotImplementedError

    def attach(self, workdir: str) -> dict:
        if self._proc is not None:
            return self.spec
        # a private (0700) dir of the sandbox user's for the socket and the cache; unix socket paths must be short
        self._dir = prepare_dir(workdir if len(workdir) < 60 else None, NBD_PREFIX)
        sock = os.path.join(self._dir, "nbd.sock")
        self._pin = os.path.join(self._dir, "pinning")
        open(self._pin, "x").close()
        self._stderr = tempfile.TemporaryFile()
        with self.plugin() as (plugin, handed, fds):
            argv = ["nbdkit", "--foreground", "--exit-with-parent", "--readonly", "--threads", "16", "-U", sock,
                    "--filter=cache", "--filter=truncate", *plugin,
                    f"cache-on-read={self._pin}", f"truncate={self.size}"]
            box = Sandbox(writable=[self._dir], network=self.network, system=TOOLS_ONLY, env={"TMPDIR": self._dir},
                          **handed)
            self._proc = subprocess.Popen(box.wrap(argv), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                          stderr=self._stderr, pass_fds=fds)
        self.writable = [self._dir]
        watch = transfer_watch.current()
        if watch is not None:  # a cancelled import kills nbdkit, so qemu-img reading through it ends too
            self._unwatch = watch.on_abort(self._proc.kill)
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self._stderr.seek(0)
                text = self._stderr.read().decode(errors="replace")
                self.detach()
                raise errors.ImportFailed(errors.TRANSFER_FAILED, f"nbdkit could not serve {self.what}: {errors.tool_text(text)}")
            time.sleep(0.01)
        self.spec = {"driver": "nbd", "server": {"type": "unix", "path": sock}}
        return self.spec

    def source_failure(self) -> errors.ImportFailed | None:
        """What nbdkit logged about reading the source (a server's error status, a timeout), as
        the transfer failure it is, retried like any other; None if it logged no error (qemu's
        failure is then the image's own)."""
        if self._stderr is None:
            return None
        text = os.pread(self._stderr.fileno(), 64 << 10, 0).decode(errors="replace")  # nbdkit still writes here
        lines = [line for line in text.splitlines() if "error" in line.lower()]
        if not lines:
            return None
        stalled = "timeout was reached" in text.lower() or "timed out" in text.lower()
        return errors.ImportFailed(errors.TRANSFER_STALLED if stalled else errors.TRANSFER_FAILED,
                                   f"reading {self.what} failed: {errors.tool_text(lines[-1].split('error: ', 1)[-1])}")

    def seal(self) -> None:
        """The checks are done: what they read stays pinned, nothing read from now on is kept."""
        if self._pin is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._pin)
            self._pin = None

    def detach(self) -> None:
        self._unwatch()
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = self._pin = None


class NbdkitFile(NbdExport):
    """A local file, served from the descriptor the sandbox user opened (never its path again)."""

    SOURCE = "/source/image"

    def __init__(self, fd: int, size: int, what: str):
        super().__init__(size, what)
        self.fd = fd

    @contextlib.contextmanager
    def plugin(self) -> Iterator[tuple[list[str], dict, tuple[int, ...]]]:
        yield ["file", self.SOURCE], {"files": {self.SOURCE: self.fd}}, (self.fd,)
