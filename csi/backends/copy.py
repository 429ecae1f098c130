"""Copying LUN files: a reflink (constant time) where the filesystem has them, else a
sparse-aware copy (SEEK_DATA/SEEK_HOLE + copy_file_range) that never writes holes."""

from __future__ import annotations

import errno
import fcntl
import os

from host.extents import data_extents

FICLONE = 0x40049409  # _IOW(0x94, 9, int)


def reflink(src_fd: int, dst_fd: int) -> bool:
    """Share src's extents with dst; False where the filesystem cannot."""
    try:
        fcntl.ioctl(dst_fd, FICLONE, src_fd)
        return True
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS):
            return False
        raise


def sparse_copy(src_fd: int, dst_fd: int, size: int) -> None:
    """Copy only the data extents of src into dst (whose size is already set)."""
    for start, end in data_extents(src_fd, size):
        while start < end:
            n = os.copy_file_range(src_fd, dst_fd, end - start, start, start)
            if n == 0:
                break
            start += n


def new_private_file(path: str) -> int:
    """Create a new LUN file readable and writable by its owner only; a write descriptor."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)


def copy_file(src: str, dst: str, size: int | None = None) -> bool:
    """Copy src to a new private file dst (then set its size); returns True when reflinked."""
    with open(src, "rb") as fin, open(new_private_file(dst), "wb") as fout:
        src_size = os.fstat(fin.fileno()).st_size
        linked = reflink(fin.fileno(), fout.fileno())
        if not linked:
            os.ftruncate(fout.fileno(), src_size)
            sparse_copy(fin.fileno(), fout.fileno(), src_size)
        if size is not None and size != src_size:
            os.ftruncate(fout.fileno(), size)
        os.fsync(fout.fileno())
    return linked


def can_reflink(directory: str) -> bool:
    """Probe: does the filesystem under `directory` share extents?"""
    a = os.path.join(directory, ".reflink-probe-a")
    b = os.path.join(directory, ".reflink-probe-b")
    try:
        with open(a, "w+b") as fa:
            fa.write(b"x" * 4096)
            fa.flush()
            with open(b, "wb") as fb:
                return reflink(fa.fileno(), fb.fileno())
    finally:
        for p in (a, b):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
