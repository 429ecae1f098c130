"""CDI's DataImportCron: a golden image kept fresh from a registry.

On its `schedule` (and once at creation) the image's digest is read from the registry (the
importer's registry client); a digest not imported yet becomes a DataVolume
`<managedDataSource>-<12 hex digits of the digest>` importing `url@digest`, and once that import
has Succeeded the managed DataSource points at its claim. Beyond `importsToKeep` (3) the oldest
imports are deleted (`garbageCollect: Outdated`, the default). As in CDI the poll (its CronJob)
only records the digest it saw (annotation `cdi.kubevirt.io/storage.import.sourceDesiredDigest`,
status.lastExecutionTimestamp) and the reconcile acts on it; `poll_if_due` takes the time as an
argument, so a test moves the clock instead of waiting for the schedule.
"""

from __future__ import annotations

import copy
import logging
from datetime import datetime, timedelta, timezone

from controlplane.context import Context
from controlplane.cron_schedule import CronSchedule
from controlplane.object_links import IMPORT_CRON_LABEL
from controlplane.secret_refs import SecretRefError, secret_data
from controlplane.store import Obj, ObjectStore, set_condition
from controlplane.user_text import shown_text, user_text

log = logging.getLogger("pvlun.importer")

KIND = "DataImportCron"
API_VERSION = "cdi.kubevirt.io/v1beta1"
DESIRED_DIGEST = "cdi.kubevirt.io/storage.import.sourceDesiredDigest"
IMPORT_DIGEST = "cdi.kubevirt.io/storage.import.sourceDigest"  # on each DataVolume: what it imports
LAST_USE = "cdi.kubevirt.io/storage.import.lastUseTime"  # on each DataVolume: newest first when collecting
CRON_LABEL = IMPORT_CRON_LABEL
DEFAULT_IMPORTS_TO_KEEP = 3
RETRY_SECONDS = 60  # a first digest check that failed is tried again after this long
_TIME = "%Y-%m-%dT%H:%M:%SZ"


def _ns(obj: Obj) -> str:
    return obj["metadata"].get("namespace") or "default"


def _parse_time(text: object) -> datetime | None:
    try:
        return datetime.strptime(str(text), _TIME).replace(tzinfo=timezone.utc)
    except ValueError:
        return None


def dv_name(cron: Obj, digest: str) -> str:
    """CDI's name for the import of one digest: the managed DataSource's, then 12 hex digits."""
    return f"{cron['spec']['managedDataSource']}-{digest.removeprefix('sha256:')[:12]}"


def seconds_to_next_check(cron: Obj, now: datetime) -> float:
    """0 when the digest is due to be checked now (never checked, a tick passed, or a first
    check that failed RETRY_SECONDS ago), else how long until it is."""
    status = cron.get("status") or {}
    last = _parse_time(status.get("lastExecutionTimestamp"))
    if last is None:
        return 0.0
    due = CronSchedule(cron["spec"]["schedule"]).next_after(last)
    if not (cron["metadata"].get("annotations") or {}).get(DESIRED_DIGEST):
        due = min(due, last + timedelta(seconds=RETRY_SECONDS))
    return max(0.0, (due - now).total_seconds())


def _lookups(store: ObjectStore, ns: str):
    def secret(name: str) -> dict[str, str]:
        try:
            return secret_data(store, name, ns)
        except SecretRefError as exc:
            raise LookupError(str(exc)) from None

    def configmap(name: str) -> dict[str, str]:
        obj = store.get("ConfigMap", name, ns)
        if obj is None:
            raise LookupError(f"configmap {ns}/{name} not found")
        return dict(obj.get("data") or {})

    return secret, configmap


