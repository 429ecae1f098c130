"""DataVolume reconcile: CDI's phases over the pvlun pieces.

A DataVolume gets a claim (same name, owned by it); once bound, the volume is attached on
a node as kubelet would, filled by the pipeline, and detached. A snapshot source is restored
through CSI (CreateVolume with a snapshot source); a pvc source takes one of CDI's clone
strategies (importer/clone_flow.py). A failed import deletes the claim, so no
half-written volume remains; the DataVolume keeps phase Failed and the reason (its spec
never changes, as in CDI: delete it and create it again to retry).
"""

from __future__ import annotations

import logging
import time

from controlplane import kubelet
from controlplane.context import Context
from controlplane.data_source_ref import DataSourceMissing, resolve_source_ref
from controlplane.dv_spec import claim_spec, disk_size, validate
from controlplane.secret_refs import SecretRefError, secret_data
from controlplane.store import Obj, set_condition
from controlplane.user_text import shown_text, user_text
from importer import errors as import_errors
from importer.clone_source import from_clone_source

log = logging.getLogger("pvlun.importer")

KIND = "DataVolume"


def key_of(dv: Obj) -> str:
    return f"{dv['metadata'].get('namespace', 'default')}/{dv['metadata']['name']}"


def status_of(dv: Obj) -> Obj:
    return dict(dv.get("status") or {})


def save_status(ctx: Context, dv: Obj, status: Obj) -> None:
    ctx.store.update_status(KIND, dv["metadata"]["name"], dv["metadata"].get("namespace", "default"), status)


def set_phase(ctx: Context, dv: Obj, phase: str, *, running: tuple[bool, str, str] | None = None,
              ready: bool | None = None, ready_why: tuple[str, str] | None = None, progress: str | None = None,
              event: tuple[str, str, str] | None = None) -> Obj:
    """One status write: the phase with its conditions (a reader never sees a phase without its reason)."""
    status = status_of(dv)
    status["phase"] = phase
    status.setdefault("restartCount", 0)
    status["observedGeneration"] = dv["metadata"].get("generation", 1)
    if progress is not None:
        status["progress"] = progress
    if running is not None:
        set_condition(status, "Running", *running)
    if ready is not None:
        set_condition(status, "Ready", ready, *(ready_why or (phase, "")))
    save_status(ctx, dv, status)
    if event:
        ctx.store.add_event(dv, *event)
    dv["status"] = status
    return status


def attributes_class(dv: Obj) -> str | None:
    spec = dv.get("spec") or {}
    return (spec.get("storage") or spec.get("pvc") or {}).get("volumeAttributesClassName")


def fail(ctx: Context, dv: Obj, reason: str, message: str) -> None:
    """Phase Failed with the reason; the claim and its data are removed."""
    message = shown_text(message)  # one line, no path of the daemon's, whoever wrote it
    status = status_of(dv)
    if any(c["type"] == "Bound" for c in status.get("conditions", [])):
        set_condition(status, "Bound", False, "ClaimDeleted", "the claim was deleted with the failed import's data")
        dv["status"] = status
    set_phase(ctx, dv, "Failed", running=(False, reason, message), ready=False, ready_why=(reason, message),
              event=("Warning", reason, message))
    ns = dv["metadata"].get("namespace", "default")
    ctx.store.delete("PersistentVolumeClaim", dv["metadata"]["name"], ns)


