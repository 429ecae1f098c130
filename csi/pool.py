"""Where the LUN pool lives. On a filesystem without reflinks, and as root, pvlun makes
an XFS image with reflink=1 and mounts it as the pool, so snapshots and clones take
constant time whatever the volume size. The image holds real host space and grows with what
is provisioned (csi/pool_image.py). The data dir, the pool (directory, image and the
image's mounted root) are private to the daemon's user: 0700 directories, a 0600 image,
also when they existed before (deploy/ makes the data dir as a hostPath, mode 0755)."""

from __future__ import annotations

import logging
import os

from csi.backends.copy import can_reflink
from csi.backends.file import DIR_MODE, FILE_MODE, make_private
from csi.pool_image import PoolBacking, allocate, fit_filesystem, host_room, initial_size
from host.command import CommandError, run

log = logging.getLogger("pvlun.pool")
GiB = 1 << 30
MAX_DEFAULT_POOL_SIZE = 256 * GiB
DEFAULT_POOL_SIZE = 0  # 0: choose with default_pool_size() when the image is made


def default_pool_size(data_dir: str) -> int:
    """The most the pool image may grow to when no --pool-size is given: 90% of the size of
    the data dir's filesystem, at most 256 GiB, rounded down to GiB. The image starts small
    and grows on the host's free space as volumes are provisioned (csi/pool_image.py), so a
    nearly full host still provisions what it really has room for."""
    st = os.statvfs(data_dir)
    total = st.f_blocks * st.f_frsize
    return max(GiB, min(MAX_DEFAULT_POOL_SIZE, total * 9 // 10) // GiB * GiB)


def private_dir(path: str) -> str:
    """Make `path` (and missing parents) a directory only its owner may enter; returns it."""
    os.makedirs(path, mode=DIR_MODE, exist_ok=True)
    make_private(path, DIR_MODE)
    return path


def is_mountpoint(path: str) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def prepare_pool(data_dir: str, pool: str | None = None, pool_size: int | None = DEFAULT_POOL_SIZE,
                 make_xfs: bool = True, thin: bool = False) -> str:
    """Return the pool directory, making and mounting a reflink XFS image if that helps
    (`pool_size` 0 or None: default_pool_size()). `thin` (overcommit past 1): the image is
    sparse at its whole size, its blocks taken from the host as LUNs are written; else it
    holds real blocks and grows as provisioning needs them."""
    if pool:
        return private_dir(os.path.abspath(pool))
    root = private_dir(os.path.join(data_dir, "pool"))
    image = os.path.join(data_dir, "pool.img")
    if os.path.exists(image):
        make_private(image, FILE_MODE)
    if is_mountpoint(root):
        return private_dir(root)
    if os.path.exists(image) or (make_xfs and os.geteuid() == 0 and not can_reflink(root)):
        try:
            _mount_xfs_image(image, root, pool_size or default_pool_size(data_dir), thin)
        except CommandError as exc:
            log.warning("cannot make a reflink XFS pool (%s); using plain copies in %s", exc, root)
        else:
            make_private(root, DIR_MODE)  # the root of the mounted filesystem (mkfs makes it 0755)
    return root


def _mount_xfs_image(image: str, root: str, max_size: int, thin: bool) -> None:
    made = not os.path.exists(image)
    if made:
        if os.path.lexists(image + ".new"):
            os.unlink(image + ".new")  # left by a start-up that died in mkfs
        size = initial_size(max_size, *host_room(os.path.dirname(image)))
        os.close(os.open(image + ".new", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         FILE_MODE))
        if thin:
            os.truncate(image + ".new", max(size, max_size))  # sparse: thin provisioning was asked for
        else:
            allocate(image + ".new", 0, size)  # real blocks: what the pool promises, the host has
        # -K: no discard, which on an image file would punch the allocation out again; two
        # allocation groups to start with, as growing adds more of the same size
        run(["mkfs.xfs", "-q", "-K", "-m", "reflink=1", "-d", "agcount=2", image + ".new"], timeout=120)
        os.replace(image + ".new", image)
    run(["mount", "-o", "loop", image, root], timeout=60)  # autoclear: umount frees the loop device
    # direct I/O on the pool's own loop device: the LUNs' data is not cached a second time
    # in the host page cache, and a LUN's flush does not have to write back everybody's
    for line in run(["losetup", "-j", image], timeout=60).stdout.decode().splitlines():
        run(["losetup", "--direct-io=on", line.split(":", 1)[0]], timeout=60)
    if not made:
        if thin and os.stat(image).st_size < max_size:
            os.truncate(image, max_size)  # a pool made thick, now overcommitted: the rest is thin
        fit_filesystem(image, root)  # a growth a crash cut short between fallocate and xfs_growfs
    log.info("pool: XFS reflink image %s mounted on %s", image, root)


def pool_backing(data_dir: str, root: str, pool_size: int | None = DEFAULT_POOL_SIZE,
                 thin: bool = False) -> PoolBacking:
    """What stands behind the pool at `root` on the host: our image (grown up to `pool_size`,
    default_pool_size() when 0; a thin one is already as large as it gets), a directory on the
    data dir's own filesystem, or one elsewhere."""
    image = os.path.join(data_dir, "pool.img")
    if os.path.realpath(root) == os.path.realpath(os.path.join(data_dir, "pool")) and os.path.exists(image) \
            and is_mountpoint(root):
        size = os.stat(image).st_size
        max_size = size if thin else max(pool_size or default_pool_size(data_dir), size)
        return PoolBacking(data_dir, image, root, max_size)
    return PoolBacking(data_dir, shares_host=os.stat(root).st_dev == os.stat(data_dir).st_dev)


def release_pool(data_dir: str) -> None:
    """Unmount a pool image we mounted, if nothing holds it (published LUNs keep it busy)."""
    root = os.path.join(data_dir, "pool")
    if os.path.exists(os.path.join(data_dir, "pool.img")) and is_mountpoint(root):
        try:
            run(["umount", root], timeout=60)
        except CommandError as exc:
            log.info("pool stays mounted: %s", exc)
