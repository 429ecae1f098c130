"""Byte streams between a source and a disk: decompression, counting/hashing, sparse writing.

The sparse writer is where "zero blocks are never written" happens: data arrives in
chunks, all-zero 64 KiB blocks are skipped (the target is fresh and reads as zeros), runs
of data blocks go out in one pwrite. It also enforces the capacity, which is what stops a
decompression bomb at the target's size.
"""

from __future__ import annotations

import gzip
import hashlib
import lzma
import os
import tarfile
import zlib
from typing import BinaryIO, Callable

import zstandard

from . import errors
from .errors import ImportFailed

BLOCK = 64 * 1024
CHUNK = 4 << 20
_ZERO_CHUNK = bytes(CHUNK)
_ZERO_BLOCK = bytes(BLOCK)
# what Python's tarfile raises on a hostile stream: its own errors, and plain ValueErrors from
# headers it parses without checking (a GNU sparse map or size that is no number)
TAR_ERRORS = (tarfile.TarError, ValueError, OverflowError, EOFError, IndexError)
MAX_TAR_HEADER = 1 << 20  # a long name or pax header beyond this is no tar a disk comes in
_EXTENDED_HEADERS = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
                     tarfile.SOLARIS_XHDTYPE)


class _HeaderBudget:
    """tarfile's file object while it parses one member's headers: they may read so much and no
    more (a GNU sparse map's extension blocks, or a pax 1.0 sparse map, are read whole otherwise)."""

    def __init__(self, fileobj, budget: int):
        self._fileobj, self._left = fileobj, budget

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0 or size > self._left:
            raise ImportFailed(errors.INVALID_IMAGE, f"the tar archive's member headers (a sparse map, long names, "
                                                     f"pax records) run past {MAX_TAR_HEADER} bytes")
        self._left -= size
        return self._fileobj.read(size)

    def __getattr__(self, name: str):
        return getattr(self._fileobj, name)


class _BoundedTarInfo(tarfile.TarInfo):
    """tarfile reads a long name or pax header whole, whatever size it declares: refused first;
    and everything one member's headers read is bounded (_HeaderBudget)."""

    def _proc_member(self, tarfile):
        if self.type in _EXTENDED_HEADERS and self.size > MAX_TAR_HEADER:
            raise ImportFailed(errors.INVALID_IMAGE, f"the tar archive declares a {self.size}-byte extended header "
                                                     f"(long name or pax), more than the {MAX_TAR_HEADER} allowed")
        fileobj = tarfile.fileobj
        tarfile.fileobj = _HeaderBudget(fileobj, 2 * MAX_TAR_HEADER)
        try:
            return super()._proc_member(tarfile)
        finally:
            tarfile.fileobj = fileobj


def open_tar_stream(stream: BinaryIO, mode: str) -> tarfile.TarFile:
    """A tar read as a stream (`r|`, `r|*`), its extended headers bounded."""
    return tarfile.open(fileobj=stream, mode=mode, tarinfo=_BoundedTarInfo)


class DecompressingReader:
    """A decompressor whose failures (corrupt or cut-off streams) are ImportFailed."""

    def __init__(self, fmt: str, stream: BinaryIO):
        self.fmt = fmt
        if fmt == "gzip":
            self._inner: BinaryIO = gzip.GzipFile(fileobj=stream, mode="rb")  # type: ignore[assignment]
        elif fmt == "xz":
            self._inner = lzma.LZMAFile(stream, mode="rb")  # type: ignore[assignment]
        elif fmt == "zstd":
            self._inner = zstandard.ZstdDecompressor().stream_reader(stream, read_across_frames=True)  # type: ignore[assignment]
        else:
            raise ValueError(fmt)

    def read(self, n: int = -1) -> bytes:
        try:
            return self._inner.read(CHUNK if n is None or n < 0 else n)
        except ImportFailed:
            raise
        except (OSError, EOFError, zlib.error, lzma.LZMAError, zstandard.ZstdError) as exc:
            raise ImportFailed(errors.INVALID_IMAGE, f"the {self.fmt} data is corrupt or truncated: {exc}") from None

    def close(self) -> None:
        self._inner.close()


