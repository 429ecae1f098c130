"""The pool image holds real host space for every byte it promises.

A loop-mounted XFS image that is sparse on the host promises what the host may not have: its
filesystem says "free", a volume is provisioned, and the write that needs a host block finds
the data dir's filesystem full (the loop device's "critical space allocation error", then the
catalog's "database or disk is full" beside it). Measuring the host's free space when a
volume is made does not help either: anything written to the host later (pvlun's own scratch
copies of images, the catalog, other programs) takes the blocks the image was counting on.

So the image is allocated for real (fallocate, no holes) and grows only as provisioning
needs it: made at a fraction of `--pool-size` (its maximum), grown by what a new volume or
snapshot needs (fallocate, `losetup --set-capacity`, `xfs_growfs`) while the host filesystem
can give it and keep a reserve for the catalog and scratch copies, refused
(RESOURCE_EXHAUSTED) when it cannot. Once allocated, the bytes are the pool's whatever else
fills the host. XFS does not shrink: space freed inside the pool stays the pool's.

An image made sparse by an older pvlun is measured as it is: its free space counts only as
far as the host could fill the holes under it. A pool directory on the data dir's own
filesystem (one that reflinks, or `--pool` there) keeps the same reserve out of its free space.
"""

from __future__ import annotations

import errno
import logging
import math
import os
from dataclasses import dataclass, replace

from csi.capacity import RESERVE_FRACTION, PoolSpace, human
from host.command import output, run

log = logging.getLogger("pvlun.pool")
MiB, GiB = 1 << 20, 1 << 30
MIN_IMAGE = 320 * MiB  # mkfs.xfs makes nothing smaller than 300 MB (its log alone takes 64 MiB)
MAX_INITIAL = 1 * GiB  # every byte of the image is the host's at once: start small, grow on demand
INITIAL_FRACTION = 64  # a new image is 1/64 of its maximum (within the bounds above)
GROW_ALIGN = 64 * MiB  # the image grows by multiples of this
GROW_STEP_FRACTION = 4  # and by at least a quarter of its size
GROWTH_OVERHEAD = 128  # of the bytes an image grows by, 1/128 goes to XFS's own metadata
HOST_RESERVE_MIN, HOST_RESERVE_MAX = 64 * MiB, 1 * GiB  # kept free on the host: 1% within these


def host_reserve(total: int) -> int:
    """What the data dir's filesystem keeps free for the catalog, scratch copies and logs."""
    return max(HOST_RESERVE_MIN, min(HOST_RESERVE_MAX, total // 100))


def host_room(path: str) -> tuple[int, int]:
    """(bytes the pool may still take from the filesystem holding `path`, the reserve kept)."""
    st = os.statvfs(path)
    reserve = host_reserve(st.f_blocks * st.f_frsize)
    return st.f_bavail * st.f_frsize - reserve, reserve


def initial_size(max_size: int, room: int, reserve: int) -> int:
    """The size a new image starts at: 1/64 of its maximum, at least MIN_IMAGE, at most
    MAX_INITIAL, and no more than the host can give. OSError (ENOSPC) when it cannot give
    MIN_IMAGE: a pool that small could not hold a thing."""
    if max_size < MIN_IMAGE:
        raise ValueError(f"the pool size must be at least {human(MIN_IMAGE)}, not {human(max_size)}")
    size = min(max_size, max(MIN_IMAGE, min(MAX_INITIAL, max_size // INITIAL_FRACTION)))
    if room < MIN_IMAGE:
        raise OSError(errno.ENOSPC, f"the data dir's filesystem has {human(max(0, room + reserve))} free; a pool "
                                    f"needs {human(MIN_IMAGE)} of it and {human(reserve)} more stays free for "
                                    "the catalog and scratch copies")
    return min(size, room // MiB * MiB)


def allocate(path: str, offset: int, length: int) -> None:
    """Give the file real blocks for [offset, offset+length), extending it; on failure the
    file is cut back to its old size so no half-allocation stays behind."""
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        old = os.fstat(fd).st_size
        try:
            os.posix_fallocate(fd, offset, length)
        except OSError:
            os.ftruncate(fd, old)
            raise
        os.fsync(fd)
    finally:
        os.close(fd)


def loop_device_of(image: str) -> str | None:
    """The loop device the image is mounted through (the first one `losetup -j` lists)."""
    lines = output(["losetup", "-j", image]).splitlines()
    return lines[0].split(":", 1)[0] if lines else None


def fit_filesystem(image: str, root: str) -> None:
    """Make the mounted XFS as large as its image (also after a growth a crash cut short)."""
    device = loop_device_of(image)
    if device:
        run(["losetup", "--set-capacity", device], timeout=60)
    run(["xfs_growfs", "-d", root], timeout=120)


@dataclass
class PoolBacking:
    """The host filesystem behind the pool: how far the pool's free space is real, how much it
    may still grow, and the growing itself. `image` None: a pool directory, on the data dir's
    filesystem when `shares_host` (the reserve comes out of its free space), else on one of
    its own (nothing to do)."""

    data_dir: str
    image: str | None = None
    root: str | None = None
    max_size: int = 0
    shares_host: bool = False

    def adjust(self, space: PoolSpace) -> PoolSpace:
        room, reserve = host_room(self.data_dir)
        if self.image is None:
            return replace(space, free=max(0, space.free - reserve)) if self.shares_host else space
        st = os.stat(self.image)
        holes = max(0, st.st_size - st.st_blocks * 512)  # an image an older pvlun made sparse
        unfillable = max(0, min(holes, space.free) - max(0, room))
        room -= min(holes, space.free)
        image_growth = max(0, min(self.max_size - st.st_size, room)) // MiB * MiB
        growable = image_growth - image_growth // GROWTH_OVERHEAD - image_growth // RESERVE_FRACTION
        note = ""
        if unfillable or image_growth < self.max_size - st.st_size:
            have = (f"may grow by {human(image_growth)} more (up to {human(self.max_size)})" if not unfillable else
                    f"image has {human(holes)} of holes the host could not fill")
            note = (f"; the pool {have}, as its host filesystem has {human(max(0, room + reserve))} free and keeps "
                    f"{human(reserve)} for the catalog and scratch copies")
        return replace(space, free=max(0, space.free - unfillable), growable=max(0, growable), note=note)

    def grow(self, usable: int) -> None:
        """Grow the image so that at least `usable` more bytes are usable, or as far as the
        host and --pool-size allow (the caller measures again)."""
        assert self.image is not None and self.root is not None
        size = os.stat(self.image).st_size
        room, _ = host_room(self.data_dir)
        want = math.ceil(usable * (1 + 1 / GROWTH_OVERHEAD + 1 / RESERVE_FRACTION)) + MiB
        want = max(want, size // GROW_STEP_FRACTION)  # grow in steps that grow with the pool: few xfs_growfs
        by = min(-(-want // GROW_ALIGN) * GROW_ALIGN, self.max_size - size, room) // MiB * MiB
        if by <= 0:
            return
        allocate(self.image, size, by)
        fit_filesystem(self.image, self.root)
        log.info("pool image grown by %s to %s", human(by), human(size + by))
