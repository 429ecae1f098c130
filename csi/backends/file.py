"""Backend `file`: one sparse raw file per LUN in a pool directory.

volumes/<volume-id>.img and snapshots/<snapshot-id>.img. New files are written under a
temporary name and renamed into place, so a crash never leaves a half-made LUN under a
real name; `remove_leftovers` sweeps the temporaries at start-up.
"""

from __future__ import annotations

import os
from contextlib import ExitStack

from csi.backends.copy import can_reflink, copy_file, reflink, sparse_copy

SUFFIX = ".img"
TEMP_PREFIX = ".tmp-"


class FileBackend:
    name = "file"

    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        self.volumes_dir = os.path.join(self.root, "volumes")
        self.snapshots_dir = os.path.join(self.root, "snapshots")
        os.makedirs(self.volumes_dir, exist_ok=True)
        os.makedirs(self.snapshots_dir, exist_ok=True)
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
        with open(temp, "wb") as f:
            os.ftruncate(f.fileno(), size)
        self._publish(temp, final)

    def clone_volume(self, volume_id: str, source_volume_id: str, size: int) -> None:
        self._copy_in(self.volume_path(source_volume_id), self.volume_path(volume_id), size)

    def restore_volume(self, volume_id: str, snapshot_id: str, size: int) -> None:
        self._copy_in(self.snapshot_path(snapshot_id), self.volume_path(volume_id), size)

    def delete_volume(self, volume_id: str) -> None:
        _unlink(self.volume_path(volume_id))
        _unlink(self._temp(self.volume_path(volume_id)))

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
                dst = stack.enter_context(open(temp, "xb"))
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
        _unlink(self.snapshot_path(snapshot_id))
        _unlink(self._temp(self.snapshot_path(snapshot_id)))

    def volume_exists(self, volume_id: str) -> bool:
        return os.path.exists(self.volume_path(volume_id))

    def volume_size(self, volume_id: str) -> int:
        return os.stat(self.volume_path(volume_id)).st_size

    def allocated_bytes(self, volume_id: str) -> int:
        return os.stat(self.volume_path(volume_id)).st_blocks * 512

    def publish_context(self, volume_id: str, node_id: str) -> dict[str, str]:
        return {"lunPath": self.volume_path(volume_id)}

    def capacity(self) -> tuple[int, int]:
        """(total, available) bytes of the pool's filesystem."""
        st = os.statvfs(self.root)
        return st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize

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
