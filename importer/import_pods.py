"""Cluster mode: a DataVolume's work runs in a Pod that Kubernetes places, as CDI's does.

The DataVolume reconcile (importer/reconcile.py) makes the claim in both modes; on a
cluster it then hands over here. The importer Pod (importer/pods.py) is the claim's first
consumer — a WaitForFirstConsumer class binds it where the Pod lands — so it is made
without waiting for Bound. The Pod reports back through its status (phase, restarts, a JSON
termination message: importer/pod_result.py's `import_result`); that is all the controller reads
of it, bounded, as anything a Pod writes is untrusted. A finished Pod is deleted; its claim
stays with the data (Succeeded) or goes with it (Failed: no half-written volume).

Clones from a claim or snapshot are the CSI sidecars' (the claim's dataSource): done when
the claim is Bound. Uploads are refused for now (nothing outside the cluster can reach an
upload Pod yet)."""

from __future__ import annotations

from controlplane.context import Context
from controlplane.store import Obj
from importer.pod_result import import_result
from importer.pods import importer_pod
from importer.reconcile import fail, set_phase


def controlled_by(obj: Obj, owner: Obj) -> bool:
    """Is `owner` obj's controller (its controller ownerReference names owner's uid)?"""
    refs = (obj.get("metadata") or {}).get("ownerReferences")
    uid = owner["metadata"].get("uid")
    return bool(uid) and isinstance(refs, list) and any(
        isinstance(r, dict) and r.get("controller") is True and r.get("uid") == uid for r in refs)


def _bound(pvc: Obj) -> bool:
    return (pvc.get("status") or {}).get("phase") == "Bound"


def _provisioning_failed(pvc: Obj) -> str | None:
    for cond in (pvc.get("status") or {}).get("conditions") or []:
        if isinstance(cond, dict) and cond.get("type") == "Provisioned" and cond.get("reason") == "ProvisioningFailed":
            return str(cond.get("message", ""))
    return None


def reconcile_in_pods(ctx: Context, dv: Obj, pvc: Obj, kind: str) -> float | None:
    """The DataVolume's next step on a cluster, from its claim and its Pod as they are now."""
    assert ctx.cluster is not None
    meta = dv["metadata"]
    ns = meta.get("namespace", "default")
    failed = _provisioning_failed(pvc)
    if failed is not None and not _bound(pvc):
        fail(ctx, dv, "ProvisioningFailed", failed)
        return None
    if kind in ("pvc", "snapshot"):
        if _bound(pvc):
            set_phase(ctx, dv, "Succeeded", progress="100.0%", running=(False, "Completed", ""), ready=True,
                      event=("Normal", "CloneSucceeded", f"{kind} cloned into claim {meta['name']} by the CSI driver"))
        return None
    if kind == "upload":
        _upload(ctx, dv)
        return None
    return _import(ctx, dv, pvc, ns)


def _import(ctx: Context, dv: Obj, pvc: Obj, ns: str) -> float | None:
    spec = importer_pod(dv, pvc, ctx.cluster.image, namespace=ns)
    pod = ctx.store.get("Pod", spec["metadata"]["name"], ns)
    if pod is not None and not controlled_by(pod, pvc):
        # someone else's Pod of that name: its word about the import means nothing, and it is not ours to delete
        ctx.store.add_event(dv, "Warning", "ImporterPodNameTaken", f"Pod {ns}/{spec['metadata']['name']} exists and "
                            f"is not controlled by claim {pvc['metadata']['name']}; delete it to let the import run")
        return 30.0
    if pod is None:
        ctx.store.apply(spec)
        if (dv.get("status") or {}).get("phase") != "ImportScheduled":
            set_phase(ctx, dv, "ImportScheduled", progress="N/A", ready=False,
                      event=("Normal", "ImportScheduled", f"Import into {pvc['metadata']['name']} scheduled"))
        return None
    return _follow(ctx, dv, pod, ns)


def _upload(ctx: Context, dv: Obj) -> None:
    """Uploads need a client that reaches the upload Pod (CDI's upload proxy, or `pvlun
    image-upload` with the Pod's token key); neither talks to a cluster yet, so a Pod nobody
    could feed is not made: the DataVolume says so at once."""
    fail(ctx, dv, "UploadNotSupported", "uploads into a cluster are not available yet: import the image from "
         "http, registry or s3, or upload it with pvlun serve (embedded mode)")


RESTART_LIMIT = 3  # failed attempts (the kubelet restarts the container) before the DataVolume is Failed


def _follow(ctx: Context, dv: Obj, pod: Obj, ns: str) -> float | None:
    """The DataVolume's phase from its Pod's; a finished Pod is deleted."""
    result = import_result(pod)
    if result is None or result.phase == "Pending":  # not started yet: stays scheduled
        return None
    original = dv.get("status") or {}
    restarts = result.restarts
    status = dict(dv.get("status") or {}, restartCount=restarts)  # CDI's count of failed attempts
    dv = dict(dv, status=status)
    if result.phase == "Succeeded":
        set_phase(ctx, dv, "Succeeded", progress="100.0%", running=(False, "Completed", ""), ready=True,
                  event=("Normal", "ImportSucceeded", f"Successfully imported into {dv['metadata']['name']}"))
        ctx.store.delete("Pod", pod["metadata"]["name"], ns)
        return None
    if result.phase == "Failed" and (result.pod_failed or restarts >= RESTART_LIMIT):
        fail(ctx, dv, result.reason or "ImportFailed", result.message or "the importer Pod failed")
        ctx.store.delete("Pod", pod["metadata"]["name"], ns)
        return None
    progress = result.progress or status.get("progress") or "N/A"
    running = (True, "Pod Running", "") if result.phase == "Running" else \
        (False, result.reason or "Error", result.message)  # the kubelet restarts it (restartPolicy OnFailure)
    cond = next((c for c in status.get("conditions") or [] if c.get("type") == "Running"), {})
    if status.get("phase") != "ImportInProgress" or status.get("progress") != progress or \
            cond.get("reason") != running[1] or status != original:
        set_phase(ctx, dv, "ImportInProgress", progress=progress, running=running, ready=False)
    return None