class CountingReader:
    """Counts (for progress) and hashes (for the checksum) the bytes as a source delivers them."""

    def __init__(self, stream: BinaryIO, checksum: str | None, on_bytes: Callable[[int], None]):
        self._stream = stream
        algo, _, expected = (checksum or "").partition(":")
        self._algo, self._expected = algo.lower(), expected.lower()
        self._hash = hashlib.new(self._algo) if checksum else None  # md5, sha1, sha256, sha512 (checked by the source)
        self._on_bytes = on_bytes
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        data = self._stream.read(n)
        if data:
            self.count += len(data)
            if self._hash is not None:
                self._hash.update(data)
            self._on_bytes(self.count)
        return data

    def readinto(self, buf) -> int:
        data = self.read(len(buf))
        buf[: len(data)] = data
        return len(data)

    def readable(self) -> bool:
        return True

    def verify(self, limit: int) -> None:
        """Read whatever is left (tar padding, trailing data), up to `limit` bytes from the
        source in all (a source that never ends fails), and compare the checksum."""
        if self._hash is None:
            return
        while self.read(CHUNK):
            if self.count > limit:
                raise ImportFailed(errors.IMAGE_TOO_LARGE, f"the source sends more than {limit} bytes, far more "
                                                           f"than the volume holds")
        actual = self._hash.hexdigest()
        if actual != self._expected:
            raise ImportFailed(errors.CHECKSUM_MISMATCH, f"checksum mismatch: expected {self._algo}:{self._expected}, "
                                                         f"got {self._algo}:{actual}")

    def close(self) -> None:
        self._stream.close()


TRAILER = 512  # a fixed VHD's footer


def write_sparse(stream: BinaryIO, fd: int, capacity: int, *, too_large: str,
                 trailer: Callable[[bytes, int], bool] | None = None) -> int:
    """Copy `stream` to `fd` from offset 0, skipping all-zero blocks; return the bytes copied.

    More than `capacity` bytes raises ImageTooLarge (`too_large` says what the limit is).
    With `trailer`, the last 512 bytes are held back until the end and written only if
    `trailer(last_512, bytes_before_them)` says they are data, not a footer to drop.
    """
    offset = 0
    held = b""
    while True:
        buf = stream.read(CHUNK)
        if not buf:
            break
        if not isinstance(buf, bytes):
            buf = bytes(buf)
        if trailer is not None:
            buf = held + buf
            cut = max(0, len(buf) - TRAILER)
            buf, held = buf[:cut], buf[cut:]
        offset = _write_chunk(fd, buf, offset, capacity, too_large)
    if held and not (trailer is not None and trailer(held, offset)):
        offset = _write_chunk(fd, held, offset, capacity, too_large)
    return offset


def _write_chunk(fd: int, buf: bytes, offset: int, capacity: int, too_large: str) -> int:
    """Write one chunk at `offset` (its zero blocks skipped); return the offset after it."""
    size = len(buf)
    if offset + size > capacity:
        raise ImportFailed(errors.IMAGE_TOO_LARGE, f"the image holds more than {too_large}")
    if size == CHUNK and buf == _ZERO_CHUNK:
        return offset + size
    view = memoryview(buf)
    run_start = -1
    for start in range(0, size, BLOCK):
        block = buf[start:start + BLOCK]  # a bytes copy: bytes == bytes is a memcmp
        is_zero = block == _ZERO_BLOCK[: len(block)]
        if is_zero:
            if run_start >= 0:
                _pwrite_all(fd, view[run_start:start], offset + run_start)
                run_start = -1
        elif run_start < 0:
            run_start = start
    if run_start >= 0:
        _pwrite_all(fd, view[run_start:size], offset + run_start)
    return offset + size


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        written = os.pwrite(fd, data, offset)
        data = data[written:]
        offset += written
