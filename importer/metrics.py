"""Import progress as Prometheus metrics: `pvlun_import_progress` (percent, per DataVolume; the
daemon serves it on /metrics, and a deleted DataVolume's series goes with it) and, in an importer pod, CDI's `kubevirt_cdi_import_progress_total`
(percent, per owner UID: what CDI's importer pods serve and its controller reads)."""

from __future__ import annotations

import threading
from typing import Callable

from prometheus_client import REGISTRY, Counter, Gauge
from prometheus_client.registry import Collector

IMPORT_PROGRESS = Gauge(
    "pvlun_import_progress",
    "Progress of a DataVolume import, upload or clone in percent",
    ["namespace", "name"],
    registry=None,  # served through _ImportProgress, which first drops the deleted DataVolumes' series
)
# A counter as in CDI (exposed with the _total suffix): it climbs to the percentage reached.
CDI_IMPORT_PROGRESS = Counter(
    "kubevirt_cdi_import_progress",
    "The import progress in percentage",
    ["ownerUID"],
)
_cdi_reached: dict[str, float] = {}
_cdi_lock = threading.Lock()


_series: set[tuple[str, str]] = set()
_series_lock = threading.Lock()
_exists: Callable[[str, str], bool] | None = None


class _ImportProgress(Collector):
    """pvlun_import_progress as of now: before each scrape the series of DataVolumes that no
    longer exist are removed (a deleted one's last value would otherwise stay forever)."""

    def collect(self):
        exists = _exists
        if exists is not None:
            with _series_lock:
                known = list(_series)
            for namespace, name in known:
                try:
                    gone = not exists(namespace, name)
                except Exception:  # a store closing under a scrape: keep the series this time
                    gone = False
                if gone:
                    clear(namespace, name)
        return IMPORT_PROGRESS.collect()


REGISTRY.register(_ImportProgress())


def drop_deleted(exists: Callable[[str, str], bool]) -> None:
    """From now on, /metrics keeps pvlun_import_progress only for the DataVolumes
    `exists(namespace, name)` says are there (the daemon passes a look into its store)."""
    global _exists
    _exists = exists


def set_progress(namespace: str, name: str, percent: float) -> None:
    with _series_lock:
        _series.add((namespace, name))
    IMPORT_PROGRESS.labels(namespace=namespace, name=name).set(percent)


def set_cdi_progress(owner_uid: str, percent: float) -> None:
    """CDI's counter of one owner up to `percent` (it never goes down)."""
    with _cdi_lock:
        reached = _cdi_reached.get(owner_uid, 0.0)
        if percent > reached:
            CDI_IMPORT_PROGRESS.labels(ownerUID=owner_uid).inc(percent - reached)
            _cdi_reached[owner_uid] = percent


def clear(namespace: str, name: str) -> None:
    """Forget a DataVolume's series (when it is deleted)."""
    with _series_lock:
        _series.discard((namespace, name))
    try:
        IMPORT_PROGRESS.remove(namespace, name)
    except KeyError:
        pass


def reporter(namespace: str, name: str) -> Callable[[float], None]:
    """A progress callback for `import_into` that feeds the gauge."""
    return lambda percent: set_progress(namespace, name, percent)
