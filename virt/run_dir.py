"""A VM's run directory on one node, and the host files QEMU is handed from it.

The run directory (`DATA_DIR/vms/NS/NAME/NODE`) is root's alone (0700) and is not in QEMU's
sandbox at all: root makes every file QEMU needs there itself — serial log, firmware
variables, cloud-init seed, emptyDisks, QEMU's stderr — never through a link (O_NOFOLLOW,
regular files only), and QEMU inherits them as open descriptors (`-add-fd`), its QMP and
console sockets as listening sockets root bound. A compromised QEMU thus has no path into the
directory, so nothing there can have been swapped for a link to a host file by the time root
opens it again. A run directory that is not root's own (made by an older pvlun, which handed
it to the sandbox user) is removed without following links and made again.

Sockets live in the run directory when their path fits a unix socket address (108 bytes);
otherwise under `/run/pvlun/vm-sockets/<digest>` (root's, 0700, ownership checked), with a
symbolic link of root's in the run directory naming them (`pvlun console` finds them there).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import stat
from pathlib import Path
from typing import Callable

from host.sandbox import open_no_follow

SOCKET_ROOT = "/run/pvlun/vm-sockets"
_SOCKET_MAX = 100  # bytes of a unix socket path, with room to spare (sun_path holds 108)


def _private(st: os.stat_result) -> bool:
    """A directory only this (root) process's user can change."""
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o077


def prepare_run_dir(path: str | os.PathLike) -> Path:
    """The run directory, root's and private; anything else in its place (a directory handed
    to the sandbox user, a link) is removed first, without following links."""
    path = Path(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None and not _private(st):
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(path)  # never follows a link (it removes the link itself)
        else:
            os.unlink(path)
        st = None
    if st is None:
        os.mkdir(path, 0o700)
    return path


def open_file(path: str | os.PathLike, flags: int) -> int:
    """A file of the run directory, opened for QEMU to inherit (regular files only)."""
    return open_no_follow(str(path), flags | os.O_CREAT)


def create_atomically(path: str | os.PathLike, fill: Callable[[int], None]) -> None:
    """Make `path` whole or not at all: `fill` writes a fresh private temporary file, which then
    replaces `path` — a failure (a full disk, a limit) leaves no partial file to run with."""
    path = Path(path)
    partial = path.with_name(path.name + ".part")
    try:
        os.unlink(partial)
    except FileNotFoundError:
        pass
    fd = open_no_follow(str(partial), os.O_RDWR | os.O_CREAT | os.O_EXCL)
    try:
        fill(fd)
        os.fsync(fd)
        os.replace(partial, path)
    except BaseException:
        os.unlink(partial)
        raise
    finally:
        os.close(fd)


def copy_into(source: str, path: str | os.PathLike) -> None:
    """`path` made (atomically) a copy of the file `source` names (firmware variables' template)."""
    with open(source, "rb") as f:
        data = f.read()

    def write(fd: int) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]

    create_atomically(path, write)


def socket_path(run_dir: Path, name: str) -> str:
    """run_dir/name, or its stand-in under SOCKET_ROOT when that is too long for a unix socket."""
    path = str(run_dir / name)
    if len(path.encode()) < _SOCKET_MAX:
        return path
    digest = hashlib.sha256(os.path.abspath(run_dir).encode()).hexdigest()[:16]
    return os.path.join(SOCKET_ROOT, digest, name)


def listen_unix(path: str, run_dir: Path) -> socket.socket:
    """A listening socket at `path` (bound by root in a private directory), for QEMU to inherit."""
    directory = os.path.dirname(path)
    if Path(directory) != run_dir:
        _private_socket_dir(directory)
        link = run_dir / os.path.basename(path)  # a findable name in the run dir
        if os.path.lexists(link):
            os.unlink(link)
        os.symlink(path, link)
    if os.path.lexists(path):
        os.unlink(path)  # a socket of an earlier run, in a directory only root writes
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(4)
    except BaseException:
        sock.close()
        raise
    return sock


def _private_socket_dir(directory: str) -> None:
    """SOCKET_ROOT/<digest>: SOCKET_ROOT is made private or must be; the VM's own directory
    in it is root's (made, or kept only when it is a private directory already)."""
    root = os.path.dirname(directory)
    os.makedirs(root, mode=0o700, exist_ok=True)
    for path in (os.path.dirname(root), root):
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
            raise PermissionError(f"{path} must be a directory of root's that no one else may write")
    os.chmod(root, 0o700)
    prepare_run_dir(directory)


def remove_sockets(paths: list[str], run_dir: Path) -> None:
    """A dead QEMU's sockets, their stand-in links and directory (nothing of them lingers)."""
    for path in paths:
        for stale in (path, str(run_dir / os.path.basename(path))):
            try:
                os.unlink(stale)
            except FileNotFoundError:
                pass
        if Path(os.path.dirname(path)) != run_dir:
            try:
                os.rmdir(os.path.dirname(path))
            except OSError:
                pass  # the other socket is still there, or it is gone already