def poll_if_due(store: ObjectStore, cron: Obj, now: datetime) -> float:
    """The CronJob's part: if a check is due at `now`, read the image's digest and record it on
    the DataImportCron; the seconds until the next check either way."""
    from importer.errors import ImportFailed
    from importer.sources import from_spec

    wait = seconds_to_next_check(cron, now)
    if wait > 0:
        return wait
    meta, ns = cron["metadata"], _ns(cron)
    registry = copy.deepcopy(cron["spec"]["template"]["spec"]["source"])
    secret, configmap = _lookups(store, ns)
    try:
        source = from_spec(registry, secret=secret, configmap=configmap)
        try:
            digest = source.image_digest()  # type: ignore[attr-defined]
        finally:
            source.close()
    except Exception as exc:  # noqa: BLE001 — whatever it was, the check is recorded (no retry storm) and told
        message = shown_text(exc.message) if isinstance(exc, ImportFailed) else user_text(exc)
        if not isinstance(exc, (ImportFailed, LookupError)):
            log.warning("digest check of %s/%s: %s", ns, meta["name"], message)
        store.add_event(cron, "Warning", "DigestCheckFailed", f"reading the image's digest: {message}")
        digest = None
    if digest is not None and (meta.get("annotations") or {}).get(DESIRED_DIGEST) != digest:
        store.annotate(KIND, meta["name"], ns, **{DESIRED_DIGEST: digest})
    store.merge_status(KIND, meta["name"], ns, lastExecutionTimestamp=now.strftime(_TIME))
    updated = store.get(KIND, meta["name"], ns) or cron
    return seconds_to_next_check(updated, now) or RETRY_SECONDS


def _import_spec(cron: Obj, digest: str) -> dict:
    """The template's DataVolume spec, pinned to the digest (the image may move on meanwhile)."""
    from importer.sources.registry import parse_reference

    spec = copy.deepcopy(cron["spec"]["template"]["spec"])
    registry = spec["source"]["registry"]
    host, repo, _ref = parse_reference(registry["url"])
    registry["url"] = f"docker://{host}/{repo}@{digest}"
    return spec


def _owner(cron: Obj) -> list[dict]:
    """retentionPolicy None: its DataVolumes and DataSource go with it; All (the default): they stay."""
    meta = cron["metadata"]
    if cron["spec"].get("retentionPolicy") != "None":
        return []
    return [{"apiVersion": API_VERSION, "kind": KIND, "name": meta["name"], "uid": meta["uid"], "controller": True,
             "blockOwnerDeletion": True}]


def _imports(store: ObjectStore, cron: Obj) -> list[Obj]:
    """The cron's DataVolumes, newest first."""
    name = cron["metadata"]["name"]
    mine = [dv for dv in store.list("DataVolume", _ns(cron))
            if (dv["metadata"].get("labels") or {}).get(CRON_LABEL) == name]
    return sorted(mine, key=lambda dv: (dv["metadata"].get("annotations") or {}).get(LAST_USE, ""), reverse=True)


def _ensure_data_source(store: ObjectStore, cron: Obj) -> Obj:
    name, ns = cron["spec"]["managedDataSource"], _ns(cron)
    ds = store.get("DataSource", name, ns)
    if ds is None:
        ds = store.create({"apiVersion": API_VERSION, "kind": "DataSource",
                           "metadata": {"name": name, "namespace": ns, "labels": {CRON_LABEL: cron["metadata"]["name"]},
                                        "ownerReferences": _owner(cron)},
                           "spec": {"source": {}}})
    return ds


