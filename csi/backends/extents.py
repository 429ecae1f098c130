"""How many bytes a set of files really holds on disk, counting extents they share
(reflink snapshots and clones) once: the physical extents of each file (FIEMAP), merged.
Summing st_blocks would count a snapshot and its volume twice and so make the pool look
fuller-and-larger than it is."""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from collections.abc import Iterable, Iterator

FS_IOC_FIEMAP = 0xC020660B  # _IOWR('f', 11, struct fiemap)
_HEADER = struct.Struct("=QQIIII")  # fm_start, fm_length, fm_flags, fm_mapped_extents, fm_extent_count, reserved
_EXTENT = struct.Struct("=QQQQQIIII")  # fe_logical, fe_physical, fe_length, 2 reserved, fe_flags, 3 reserved
_BATCH = 512
_LAST, _UNKNOWN, _DELALLOC = 0x1, 0x2, 0x4
_ALL = (1 << 64) - 1


def _extents(fd: int) -> Iterator[tuple[int, int, int]]:
    """(physical, length, flags) of every extent of the open file, in logical order."""
    start = 0
    while True:
        buf = bytearray(_HEADER.size + _BATCH * _EXTENT.size)
        _HEADER.pack_into(buf, 0, start, _ALL - start, 0, 0, _BATCH, 0)
        fcntl.ioctl(fd, FS_IOC_FIEMAP, buf, True)
        mapped = _HEADER.unpack_from(buf, 0)[3]
        if mapped == 0:
            return
        for i in range(mapped):
            logical, physical, length, _, _, flags, _, _, _ = _EXTENT.unpack_from(buf, _HEADER.size + i * _EXTENT.size)
            yield physical, length, flags
            if flags & _LAST:
                return
            start = logical + length


def allocated_bytes(paths: Iterable[str]) -> int:
    """Bytes the files hold on disk, shared extents once. Files that vanish meanwhile are
    skipped; where FIEMAP is not supported, a file's st_blocks is taken (nothing is shared
    there). Extents not placed yet (delayed allocation) count in full."""
    spans: list[tuple[int, int]] = []
    unplaced = 0
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            for physical, length, flags in _extents(fd):
                if flags & (_UNKNOWN | _DELALLOC):
                    unplaced += length
                else:
                    spans.append((physical, physical + length))
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
                raise
            unplaced += os.fstat(fd).st_blocks * 512
        finally:
            os.close(fd)
    total, reach = 0, -1
    for begin, end in sorted(spans):
        if end <= reach:
            continue
        total += end - max(begin, reach)
        reach = end
    return total + unplaced
