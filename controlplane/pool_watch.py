"""The pool's real use where people look: Prometheus gauges on the daemon's /metrics, and a
Warning event the first time an overcommitted pool passes 80% and 90% real use.

Real use is bytes the LUNs hold / usable bytes of the pool (csi/capacity.py). With
`--overcommit 1.0` every volume fits by construction, so only overcommitted pools warn; past
95% the driver itself refuses new snapshots and clones. Use grows with writes no API call
announces (a guest, an upload), so the pool is looked at every few seconds, not after
provisioning.

The events are the control plane's (the driver does not know Kubernetes objects). They go on
the StorageClasses of the pool — every class of this driver, since they share the one pool —
which stay while claims come and go. The built-in default class is made a stored object when
the control plane starts (as a cluster's default class is installed), so it can carry them
and `pvlun describe sc pvlun` shows them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator

from csi.capacity import PoolUsage, human
from csi import DRIVER_NAME
from controlplane.context import Context

log = logging.getLogger("pvlun.pool")
WARN_AT = (0.80, 0.90)
REASON = "PoolNearlyFull"
CHECK_EVERY = 3.0  # seconds between looks at the pool


class PoolWatch:
    """Remembers the highest threshold warned about, so each crossing warns once (falling
    below a threshold re-arms it)."""

    def __init__(self, usage: Callable[..., PoolUsage]):
        self.usage = usage  # usage(fresh=False): a measurement at most a few seconds old
        self._warned = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def expose(self) -> None:
        """Serve the gauges on the default Prometheus registry (the daemon's /metrics)."""
        from prometheus_client.core import REGISTRY

        REGISTRY.register(_Collector(self.usage))

    def crossed(self) -> tuple[float, PoolUsage] | None:
        """The threshold just passed (and the usage), or None."""
        usage = self.usage(fresh=True)
        if usage.overcommit <= 1:
            return None
        level = max((t for t in WARN_AT if usage.used_ratio >= t), default=0.0)
        with self._lock:
            previous, self._warned = self._warned, level
        return (level, usage) if level > previous else None

    def run(self, ctx: Context | None) -> threading.Thread:
        """Look at the pool every CHECK_EVERY seconds until `stop` and, with a control plane,
        warn on crossings."""
        def loop() -> None:
            while not self._stop.wait(CHECK_EVERY):
                try:
                    if ctx is not None:
                        check_pool_use(ctx, self)
                except Exception:  # a failed look must not end the watching
                    log.exception("looking at the pool")

        thread = threading.Thread(target=loop, name="pool-watch", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()


def pool_classes(ctx: Context) -> list[dict]:
    """The StorageClasses of this driver's pool (the built-in default one is stored)."""
    return [sc for sc in ctx.store.list("StorageClass") if sc.get("provisioner") == DRIVER_NAME]


def check_pool_use(ctx: Context, watch: PoolWatch) -> None:
    """Warn once per threshold crossed, on every StorageClass of the pool."""
    crossed = watch.crossed()
    if crossed is None:
        return
    level, usage = crossed
    message = (f"the volume pool is {usage.used_ratio:.0%} full (past {level:.0%}): its LUNs hold "
               f"{human(usage.used)} of {human(usage.usable)} usable, and {human(usage.provisioned)} is provisioned "
               f"(overcommit x{usage.overcommit:g}). Writes fail when it is full; above 95% new snapshots and clones "
               "are refused. Delete snapshots or volumes you no longer need, or give the pool more space")
    log.warning("%s", message)
    for sc in pool_classes(ctx):
        ctx.store.add_event(sc, "Warning", REASON, message)


_GAUGES = (
    ("pvlun_pool_used_ratio", "Bytes the LUNs hold / usable bytes of the pool", lambda u: u.used_ratio),
    ("pvlun_pool_used_bytes", "Bytes the LUNs hold (shared extents once)", lambda u: u.used),
    ("pvlun_pool_usable_bytes", "Bytes the LUNs of the pool could hold (after filesystem metadata and reserved "
     "blocks, the pool image grown as far as the host lets it)", lambda u: u.usable),
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
