"""Thin provisioning that never turns into I/O errors by surprise.

The pool's *usable* space is what its LUN files could ever hold: the bytes free now plus
the bytes they hold now (shared extents once), less a reserve for the metadata of files
that fill up (block maps, copy-on-write remapping). It comes from the filesystem itself
(statvfs: after its own metadata, log and reserved blocks), not from the image size, and
it does not change when volumes are written — only when something else takes space.

A pool that is a loop-mounted image on the data dir's filesystem grows as provisioning needs
it, on space it really takes from the host (csi/pool_image.py): its usable space counts what
it may still grow by, and a new volume or snapshot first grows it to back every provisioned
byte. Past overcommit 1 the image is sparse at its whole size instead (thin for real: the
host gives blocks as LUNs are written), and its usable space counts only the holes the host
could fill now.

*Provisioned* is the sum of every volume's size and every snapshot's size: a reflink
snapshot or clone costs nothing when it is taken but up to its size once its source is
rewritten. At `--overcommit 1.0` (the default) provisioned may not exceed usable, so every
volume can be written in full, after any number of snapshots, without ENOSPC. Past 1.0 the
pool is thin for real: its *real use* (bytes held / usable) is what warns (80%, 90%) and,
above 95%, refuses new snapshots and clones, which would only make the pool fill faster.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from csi.catalog import Catalog
from csi.errors import exhausted

MiB = 1 << 20
RESERVE_FRACTION = 100  # 1% of the filesystem ...
RESERVE_MIN = 4 * MiB  # ... and never less than this, for metadata of files that fill up
REFUSE_SNAPSHOTS_ABOVE = 0.95  # real use past which overcommitted pools take no new snapshots or clones
MEASURE_EVERY = 2.0  # seconds a measurement of the pool is reused


def human(size: int) -> str:
    """Bytes as a person reads them (binary units, as Kubernetes quantities are)."""
    value = float(size)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _count(n: int, thing: str) -> str:
    return f"{n} {thing}" if n == 1 else f"{n} {thing}s"


@dataclass(frozen=True)
class PoolSpace:
    """What the pool's filesystem says, as `FileBackend.space()` measures it."""

    free: int  # bytes new data may take now (statvfs f_bavail, as far as the host backs it)
    held: int  # bytes the LUN files hold (shared extents once)
    filesystem: int  # the filesystem's size (statvfs f_blocks)
    growable: int = 0  # usable bytes the pool may still add by growing (an image on the host)
    note: str = ""  # what limits the growth, for a refusal to say

    @property
    def usable(self) -> int:
        """What the LUN files could hold in the pool as it is now."""
        return max(0, self.free + self.held - max(RESERVE_MIN, self.filesystem // RESERVE_FRACTION))

    @property
    def capacity(self) -> int:
        """What they could hold once the pool has grown as far as it may."""
        return self.usable + self.growable


@dataclass(frozen=True)
class PoolUsage:
    """The pool as the control plane and /metrics see it."""

    usable: int  # what the LUNs could hold, the pool grown as far as it may
    used: int  # bytes held by LUN files
    provisioned: int  # volume sizes + snapshot sizes
    overcommit: float

    @property
    def used_ratio(self) -> float:
        return self.used / self.usable if self.usable else 1.0


class Capacity:
    """The provisioning ledger of one pool: a running sum of what is provisioned, checked
    against usable x overcommit. `check_room` and `account` are called with `lock` held,
    so concurrent creates never promise the same bytes twice; LUN files are removed with
    it held too, so a measurement never counts a file's bytes both as held and as free."""

    def __init__(self, catalog: Catalog, measure: Callable[[], PoolSpace], overcommit: float = 1.0,
                 grow: Callable[[int], None] | None = None):
        if not overcommit > 0 or overcommit == float("inf"):
            raise ValueError(f"the overcommit ratio must be a positive number, not {overcommit}")
        self.catalog = catalog
        self._measure = measure
        self._grow = grow  # grow(usable bytes): make the pool hold at least that much more
        self.overcommit = overcommit
        self.lock = threading.RLock()
        self._provisioned: int | None = None  # loaded from the catalog once
        self._space: tuple[float, PoolSpace] | None = None

    def space(self, fresh: bool = False) -> PoolSpace:
        """The pool measured, reused for MEASURE_EVERY seconds unless `fresh`: usable space
        only moves when something other than our LUNs takes space, so a short reuse is safe."""
        with self.lock:
            if fresh or self._space is None or time.monotonic() - self._space[0] > MEASURE_EVERY:
                self._space = (time.monotonic(), self._measure())
            return self._space[1]

    def provisioned(self) -> int:
        if self._provisioned is None:
            self._provisioned = self.catalog.provisioned_bytes()
        return self._provisioned

    def forget(self) -> None:
        """Recount from the catalog on next use (after start-up repair)."""
        self._provisioned = None
        self._space = None

    def account(self, delta: int) -> None:
        """Keep the running sum in step with the catalog. Call with `lock` held."""
        if self._provisioned is not None:
            self._provisioned += delta

    def limit(self, space: PoolSpace) -> int:
        return int(space.capacity * self.overcommit)

    def check_room(self, grow: int, asked: str, volume: bool = True) -> None:
        """Refuse `grow` more provisioned bytes unless the pool can keep the promise, growing
        the pool first if it must; a volume also no larger than the free bytes of the moment
        and what the pool may grow by (a snapshot takes none now). Call with `lock` held."""
        space = self.space()
        provisioned, limit = self.provisioned(), self.limit(space)
        if provisioned + grow > limit:
            volumes, snapshots = self.catalog.count_volumes(), self.catalog.count_snapshots()
            of = f"{human(limit)} usable" if self.overcommit == 1 else \
                f"{human(limit)} ({human(space.capacity)} usable x overcommit {self.overcommit:g})"
            raise exhausted(
                f"not enough room in the pool: {human(provisioned)} is provisioned to {_count(volumes, 'volume')} "
                f"and {_count(snapshots, 'snapshot')}, of {of}{space.note}; {human(max(0, limit - provisioned))} "
                f"is left and {asked}. Delete volumes or snapshots you no longer need, or give the pool more space")
        # usable bytes that keep every promise (the limit above says the pool can have them);
        # a pool that grows (a thick image) backs every provisioned byte
        need = min(math.ceil((provisioned + grow) / self.overcommit), space.capacity)
        space = self._grown(space, min(provisioned + grow, space.capacity))
        if need > space.usable:
            raise exhausted(f"the pool could not grow to hold {human(need)} ({human(space.usable)} now{space.note}) "
                            f"and {asked}")
        if volume and grow > space.free + space.growable:
            raise exhausted(f"the pool has {human(space.free + space.growable)} free now{space.note} and {asked}")

    def _grown(self, space: PoolSpace, usable: int) -> PoolSpace:
        """Grow the pool until it has `usable` usable bytes, or it cannot."""
        for _ in range(3):  # XFS's metadata takes a little more or less than estimated
            short = usable - space.usable
            if short <= 0 or self._grow is None or space.growable <= 0:
                break
            self._grow(short)
            space = self.space(fresh=True)
        return space

    def check_real_use(self, what: str) -> None:
        """Past overcommit 1.0, refuse a new snapshot or clone while the pool is nearly full
        for real: each would take bytes the volumes already promised may need."""
        if self.overcommit <= 1:
            return
        space = self.space(fresh=True)
        ratio = space.held / space.capacity if space.capacity else 1.0
        if ratio > REFUSE_SNAPSHOTS_ABOVE:
            raise exhausted(
                f"the pool is {ratio:.0%} full ({human(space.held)} of {human(space.capacity)} usable hold data) and "
                f"overcommitted x{self.overcommit:g}: no new {what} above {REFUSE_SNAPSHOTS_ABOVE:.0%}, "
                "or the volumes could not be written. Free space first (delete snapshots or volumes)")

    def available(self) -> int:
        """What a new volume may still take (GetCapacity): the smaller of the free bytes and
        what the provisioning limit leaves."""
        with self.lock:
            space = self.space()
            return max(0, min(space.free + space.growable, self.limit(space) - self.provisioned()))

    def usage(self, fresh: bool = False) -> PoolUsage:
        space = self.space(fresh)
        return PoolUsage(space.capacity, space.held, self.provisioned(), self.overcommit)
