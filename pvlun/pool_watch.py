"""The pool's real use where people look: Prometheus gauges on the daemon's /metrics, and a
Warning event the first time an overcommitted pool passes 80% and 90% real use.

Real use is bytes the LUNs hold / usable bytes of the pool (csi/capacity.py). With
`--overcommit 1.0` every volume fits by construction, so only overcommitted pools warn; past
95% the driver itself refuses new snapshots and clones. The events are the control plane's
(the driver does not know Kubernetes objects): the provisioner and the snapshotter run
`check_pool_use` after they made something, and the event goes on the StorageClass — or,
for the built-in default class that is no stored object, on the PersistentVolume.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

from csi.capacity import PoolUsage, human
from pvlun.context import Context
from pvlun.store import Obj

WARN_AT = (0.80, 0.90)
REASON = "PoolNearlyFull"


class PoolWatch:
    """Remembers the highest threshold warned about, so each crossing warns once (falling
    below a threshold re-arms it)."""

    def __init__(self, usage: Callable[..., PoolUsage]):
        self.usage = usage  # usage(fresh=False): a measurement at most a few seconds old
        self._warned = 0.0
        self._lock = threading.Lock()

    def expose(self) -> None:
        """Serve the gauges on the default Prometheus registry (the daemon's /metrics)."""
        from prometheus_client.core import REGISTRY

        REGISTRY.register(_Collector(self.usage))

    def crossed(self) -> tuple[float, PoolUsage] | None:
        """The threshold just passed (and the usage), or None."""
        usage = self.usage()
        if usage.overcommit <= 1:
            return None
        level = max((t for t in WARN_AT if usage.used_ratio >= t), default=0.0)
        with self._lock:
            previous, self._warned = self._warned, level
        return (level, usage) if level > previous else None


def check_pool_use(ctx: Context, storage_class: str, pv: Obj | None) -> None:
    """After provisioning or snapshotting: warn once per threshold crossed."""
    watch: PoolWatch | None = ctx.services.get("pool_watch")
    if watch is None:
        return
    crossed = watch.crossed()
    if crossed is None:
        return
    level, usage = crossed
    target = ctx.store.get("StorageClass", storage_class) if storage_class else None
    target = target or pv
    if target is None:
        return
    ctx.store.add_event(target, "Warning", REASON, (
        f"the volume pool is {usage.used_ratio:.0%} full (past {level:.0%}): its LUNs hold {human(usage.used)} "
        f"of {human(usage.usable)} usable, and {human(usage.provisioned)} is provisioned (overcommit "
        f"x{usage.overcommit:g}). Writes fail when it is full; above 95% new snapshots and clones are refused. "
        "Delete snapshots or volumes you no longer need, or give the pool more space"))


_GAUGES = (
    ("pvlun_pool_used_ratio", "Bytes the LUNs hold / usable bytes of the pool", lambda u: u.used_ratio),
    ("pvlun_pool_used_bytes", "Bytes the LUNs hold (shared extents once)", lambda u: u.used),
    ("pvlun_pool_usable_bytes", "Bytes the LUNs of the pool could hold (after filesystem metadata and reserved "
     "blocks)", lambda u: u.usable),
    ("pvlun_pool_provisioned_bytes", "Sizes of all volumes and snapshots", lambda u: u.provisioned),
    ("pvlun_pool_overcommit_ratio", "Provisioned bytes may reach usable bytes x this", lambda u: u.overcommit),
)


class _Collector:
    """pvlun_pool_* gauges, measured when scraped (not when registered: `describe`)."""

    def __init__(self, usage: Callable[..., PoolUsage]):
        self.usage = usage

    def describe(self) -> Iterator:
        from prometheus_client.core import GaugeMetricFamily

        for name, text, _ in _GAUGES:
            yield GaugeMetricFamily(name, text)

    def collect(self) -> Iterator:
        from prometheus_client.core import GaugeMetricFamily

        usage = self.usage(fresh=True)
        for name, text, value in _GAUGES:
            yield GaugeMetricFamily(name, text, value=value(usage))