def reconcile_datavolume(ctx: Context, dv: Obj) -> float | None:
    meta = dv["metadata"]
    ns = meta.get("namespace", "default")
    status = status_of(dv)
    if meta.get("deletionTimestamp"):  # only a cross-namespace clone's finalizer holds one back
        from importer.clone_flow import CROSS_NAMESPACE_FINALIZER, release_deleted

        if CROSS_NAMESPACE_FINALIZER in meta.get("finalizers", []):
            release_deleted(ctx, dv)
        return None
    if status.get("phase") in ("Succeeded", "Failed"):
        return  # for good: a DataVolume's spec never changes (admission refuses it, as CDI's webhook does)
    if ctx.jobs.running("dv:" + key_of(dv)):
        return
    try:
        dv = with_defaults(ctx, dv)
    except DataSourceMissing as exc:
        _wait_for_data_source(ctx, dv, ns, str(exc))
        return None
    try:
        kind, source, size, mode, access, sc = validate(dv)
    except ValueError as exc:
        fail(ctx, dv, "InvalidSpec", str(exc))
        return
    if ctx.cluster is not None and kind in ("pvc", "snapshot") and (source.get("namespace") or ns) != ns:
        # a claim's dataSource has no namespace: the API server would drop it and clone a namesake
        fail(ctx, dv, "CrossNamespaceClone", f"a clone from namespace {source.get('namespace')} into {ns} is not "
             "available on a cluster yet (it needs the source namespace's grant); clone within one namespace")
        return None
    taken = from_clone_source(ctx, dv, kind, source, ns, size)
    if taken is not None:
        mode, size = taken[0] or mode, taken[1]
    if kind == "pvc":  # CDI's clone strategies (snapshot, csi-clone, copy)
        from importer.clone_flow import reconcile_clone

        return reconcile_clone(ctx, dv, source, size, mode, access, sc, taken)
    pvc = ctx.store.get("PersistentVolumeClaim", meta["name"], ns)
    if pvc is not None and pvc["metadata"].get("deletionTimestamp"):
        return  # the old claim (a failed or restarted import) is still going away
    if pvc is None and taken is None:
        if status.get("phase") != "Pending":
            set_phase(ctx, dv, "Pending", progress="N/A", ready=False, event=(
                "Normal", "CloneSourceNotReady", f"waiting for {kind} {source.get('namespace') or ns}/"
                f"{source.get('name')}: the clone takes its volume mode and size"))
        return 2.0
    if pvc is None:
        scheduled = {"upload": "UploadScheduled", "pvc": "CloneScheduled", "snapshot": "CloneScheduled"}.get(kind, "ImportScheduled")
        claim_kind = kind
        ctx.store.apply({
            "apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": meta["name"], "namespace": ns,
                         "ownerReferences": [{"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": KIND,
                                              "name": meta["name"], "uid": meta["uid"], "controller": True}]},
            "spec": claim_spec(claim_kind, source, size, mode, access, sc,
                               (dv.get("spec") or {}).get("storage") is not None, ns, attributes_class(dv)),
        })
        if waits_for_class(ctx, dv, sc):
            return CLASS_RECHECK_SECONDS
        status = set_phase(ctx, dv, scheduled, progress="N/A", ready=False)
        status["claimName"] = meta["name"]
        save_status(ctx, dv, status)
        return
    if (pvc.get("status") or {}).get("phase") != "Bound" and waits_for_class(ctx, dv, sc):
        return CLASS_RECHECK_SECONDS
    if ctx.cluster is not None:  # the work runs in Pods Kubernetes places
        from importer.import_pods import reconcile_in_pods

        return reconcile_in_pods(ctx, dv, pvc, kind)
    if pvc.get("status", {}).get("phase") != "Bound":
        cond = next((c for c in pvc.get("status", {}).get("conditions", []) if c["type"] == "Provisioned"), None)
        if cond and cond.get("reason") == "ProvisioningFailed":
            if sc and f"storageclass {sc!r} not found" in cond.get("message", ""):
                return 1.0  # said before the class was made: the provisioner looks again (the class's change)
            fail(ctx, dv, "ProvisioningFailed", cond.get("message", ""))
        return
    status = status_of(dv)
    if not any(c["type"] == "Bound" and c["status"] == "True" for c in status.get("conditions", [])):
        set_condition(status, "Bound", True, "Bound", f"PVC {meta['name']} Bound")
        status["claimName"] = meta["name"]
        save_status(ctx, dv, status)
        dv["status"] = status
    if kind in ("pvc", "snapshot"):
        set_phase(ctx, dv, "Succeeded", progress="100.0%", running=(False, "Completed", ""), ready=True,
               event=("Normal", "CloneSucceeded", f"{kind} cloned into claim {meta['name']} by the CSI driver"))
        return
    if kind == "upload":
        if status.get("phase") != "UploadReady":
            set_phase(ctx, dv, "UploadReady", running=(True, "Pod Running", ""), ready=False,
                   event=("Normal", "UploadReady", "upload endpoint ready; send the image with pvlun image-upload"))
        return
    ctx.jobs.start_on_node("dv:" + key_of(dv), lambda node: run_import(ctx, dv, kind, source, mode, node),
                           f"import/{key_of(dv)}")


