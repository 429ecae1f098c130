"""Staging and target paths on the node, reached without following symbolic links.

A path from a request names where a volume goes. If any part of it were a symbolic link,
mount(8) and the kernel would follow it and mount the volume (or unmount something)
elsewhere — a workload able to plant a link in a kubelet directory could steer volumes onto
host paths. So paths with links are refused up front (`first_symlink`), and what the node
creates and mounts onto is reached by walking the path one component at a time with
O_NOFOLLOW, holding a descriptor of each directory (`pinned`, `make_dirs`, `create_file`):
a link swapped in between the check and the mount is then not followed either, because
mount(8) is handed /proc/<pid>/fd/<n> of the descriptor, which the kernel resolves to the
very object that was opened.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from csi.errors import invalid, shown

_DIR = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def first_symlink(path: str) -> str | None:
    """The first prefix of the absolute, normalised `path` that is a symbolic link, or None.
    Parts that do not exist yet are no links (the node creates them, without following)."""
    current = "/"
    for part in path.strip("/").split("/"):
        if not part:
            continue
        current = os.path.join(current, part)
        try:
            st = os.lstat(current)
        except (FileNotFoundError, NotADirectoryError):
            return None
        if stat.S_ISLNK(st.st_mode):
            return current
    return None


def _refuse(path: str) -> Exception:
    return invalid(f"{shown(path)} goes through a symbolic link; give the path it stands for")


def _open_parent(path: str, stack: ExitStack, create: bool, mode: int = 0o750) -> tuple[int, str]:
    """A descriptor of path's parent directory, reached component by component without
    following links (creating missing directories when `create`), and the last name."""
    parts = [p for p in path.split("/") if p]
    if not parts:
        raise invalid("the root directory cannot hold a volume")
    fd = os.open("/", _DIR)
    stack.callback(os.close, fd)
    for part in parts[:-1]:
        try:
            child = os.open(part, _DIR, dir_fd=fd)
        except FileNotFoundError:
            if not create:
                raise
            try:
                os.mkdir(part, mode, dir_fd=fd)
            except FileExistsError:
                pass  # made meanwhile: opened below, still without following
            child = _open_dir(part, fd, path)
        except OSError as exc:
            if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                raise _refuse(path) from None
            raise
        stack.callback(os.close, child)
        fd = child
    return fd, parts[-1]


def _open_dir(name: str, dir_fd: int, path: str) -> int:
    try:
        return os.open(name, _DIR, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ENOTDIR, errno.ELOOP):
            raise _refuse(path) from None
        raise


def make_dirs(path: str, mode: int = 0o750) -> None:
    """`os.makedirs(path, exist_ok=True)` that never follows a link, nor makes one's target."""
    with ExitStack() as stack:
        parent, name = _open_parent(path, stack, create=True, mode=mode)
        try:
            os.mkdir(name, mode, dir_fd=parent)
        except FileExistsError:
            pass
        os.close(_open_dir(name, parent, path))


def create_file(path: str, mode: int = 0o600) -> None:
    """Create an empty regular file (a block volume's bind target); parents are made as
    with make_dirs. An existing entry of that name is FileExistsError."""
    with ExitStack() as stack:
        parent, name = _open_parent(path, stack, create=True)
        os.close(os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, mode,
                         dir_fd=parent))


@contextmanager
def pinned(path: str) -> Iterator[str]:
    """A name for exactly the directory or file at `path` as it is now, reached without
    following links: /proc/<pid>/fd/<n> of an O_PATH descriptor, for mount(8) run with
    --no-canonicalize. The descriptor is closed on leaving (an open one keeps a mount busy)."""
    with ExitStack() as stack:
        parent, name = _open_parent(path, stack, create=False)
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
        stack.callback(os.close, fd)
        if stat.S_ISLNK(os.fstat(fd).st_mode):
            raise _refuse(path)
        yield f"/proc/{os.getpid()}/fd/{fd}"
