"""Where a file's data is: its extents as SEEK_DATA / SEEK_HOLE report them, so copies skip
the holes of sparse LUNs and disk images (the pool's plain copies, the copy clone strategy)."""

from __future__ import annotations

import errno
import os


def data_extents(fd: int, length: int) -> list[tuple[int, int]]:
    """(start, end) of the ranges of `fd` below `length` that may hold data. A block device
    (or a filesystem without SEEK_DATA) reports all of it as data."""
    extents: list[tuple[int, int]] = []
    offset = 0
    while offset < length:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data past offset
                break
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                return extents + [(offset, length)]
            raise
        if start >= length:
            break
        end = min(os.lseek(fd, start, os.SEEK_HOLE), length)
        extents.append((start, end))
        offset = end
    return extents