def with_defaults(ctx: Context, dv: Obj) -> Obj:
    """The DataVolume as the claim is made from it: its sourceRef resolved to the DataSource's
    source (DataSourceMissing if there is none yet), the modes spec.storage leaves out from its
    class's StorageProfile."""
    from controlplane.storage_profiles import with_profile_defaults

    return with_profile_defaults(ctx, resolve_source_ref(dv, ctx.store.get))


def _wait_for_data_source(ctx: Context, dv: Obj, ns: str, message: str) -> None:
    """A sourceRef whose DataSource is not there (yet): Pending, saying so once (CDI waits too)."""
    if ctx.store.get("PersistentVolumeClaim", dv["metadata"]["name"], ns) is not None:
        return  # the claim was made from it already: its clone goes on without it
    status = status_of(dv)
    if status.get("phase") == "Pending" and any(c.get("message") == message for c in status.get("conditions", [])):
        return
    status.update(phase="Pending", progress="N/A")
    status.setdefault("restartCount", 0)
    set_condition(status, "Ready", False, "DataSourceNotFound", message)
    save_status(ctx, dv, status)
    ctx.store.add_event(dv, "Warning", "DataSourceNotFound", message)


CLASS_RECHECK_SECONDS = 10.0


def waits_for_class(ctx: Context, dv: Obj, sc: str | None) -> bool:
    """A DataVolume whose StorageClass does not exist (yet) stays Pending, as its claim does in
    Kubernetes, and goes on when the class is made (the claim's change brings it back here).
    On a cluster no StorageClass change reaches the controller: it looks again every
    CLASS_RECHECK_SECONDS."""
    if not sc or ctx.store.get("StorageClass", sc) is not None:
        return False
    name = dv["metadata"]["name"]
    message = f"PVC {name} Pending: StorageClass {sc} does not exist yet; the import starts once it is created"
    status = status_of(dv)
    bound = next((c for c in status.get("conditions", []) if c["type"] == "Bound"), {})
    if status.get("phase") != "Pending" or bound.get("message") != message:
        set_condition(status, "Bound", False, "Pending", message)
        status["claimName"] = name
        dv["status"] = status
        set_phase(ctx, dv, "Pending", progress="N/A", ready=False,
                  event=("Warning", "StorageClassNotFound", message))
    return True


def _lookups(ctx: Context, ns: str):
    def secret(name: str) -> dict[str, str]:
        try:
            return secret_data(ctx.store, name, ns)
        except SecretRefError as exc:  # the source's secret: its source is what is wrong
            raise LookupError(str(exc)) from None

    def configmap(name: str) -> dict[str, str]:
        obj = ctx.store.get("ConfigMap", name, ns)
        if obj is None:
            raise LookupError(f"configmap {ns}/{name} not found")
        return dict(obj.get("data") or {})

    return secret, configmap


def target_for(attachment: kubelet.Attachment, pvc: Obj, dv: Obj):
    from importer.pipeline import Target

    spec = dv.get("spec") or {}
    capacity = int(pvc.get("status", {}).get("capacity", {}).get("storage", "0"))
    size, overhead = disk_size(dv, capacity, attachment.block)
    return Target(path=attachment.path, size=size, mode="Block" if attachment.block else "Filesystem",
                  content_type=spec.get("contentType", "kubevirt"), preallocation=bool(spec.get("preallocation")),
                  filesystem_overhead=overhead)


