"""The `pvlun_import_progress` gauge (percent, per DataVolume); the daemon serves /metrics."""

from __future__ import annotations

from typing import Callable

from prometheus_client import Gauge

IMPORT_PROGRESS = Gauge(
    "pvlun_import_progress",
    "Progress of a DataVolume import, upload or clone in percent",
    ["namespace", "name"],
)


def set_progress(namespace: str, name: str, percent: float) -> None:
    IMPORT_PROGRESS.labels(namespace=namespace, name=name).set(percent)


def clear(namespace: str, name: str) -> None:
    """Forget a DataVolume's series (when it is deleted)."""
    try:
        IMPORT_PROGRESS.remove(namespace, name)
    except KeyError:
        pass


def reporter(namespace: str, name: str) -> Callable[[float], None]:
    """A progress callback for `import_into` that feeds the gauge."""
    return lambda percent: set_progress(namespace, name, percent)
