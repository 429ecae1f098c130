"""Backend `file`: one sparse raw file per LUN in a pool directory.

volumes/<volume-id>.img and snapshots/<snapshot-id>.img. New files are written under a
temporary name and renamed into place, so a crash never leaves a half-made LUN under a
real name; `remove_leftovers` sweeps the temporaries at start-up. Volumes are private to
their owner: the pool's directories are 0700 and every LUN file 0600, also when they were
made before (by an older version, by hand, under a umask) — fixed when the backend opens.
"""

from __future__ import annotations

import os
import stat
from contextlib import ExitStack

from csi.backends.copy import can_reflink, copy_file, new_private_file, reflink, sparse_copy
from csi.backends.extents import allocated_bytes
from csi.capacity import PoolSpace

SUFFIX = ".img"
TEMP_PREFIX = ".tmp-"
DIR_MODE, FILE_MODE = 0o700, 0o600


def make_private(path: str, mode: int) -> None:
    """Set mode on path unless it is a symbolic link (never chmod a link's target)."""
    st = os.lstat(path)
    if not stat.S_ISLNK(st.st_mode) and stat.S_IMODE(st.st_mode) != mode:
        os.chmod(path, mode)


class FileBackend:
    name = "file"

    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        self.volumes_dir = os.path.join(self.root, "volumes")
        self.snapshots_dir = os.path.join(self.root, "snapshots")
        for directory in (self.root, self.volumes_dir, self.snapshots_dir):
            os.makedirs(directory, mode=DIR_MODE, exist_ok=True)
            make_private(directory, DIR_MODE)
        for directory in (self.volumes_dir, self.snapshots_dir):
            for name in os.listdir(directory):
                make_private(os.path.join(directory, name), FILE_MODE)
        self.reflinks = can_reflink(self.volumes_dir)

    # paths: IDs are validated by the caller against a strict pattern before they get here
    def volume_path(self, volume_id: str) -> str:
        return os.path.join(self.volumes_dir, volume_id + SUFFIX)

    def snapshot_path(self, snapshot_id: str) -> str:
        return os.path.join(self.snapshots_dir, snapshot_id + SUFFIX)

    @staticmethod
    def _temp(path: str) -> str:
        head, tail = os.path.split(path)
        return os.path.join(head, TEMP_PREFIX + tail)

    def _publish(self, temp: str, final: str) -> None:
        os.replace(temp, final)
        fd = os.open(os.path.dirname(final), os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _copy_in(self, src: str, final: str, size: int | None) -> None:
        temp = self._temp(final)
        _unlink(temp)
        copy_file(src, temp, size)
        self._publish(temp, final)

    # LUN operations
    def create_volume(self, volume_id: str, size: int) -> None:
        final = self.volume_path(volume_id)
        temp = self._temp(final)
        _unlink(temp)
        fd = new_private_file(temp)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
        self._publish(temp, final)

    def clone_volume(self, volume_id: str, source_volume_id: str, size: int) -> None:
        self._copy_in(self.volume_path(source_volume_id), self.volume_path(volume_id), size)

    def restore_volume(self, volume_id: str, snapshot_id: str, size: int) -> None:
        self._copy_in(self.snapshot_path(snapshot_id), self.volume_path(volume_id), size)

    def delete_volume(self, volume_id: str) -> None:
        _discard(self.volume_path(volume_id))
        _discard(self._temp(self.volume_path(volume_id)))

    def expand_volume(self, volume_id: str, size: int) -> None:
        with open(self.volume_path(volume_id), "r+b") as f:
            if os.fstat(f.fileno()).st_size < size:
                os.ftruncate(f.fileno(), size)
                os.fsync(f.fileno())

    def create_snapshot(self, snapshot_id: str, volume_id: str) -> None:
        self._copy_in(self.volume_path(volume_id), self.snapshot_path(snapshot_id), None)

    def create_snapshots(self, pairs: list[tuple[str, str]]) -> None:
        """Snapshot several volumes at one instant: every source is opened and flushed
        first, then all reflinks are taken back to back (microseconds apart), and only
        then are the copies renamed into place."""
        with ExitStack() as stack:
            staged = []
            for snapshot_id, volume_id in pairs:
                src = stack.enter_context(open(self.volume_path(volume_id), "rb"))
                temp = self._temp(self.snapshot_path(snapshot_id))
                _unlink(temp)
                dst = stack.enter_context(open(new_private_file(temp), "wb"))
                os.fsync(src.fileno())
                staged.append((src, dst, temp, snapshot_id))
            for src, dst, _, _ in staged:
                if not reflink(src.fileno(), dst.fileno()):
                    size = os.fstat(src.fileno()).st_size
                    os.ftruncate(dst.fileno(), size)
                    sparse_copy(src.fileno(), dst.fileno(), size)
            for _, dst, temp, snapshot_id in staged:
                os.fsync(dst.fileno())
                self._publish(temp, self.snapshot_path(snapshot_id))

    def delete_snapshot(self, snapshot_id: str) -> None:
        _discard(self.snapshot_path(snapshot_id))
        _discard(self._temp(self.snapshot_path(snapshot_id)))

    def volume_exists(self, volume_id: str) -> bool:
        return os.path.exists(self.volume_path(volume_id))

    def volume_size(self, volume_id: str) -> int:
        return os.stat(self.volume_path(volume_id)).st_size

    def allocated_bytes(self, volume_id: str) -> int:
        return os.stat(self.volume_path(volume_id)).st_blocks * 512

    def publish_context(self, volume_id: str, node_id: str) -> dict[str, str]:
        return {"lunPath": self.volume_path(volume_id)}

    def space(self) -> PoolSpace:
        """The pool's filesystem and what the LUN files hold. The files are measured before
        the filesystem, so bytes written meanwhile are missed as held rather than counted
        twice: usable space comes out a little low, never high."""
        paths = [os.path.join(d, n) for d in (self.volumes_dir, self.snapshots_dir) for n in os.listdir(d)]
        held = allocated_bytes(paths)
        st = os.statvfs(self.root)
        return PoolSpace(free=st.f_bavail * st.f_frsize, held=held, filesystem=st.f_blocks * st.f_frsize)

    def stored_ids(self) -> tuple[set[str], set[str]]:
        """IDs of the volume and snapshot files really in the pool."""
        def ids(directory: str) -> set[str]:
            return {n[: -len(SUFFIX)] for n in os.listdir(directory)
                    if n.endswith(SUFFIX) and not n.startswith(TEMP_PREFIX)}
        return ids(self.volumes_dir), ids(self.snapshots_dir)

    def remove_leftovers(self) -> list[str]:
        """Delete temporaries a crash left behind; returns what was removed."""
        removed = []
        for directory in (self.volumes_dir, self.snapshots_dir):
            for n in os.listdir(directory):
                if n.startswith(TEMP_PREFIX) or n.startswith(".reflink-probe"):
                    _unlink(os.path.join(directory, n))
                    removed.append(n)
        return removed


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _discard(path: str) -> None:
    """Delete a LUN file, its blocks freed before this returns: emptied first, then unlinked.
    An unlinked file's blocks are freed later, in the background (XFS inode GC), and until
    then the pool would look smaller than it is - a volume deleted to make room would not
    make room at once."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    except OSError:
        fd = -1  # not a file we can empty (a link): unlink it as it is
    if fd >= 0:
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)
    _unlink(path)
