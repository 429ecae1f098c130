"""Import progress as Prometheus metrics: `pvlun_import_progress` (percent, per DataVolume; the
daemon serves it on /metrics) and, in an importer pod, CDI's `kubevirt_cdi_import_progress_total`
(percent, per owner UID: what CDI's importer pods serve and its controller reads)."""

from __future__ import annotations

import threading
from typing import Callable

from prometheus_client import Counter, Gauge

IMPORT_PROGRESS = Gauge(
    "pvlun_import_progress",
    "Progress of a DataVolume import, upload or clone in percent",
    ["namespace", "name"],
)
# A counter as in CDI (exposed with the _total suffix): it climbs to the percentage reached.
CDI_IMPORT_PROGRESS = Counter(
    "kubevirt_cdi_import_progress",
    "The import progress in percentage",
    ["ownerUID"],
)
_cdi_reached: dict[str, float] = {}
_cdi_lock = threading.Lock()


def set_progress(namespace: str, name: str, percent: float) -> None:
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
    try:
        IMPORT_PROGRESS.remove(namespace, name)
    except KeyError:
        pass


def reporter(namespace: str, name: str) -> Callable[[float], None]:
    """A progress callback for `import_into` that feeds the gauge."""
    return lambda percent: set_progress(namespace, name, percent)
