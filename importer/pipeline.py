"""The import pipeline: one phase machine that fills a target from any source.

CDI's DataProcessor, in our words: Info → Transfer → Convert → Resize → Complete, a table
from phase to function. The pipeline never knows a source by name; it looks at what
`info()` says and at the bytes themselves:

- raw (and iso), possibly gz/xz/zstd-compressed or in a tar: streamed into the target,
  zero blocks skipped, stopped at the target's size;
- qcow2/vdi/vhd/vhdx that qemu can read in place (HTTP with ranges through nbdkit's curl
  plugin, a local file through its file plugin): `qemu-img convert` straight from the source,
  no scratch copy, the blocks the checks read pinned for the conversion (see sources.nbd);
- other images (and every VMDK): downloaded to scratch (checksummed), inspected, checked,
  converted.

The target must read as zeros when the import starts (a fresh volume): zero blocks are
skipped, not written. On any failure what was written is discarded before ImportFailed
propagates.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import shutil
import stat
import tempfile
import time
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterator, Literal

from host.sandbox import give
from controlplane.user_text import user_text

from . import archive, errors, formats, transfer_watch
from .errors import ImportFailed
from .formats import ImageNode
from .sources.base import PeekStream, Source, read_head
from .qemu_convert import Stalled, convert_into, zero_target
from .scratch import IMAGE_PREFIX
from .streams import CountingReader, DecompressingReader, write_sparse

log = logging.getLogger("pvlun.import")
DISK_IMG = "disk.img"
MAX_LAYERS = 4  # compression and tar layers around an image (a .tar.gz is two)
DEFAULT_FS_OVERHEAD = 0.055  # CDI's default filesystem overhead
ALIGN = 1 << 20


@dataclass(frozen=True)
class Target:
    """Where the disk goes. Block: a device or raw file of `size` bytes. Filesystem: a mounted dir."""

    path: str
    size: int
    mode: Literal["Block", "Filesystem"] = "Block"
    content_type: Literal["kubevirt", "archive"] = "kubevirt"
    preallocation: bool = False
    filesystem_overhead: float = DEFAULT_FS_OVERHEAD


@dataclass(frozen=True)
class ImportResult:
    format: str                # the image format found inside any compression/tar layers
    layers: tuple[str, ...]    # e.g. ("gzip", "tar")
    virtual_size: int          # bytes of disk the image holds
    disk_path: str             # the device/file, or <dir>/disk.img ("" for archives)
    disk_size: int             # size of the disk the guest sees (Filesystem: the usable space)
    method: str                # "stream" | "direct" | "scratch" | "archive"
    bytes_transferred: int     # bytes read from the source by us (0 when qemu read it in place)
    seconds: float


class Phase(enum.Enum):
    INFO = "Info"
    TRANSFER = "Transfer"
    CONVERT = "Convert"
    RESIZE = "Resize"
    COMPLETE = "Complete"


def import_into(source: Source, target: Target, *, progress: Callable[[float], None], scratch_dir: str) -> ImportResult:
    """Fill `target` from `source`; raise ImportFailed (with the target discarded) if it cannot be done."""
    return _Import(source, target, progress, scratch_dir).run()


def usable_space(target: Target) -> int:
    """CDI's rule for Filesystem volumes: the space left after the filesystem overhead, 1 MiB aligned."""
    st = os.statvfs(target.path)
    available = min(target.size, st.f_bavail * st.f_frsize)
    return int(available * (1 - target.filesystem_overhead)) // ALIGN * ALIGN