class Progress:
    """Progress into the DataVolume status (at most every half second) and the metric."""

    def __init__(self, ctx: Context, dv: Obj):
        self.ctx, self.dv, self.last, self.shown = ctx, dv, 0.0, 0.0

    def __call__(self, percent: float) -> None:
        from importer import metrics

        meta = self.dv["metadata"]
        metrics.set_progress(meta.get("namespace", "default"), meta["name"], percent)
        now = time.monotonic()
        # at most every half second, but always the end and the download's end (50 % when a
        # scratch copy is converted next), which a slow check or convert would otherwise hide
        if now - self.last >= 0.5 or percent >= 100 or self.shown < 50 <= percent:
            self.last, self.shown = now, percent
            current = self.ctx.store.get(KIND, meta["name"], meta.get("namespace", "default"))
            if current is None or current["metadata"].get("uid") != meta.get("uid"):
                return  # deleted (the import is being cancelled), or a namesake's: not ours to write
            status = status_of(current)
            status["progress"] = f"{percent:.2f}%"
            save_status(self.ctx, self.dv, status)


ATTEMPTS = 3  # a failing transfer is tried this many times before the DataVolume fails (CDI's pod restarts)
# what may pass by itself: a file not uploaded yet, a server restarting, a network away
RETRIED = frozenset({import_errors.TRANSFER_STALLED, import_errors.NOT_FOUND, import_errors.UNREACHABLE,
                     import_errors.TRANSFER_FAILED})
BACKOFF_SECONDS = 10.0  # before the second attempt, doubling after (kubelet's CrashLoopBackOff starts at 10 s)


def retry_backoff(ctx: Context, stall: float, attempt: int) -> float:
    """Seconds to wait after failed attempt `attempt` (1-based): `pvlun serve --import-retry-backoff`
    (kubelet's 10 s), doubling; with a short stall timeout (slow links given up on quickly) at most
    a quarter of it."""
    base = float(ctx.services.get("retry_backoff") or BACKOFF_SECONDS)
    return min(base, stall / 4) * 2 ** (attempt - 1)


def run_import(ctx: Context, dv: Obj, kind: str, source_spec: dict, mode: str, node: str | None = None) -> None:
    """The import job: attach on `node` (the job queue picks one with a free slot), pipeline,
    detach; Succeeded or Failed with the reason. A node found full goes back to the queue.

    A transfer that stalls or fails for a reason that may pass (404, connection refused, a
    server error, a dropped connection) is tried again after a backoff (restartCount + 1, the
    Running condition False with the reason, as CDI's restarted importer pod shows it); a
    deleted DataVolume or a stopping daemon cancels the import at once and its volume is
    detached (the claim then goes with its owner)."""
    from importer import errors
    from importer.errors import ImportFailed
    from importer.transfer_watch import DEFAULT_STALL_SECONDS, TransferWatch

    meta = dv["metadata"]
    ns = meta.get("namespace", "default")
    owner = f"import/{ns}/{meta['name']}"
    set_phase(ctx, dv, "ImportInProgress", running=(True, "Pod Running", ""), progress="0.00%")
    attachment = None
    watch = TransferWatch(float(ctx.services.get("stall_seconds") or DEFAULT_STALL_SECONDS), _cancelled(ctx, dv))
    try:
        with watch:
            pvc = ctx.store.get("PersistentVolumeClaim", meta["name"], ns)
            attachment = kubelet.attach(ctx.store, ctx.csi, ctx.data_dir, meta["name"], ns, node or ctx.node_id, owner)
            _import_attempts(ctx, dv, watch, {kind: source_spec}, target_for(attachment, pvc, dv))
    except kubelet.NodeFull:
        _detach(ctx, attachment, owner)
        raise
    except ImportFailed as exc:
        _detach(ctx, attachment, owner)
        if exc.reason == errors.CANCELLED:
            log.info("import %s/%s cancelled", ns, meta["name"])
            return  # deleted: nothing to report on; daemon stopping: start-up repair starts it over
        fail(ctx, dv, exc.reason, exc.message)
        return
    except LookupError as exc:
        _detach(ctx, attachment, owner)
        fail(ctx, dv, "InvalidSource", str(exc))
        return
    except SecretRefError as exc:  # a secret the claim's StorageClass names is not there
        _detach(ctx, attachment, owner)
        fail(ctx, dv, "SecretNotFound", str(exc))
        return
    except Exception as exc:
        log.exception("import %s/%s", ns, meta["name"])
        _detach(ctx, attachment, owner)
        fail(ctx, dv, "InternalError", user_text(exc))
        return
    _detach(ctx, attachment, owner)
    set_phase(ctx, dv, "Succeeded", progress="100.0%", running=(False, "Completed", "Import Complete"), ready=True,
           event=("Normal", "ImportSucceeded", "Successfully imported into claim " + meta["name"]))