def reconcile_data_import_cron(ctx: Context, cron: Obj, now: datetime | None = None) -> float | None:
    """Poll when due (as a job: a registry may be slow), import a new digest, move the
    DataSource to a finished import, collect old imports, and say so in the status."""
    now = now or datetime.now(timezone.utc)
    meta, ns = cron["metadata"], _ns(cron)
    if meta.get("deletionTimestamp"):
        return None
    try:
        wait = seconds_to_next_check(cron, now)
    except ValueError as exc:  # kubectl apply does not run pvlun's admission
        status = dict(cron.get("status") or {})
        set_condition(status, "UpToDate", False, "InvalidSchedule", f"spec.schedule: {exc}")
        return _save(ctx, cron, status, 0)
    if wait == 0:
        ctx.jobs.start(f"cron:{ns}/{meta['name']}", lambda: poll_if_due(ctx.store, cron, now))
    ds = _ensure_data_source(ctx.store, cron)
    status = dict(cron.get("status") or {})
    digest = (meta.get("annotations") or {}).get(DESIRED_DIGEST)
    if not digest:
        set_condition(status, "UpToDate", False, "NoDigest", "No source digest")
        set_condition(status, "Progressing", False, "NoImport", "No current import")
        return _save(ctx, cron, status, wait)
    name = dv_name(cron, digest)
    dv = ctx.store.get("DataVolume", name, ns)
    if dv is None and not _imported(ds, name, ns):
        template = cron["spec"]["template"].get("metadata") or {}  # its labels and annotations, as CDI copies them
        ctx.store.create({"apiVersion": API_VERSION, "kind": "DataVolume",
                          "metadata": {"name": name, "namespace": ns,
                                       "labels": {**(template.get("labels") or {}), CRON_LABEL: meta["name"]},
                                       "annotations": {**(template.get("annotations") or {}), IMPORT_DIGEST: digest,
                                                       LAST_USE: now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")},
                                       "ownerReferences": _owner(cron)},
                          "spec": _import_spec(cron, digest)})
        ctx.store.add_event(cron, "Normal", "ImportScheduled", f"image {digest[:19]}… imported into DataVolume {name}")
        dv = ctx.store.get("DataVolume", name, ns)
    status["currentImports"] = [{"DataVolumeName": name, "Digest": digest}]
    phase = ((dv or {}).get("status") or {}).get("phase", "")
    if phase == "Succeeded" or (dv is None and _imported(ds, name, ns)):
        if not _imported(ds, name, ns):
            ctx.store.patch_spec("DataSource", ds["metadata"]["name"], ns, source={"pvc": {"name": name, "namespace": ns}})
            ctx.store.add_event(cron, "Normal", "DataSourceUpdated", f"DataSource {ds['metadata']['name']} now names {name}")
        if (status.get("lastImportedPVC") or {}).get("name") != name:
            status["lastImportedPVC"] = {"name": name, "namespace": ns}
            status["lastImportTimestamp"] = now.strftime(_TIME)
        set_condition(status, "UpToDate", True, "UpToDate", "Latest import is up to date")
        set_condition(status, "Progressing", False, "NoImport", "No current import")
        _collect(ctx.store, cron)
    elif phase == "Failed":
        set_condition(status, "UpToDate", False, "ImportFailed", f"DataVolume {name} failed")
        set_condition(status, "Progressing", False, "ImportFailed", f"DataVolume {name} failed")
    else:
        set_condition(status, "UpToDate", False, "ImportProgressing", "Import is progressing")
        set_condition(status, "Progressing", True, "ImportProgressing", "Import is progressing")
    return _save(ctx, cron, status, wait)


def _imported(ds: Obj, name: str, ns: str) -> bool:
    pvc = ((ds.get("spec") or {}).get("source") or {}).get("pvc") or {}
    return pvc.get("name") == name and (pvc.get("namespace") or ns) == ns


def _collect(store: ObjectStore, cron: Obj) -> None:
    """garbageCollect Outdated: only the newest importsToKeep imports stay (the one the DataSource
    names always among them)."""
    spec = cron["spec"]
    if spec.get("garbageCollect", "Outdated") != "Outdated":
        return
    keep = spec.get("importsToKeep")
    keep = DEFAULT_IMPORTS_TO_KEEP if keep is None else max(int(keep), 1)
    for dv in _imports(store, cron)[keep:]:
        store.delete("DataVolume", dv["metadata"]["name"], _ns(dv))
        store.add_event(cron, "Normal", "ImportCollected", f"DataVolume {dv['metadata']['name']} deleted (outdated)")


def _save(ctx: Context, cron: Obj, status: Obj, wait: float) -> float | None:
    """Write the fields the reconcile owns (lastExecutionTimestamp is the poll's, written meanwhile
    perhaps), and only when they changed."""
    old = cron.get("status") or {}
    if _comparable(old) != _comparable(status):
        owned = {k: status[k] for k in ("conditions", "currentImports", "lastImportedPVC", "lastImportTimestamp")
                 if k in status}
        ctx.store.merge_status(KIND, cron["metadata"]["name"], _ns(cron), **owned)
    return wait or None


def _comparable(status: Obj) -> Obj:
    """A status without the heartbeat times (writing only those would wake the reconcile forever)."""
    out = copy.deepcopy(status)
    for c in out.get("conditions", []):
        c.pop("lastHeartbeatTime", None)
        c.pop("lastTransitionTime", None)
    return out