class _Import:
    def __init__(self, source: Source, target: Target, progress: Callable[[float], None], scratch_dir: str):
        self.source, self.target = source, target
        self._report = progress
        self._last = -1.0
        self.scratch_root = scratch_dir
        self.table: dict[Phase, Callable[[], Phase]] = {
            Phase.INFO: self._info,
            Phase.TRANSFER: self._transfer,
            Phase.CONVERT: self._convert,
            Phase.RESIZE: self._resize,
        }
        self.fd = -1
        self.created_disk = False
        self.touched = False
        self.unpack_dir: str | None = None
        self.scratch: str | None = None
        self.open_streams: list = []
        self.counter: CountingReader | None = None
        self.size_hint: int | None = None
        self.source_bound = 0  # the most bytes the source may send (set by Info)
        self.format, self.layers, self.method = "raw", [], "stream"
        self.virtual_size = 0
        self.convert_from: ImageNode | None = None
        self.direct = None
        self.progress_span = (0.0, 100.0)

    # -- driver ------------------------------------------------------------------------
    def run(self) -> ImportResult:
        started = time.monotonic()
        phase = Phase.INFO
        try:
            self._open_target()
            watch = transfer_watch.current()
            while phase is not Phase.COMPLETE:
                if watch is not None:
                    watch.check()  # a cancelled import goes no further
                phase = self.table[phase]()
            self._complete()
        except BaseException as exc:
            self._discard()
            if isinstance(exc, ImportFailed):
                raise
            if isinstance(exc, Exception):  # a bug, or the host failing us: never the input's doing
                log.error("import failed in phase %s", phase.value, exc_info=exc)
                raise ImportFailed(errors.INTERNAL, f"{phase.value} failed: {user_text(exc)}") from None
            raise
        finally:
            self._release()
        return ImportResult(
            self.format, tuple(self.layers), self.virtual_size,
            "" if self.target.content_type == "archive" else self.disk_path,
            self.capacity if self.target.content_type == "kubevirt" else 0,
            self.method, self.counter.count if self.counter else 0, time.monotonic() - started,
        )

    def progress(self, fraction: float, *, step_done: bool = False) -> None:
        """Report `fraction` of the current span (steps of at least 0.5 %); `step_done`: a step
        ended (the download before its convert), shown whatever the last report was."""
        lo, hi = self.progress_span
        value = round(min(100.0, lo + (hi - lo) * max(0.0, min(1.0, fraction))), 2)
        if value >= self._last + 0.5 or ((value >= 100.0 or step_done) and self._last < value):
            self._last = value
            self._report(value)

    # -- target ------------------------------------------------------------------------
    def _open_target(self) -> None:
        t = self.target
        if t.mode == "Block":
            if t.content_type != "kubevirt":
                raise ImportFailed(errors.INVALID_SOURCE, "contentType archive needs a Filesystem volume")
            self.disk_path, self.capacity = t.path, t.size
            self.fd = os.open(t.path, os.O_WRONLY)
            actual = os.lseek(self.fd, 0, os.SEEK_END)
            if actual < t.size:
                raise ImportFailed(errors.INTERNAL, f"the target holds {actual} bytes, less than the {t.size} declared")
            return
        if not os.path.isdir(t.path):
            raise ImportFailed(errors.INTERNAL, f"the Filesystem target {t.path} is not a directory")
        self.capacity = usable_space(t)
        self.disk_path = os.path.join(t.path, DISK_IMG)
        if t.content_type == "archive":
            return
        if os.path.lexists(self.disk_path):
            os.unlink(self.disk_path)
        self.fd = os.open(self.disk_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o660)
        self.created_disk = True
        os.ftruncate(self.fd, self.capacity)

    def _too_large(self, size: int | None = None, what: str = "virtual size", *, declared: bool = False) -> ImportFailed:
        where = "the volume's usable space after filesystem overhead" if self.target.mode == "Filesystem" else "the volume"
        what = f"{what} {size} bytes" if size else "the image"
        message = f"{what} is larger than {where} ({self.capacity} bytes)"
        return errors.DeclaredTooLarge(message) if declared else ImportFailed(errors.IMAGE_TOO_LARGE, message)

    def _size_bound(self, fmt: str) -> int:
        """The most bytes a source in this format may hold for this target: raw data is the disk
        (a fixed VHD's footer may follow it); images and compressed streams carry metadata on top."""
        if fmt in formats.RAW_FORMATS:
            return self.capacity + formats.VHD_FOOTER
        return self.capacity + self.capacity // 8 + (64 << 20)

    # -- phases ------------------------------------------------------------------------
    def _info(self) -> Phase:
        info = self.source.info()
        self.size_hint = info.size
        fmt = formats.detect(info.head)
        self.source_bound = self._size_bound(fmt)
        if info.size is not None and info.size > self.source_bound:  # before a byte is written
            raise self._too_large(info.size, f"the {fmt} source of", declared=True)
        direct = info.direct
        if (fmt in formats.IN_PLACE_FORMATS and direct is not None and not self.source.checksum
                and self.target.content_type == "kubevirt"):
            self.format, self.method = fmt, "direct"
            formats.precheck_header(fmt, info.head)
            self.direct = direct
            node = ImageNode(fmt, direct.attach(self.scratch_root), tuple(direct.read_only), tuple(direct.writable),
                             tuple(direct.objects))
            with self._source_reads():
                img = formats.inspect(node)
                if img.virtual_size > self.capacity:
                    raise self._too_large(img.virtual_size)
                # qemu reads past the end of a truncated image as zeros (files and HTTP alike): check it
                formats.verify_integrity(node, file_size=info.size)
            direct.seal()  # the conversion reads what was checked (see sources.nbd)
            self.virtual_size = img.virtual_size
            self.convert_from = node
            return Phase.CONVERT
        return Phase.TRANSFER

    def _transfer(self) -> Phase:
        raw = self.source.transfer()
        self.open_streams.append(raw)
        size = self.size_hint
        self.counter = CountingReader(raw, self.source.checksum, lambda n: size and self.progress(n / size))
        stream: BinaryIO = self.counter  # type: ignore[assignment]
        while True:
            head = read_head(stream, formats.HEAD_SIZE)
            stream = PeekStream(head, stream)  # type: ignore[arg-type, assignment]
            fmt = formats.detect(head)
            layer = fmt in formats.COMPRESSIONS or (fmt == "tar" and self.target.content_type == "kubevirt")
            if not layer:
                break
            if len(self.layers) == MAX_LAYERS:
                raise ImportFailed(errors.INVALID_IMAGE, f"the image is wrapped in more than {MAX_LAYERS} layers of "
                                                         f"compression or tar ({', '.join(self.layers)}, {fmt}, ...)")
            if fmt in formats.COMPRESSIONS:
                stream = DecompressingReader(fmt, stream)  # type: ignore[assignment]
            else:
                stream = archive.first_disk(stream, self.open_streams)
            self.layers.append(fmt)
        self.format = fmt
        if self.target.content_type == "archive":
            if fmt != "tar":
                raise ImportFailed(errors.INVALID_IMAGE, f"contentType archive needs a tar archive, found {fmt}")
            self._unpack(stream)
            self.counter.verify(self.source_bound)
            self.method = "archive"
            return Phase.RESIZE
        if fmt in formats.RAW_FORMATS:
            self.touched = True
            self.virtual_size = write_sparse(stream, self.fd, self.capacity, too_large=f"the volume's {self.capacity} bytes",
                                             trailer=self._fixed_vhd_footer)
            self.counter.verify(self.source_bound)
            return Phase.RESIZE
        return self._to_scratch(fmt, head, stream)

    def _to_scratch(self, fmt: str, head: bytes, stream: BinaryIO) -> Phase:
        """Images qemu cannot read in place: download (bounded), verify, inspect, check."""
        self.method = "scratch"
        self.progress_span = (0.0, 50.0)
        formats.precheck_header(fmt, head)
        self.scratch = tempfile.mkdtemp(prefix=IMAGE_PREFIX, dir=self.scratch_root)
        path = os.path.join(self.scratch, "image")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            limit = self._size_bound(fmt)
            length = write_sparse(stream, fd, limit, too_large=f"{limit} bytes (far more than the volume holds)")
            os.ftruncate(fd, length)
        finally:
            os.close(fd)
        self.counter.verify(self.source_bound)  # type: ignore[union-attr]
        give(path)  # qemu-img reads it as the sandbox user
        node = formats.local_image(path, fmt)
        img = formats.inspect(node)
        if img.virtual_size > self.capacity:
            raise self._too_large(img.virtual_size)
        formats.verify_integrity(node, file_size=length)
        self.virtual_size = img.virtual_size
        self.convert_from = node
        self.progress_span = (50.0, 100.0)
        self.progress(0.0, step_done=True)  # downloaded: the status says so while the checks run
        return Phase.CONVERT

    def _convert(self) -> Phase:
        assert self.convert_from is not None
        self.touched = True
        try:
            with self._source_reads():
                convert_into(self.convert_from, self.disk_path, self.progress)
        except Stalled:
            if self.method != "direct":
                raise ImportFailed(errors.INTERNAL,
                                   f"qemu-img convert made no progress for {transfer_watch.stall_seconds():g} s") from None
            # qemu's HTTP reader got stuck: start over the slow, sure way (via scratch).
            self._zero_disk()
            self.method, self.convert_from = "scratch", None
            return Phase.TRANSFER
        return Phase.RESIZE

    def _resize(self) -> Phase:
        # Filesystem disks were created at the usable size (CDI resizes disk.img to it);
        # Block disks are the device. Preallocation allocates the holes, data unchanged.
        if self.target.preallocation and self.fd >= 0 and stat.S_ISREG(os.fstat(self.fd).st_mode):
            os.posix_fallocate(self.fd, 0, self.capacity)
        return Phase.COMPLETE

    def _complete(self) -> None:
        if self.fd >= 0:
            os.fsync(self.fd)
        self.progress_span = (0.0, 100.0)
        self.progress(1.0)

    # -- helpers -----------------------------------------------------------------------
    @contextlib.contextmanager
    def _source_reads(self) -> Iterator[None]:
        """qemu-img reading the source in place sees a server's error or stall only as an I/O
        error, which would read as an invalid image: what nbdkit logged says it was the transfer
        (TransferFailed/TransferStalled, retried with backoff as on the scratch path)."""
        try:
            yield
        except ImportFailed as exc:
            if exc.reason in (errors.INVALID_IMAGE, errors.TRANSFER_FAILED) and self.direct is not None \
                    and self.method == "direct":  # not a cancellation or a stall the watch saw
                failure = self.direct.source_failure()
                if failure is not None:
                    raise failure from None
            raise

    def _fixed_vhd_footer(self, tail: bytes, length: int) -> bool:
        """A fixed VHD is its disk's bytes then a 512-byte footer: keep the disk, drop the footer
        (only a valid one whose size is the data's; anything else is raw data)."""
        if formats.fixed_vhd_size(tail) != length:
            return False
        self.format = "vhd"
        return True

    def _unpack(self, stream: BinaryIO) -> None:
        """contentType archive: unpacked (sandboxed, bounded by the volume's size) into a fresh
        directory inside the volume, then moved into place."""
        self.touched = True
        self.unpack_dir = tempfile.mkdtemp(prefix=".pvlun-unpack-", dir=self.target.path)
        archive.unpack(stream, self.unpack_dir, self._size_bound("tar"))
        for name in os.listdir(self.unpack_dir):
            try:
                os.replace(os.path.join(self.unpack_dir, name), os.path.join(self.target.path, name))
            except OSError as exc:
                raise ImportFailed(errors.INVALID_IMAGE, f"cannot put {name!r} of the archive in the volume: "
                                                         f"{exc.strerror}") from None
        os.rmdir(self.unpack_dir)
        self.unpack_dir = None

    def _discard(self) -> None:
        """Leave nothing of a failed import behind (the volume reads as zeros / disk.img is gone)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.unpack_dir:
            shutil.rmtree(self.unpack_dir, ignore_errors=True)
            self.unpack_dir = None
        if self.created_disk:
            try:
                os.unlink(self.disk_path)
            except FileNotFoundError:
                pass
            self.created_disk = False
        elif self.touched and self.target.mode == "Block":
            zero_target(self.target.path, self.target.size)

    def _zero_disk(self) -> None:
        if self.target.mode == "Block":
            zero_target(self.target.path, self.target.size)
        else:
            os.ftruncate(self.fd, 0)
            os.ftruncate(self.fd, self.capacity)

    def _release(self) -> None:
        if self.direct is not None:
            self.direct.detach()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        for stream in reversed(self.open_streams):
            try:
                stream.close()
            except Exception:
                pass
        try:
            self.source.close()
        except Exception:
            pass
        if self.scratch:
            shutil.rmtree(self.scratch, ignore_errors=True)