def _import_attempts(ctx: Context, dv: Obj, watch, source_spec: dict, target) -> None:
    """The pipeline, again after a backoff while it fails for a reason that may pass, at most
    ATTEMPTS times (the pipeline leaves nothing of a failed attempt in the volume)."""
    from importer.errors import ImportFailed
    from importer.pipeline import import_into
    from importer.scratch import scratch_dir
    from importer.sources import from_spec

    meta = dv["metadata"]
    ns = meta.get("namespace", "default")
    secret, configmap = _lookups(ctx, ns)
    scratch = scratch_dir(ctx.data_dir)
    for attempt in range(1, ATTEMPTS + 1):
        if attempt > 1:
            set_phase(ctx, dv, "ImportInProgress", running=(True, "Pod Running", ""), progress="0.00%")
        source = from_spec(source_spec, secret=secret, configmap=configmap,
                           allow_file=bool(ctx.services.get("allow_file")))
        try:
            import_into(source, target, progress=Progress(ctx, dv), scratch_dir=scratch)
            return
        except ImportFailed as exc:
            if exc.reason not in RETRIED:
                raise
            if attempt == ATTEMPTS:
                raise ImportFailed(exc.reason, f"{exc.message} ({attempt} attempts)") from None
            backoff = retry_backoff(ctx, watch.stall, attempt)
            current = (ctx.store.get(KIND, meta["name"], ns) or dv).get("status") or {}
            dv["status"] = dict(current, restartCount=int(current.get("restartCount", 0)) + 1)
            set_phase(ctx, dv, "ImportInProgress", running=(False, exc.reason, exc.message), progress="0.00%",
                      event=("Warning", exc.reason, f"{exc.message}; attempt {attempt} of {ATTEMPTS}, "
                                                    f"trying again in {backoff:g} s"))
            watch.pause(backoff)


def _cancelled(ctx: Context, dv: Obj):
    """An import ends when its DataVolume is deleted (or replaced by another of the same name),
    when its job is cancelled, or when the daemon stops."""
    meta = dv["metadata"]
    ns = meta.get("namespace", "default")
    event = ctx.jobs.cancel_event("dv:" + key_of(dv))

    def cancelled() -> bool:
        if event.is_set() or ctx.stopping.is_set():
            return True
        current = ctx.store.get(KIND, meta["name"], ns)
        return (current is None or current["metadata"].get("uid") != meta.get("uid")
                or bool(current["metadata"].get("deletionTimestamp")))

    return cancelled


def start_over(store, dv: Obj, reason: str, message: str) -> None:
    """Drop the DataVolume's claim, and the half-written volume with it, and begin again on a
    fresh one with restartCount + 1 (CDI restarts its importer or upload pod the same way)."""
    meta = dv["metadata"]
    ns = meta.get("namespace", "default")
    store.delete("PersistentVolumeClaim", meta["name"], ns)
    store.update_status(KIND, meta["name"], ns, {"phase": "Pending", "progress": "N/A",
                                                 "restartCount": int(status_of(dv).get("restartCount", 0)) + 1})
    store.add_event(dv, "Warning", reason, message)


def _detach(ctx: Context, attachment: kubelet.Attachment | None, owner: str) -> None:
    if attachment is not None:
        kubelet.detach(ctx.store, ctx.csi, attachment.volume_id, attachment.node_id, owner)
