"""CDI's DataSource as a DataVolume's `spec.sourceRef`: the DataSource names a claim or a
snapshot (a golden image, often kept fresh by a DataImportCron), and a DataVolume that refers
to it is a clone of what it names at the time its claim is made — exactly as if the DataVolume
had said `spec.source.pvc` / `spec.source.snapshot` itself.
"""

from __future__ import annotations

import copy
from typing import Callable

from controlplane.store import Obj

Get = Callable[[str, str, str], "Obj | None"]  # (kind, name, namespace) → object or None
SOURCE_KINDS = ("pvc", "snapshot")


class DataSourceMissing(LookupError):
    """The DataSource (or what it points at) is not there yet: the DataVolume waits, as CDI's does."""


def data_source_target(ds: Obj) -> tuple[str, dict] | None:
    """("pvc" | "snapshot", {name, namespace}) the DataSource points at, None if it names nothing."""
    source = (ds.get("spec") or {}).get("source") or {}
    ns = ds["metadata"].get("namespace") or "default"
    for kind in SOURCE_KINDS:
        ref = source.get(kind)
        if isinstance(ref, dict) and ref.get("name"):
            return kind, {"name": ref["name"], "namespace": ref.get("namespace") or ns}
    return None


def resolve_source_ref(dv: Obj, get: Get) -> Obj:
    """The DataVolume with its sourceRef replaced by the source its DataSource names (a copy;
    the DataVolume itself is returned when it has no sourceRef). DataSourceMissing says why not."""
    spec = dv.get("spec") or {}
    ref = spec.get("sourceRef")
    if not isinstance(ref, dict):
        return dv
    ns = ref.get("namespace") or dv["metadata"].get("namespace") or "default"
    ds = get("DataSource", ref.get("name", ""), ns)
    if ds is None:
        raise DataSourceMissing(f"DataSource {ns}/{ref.get('name')} not found")
    target = data_source_target(ds)
    if target is None:
        raise DataSourceMissing(f"DataSource {ns}/{ref.get('name')} names no source (spec.source.pvc or snapshot)")
    out = copy.deepcopy(dv)
    out["spec"].pop("sourceRef")
    out["spec"]["source"] = {target[0]: target[1]}
    return out
