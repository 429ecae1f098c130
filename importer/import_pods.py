"""Cluster mode: a DataVolume's work runs in a Pod that Kubernetes places, as CDI's does.

The DataVolume reconcile (importer/reconcile.py) makes the claim in both modes; on a
cluster it then hands over here. The importer Pod (importer/pods.py) is the claim's first
consumer — a WaitForFirstConsumer class binds it where the Pod lands — so it is made
without waiting for Bound. The Pod reports back through its status (phase, restarts, a JSON
termination message: importer/pod_result.py's `import_result`); that is all the controller reads
of it, bounded, as anything a Pod writes is untrusted. A finished Pod is deleted; its claim
stays with the data (Succeeded) or goes with it (Failed: no half-written volume).

Clones from a claim or snapshot are the CSI sidecars' (the claim's dataSource): done when
the claim is Bound. An upload gets CDI's upload Pod and Service."""

from __future__ import annotations

from controlplane.context import Context
from controlplane.store import Obj
from importer.pod_result import import_result
from importer.pods import importer_pod, upload_pod, upload_service
from importer.reconcile import fail, set_phase


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
        return _upload(ctx, dv, pvc, ns)
    return _import(ctx, dv, pvc, ns)


def _import(ctx: Context, dv: Obj, pvc: Obj, ns: str) -> float | None:
    spec = importer_pod(dv, pvc, ctx.cluster.image, namespace=ns)
    pod = ctx.store.get("Pod", spec["metadata"]["name"], ns)
    if pod is None:
        ctx.store.apply(spec)
        if (dv.get("status") or {}).get("phase") != "ImportScheduled":
            set_phase(ctx, dv, "ImportScheduled", progress="N/A", ready=False,
                      event=("Normal", "ImportScheduled", f"Import into {pvc['metadata']['name']} scheduled"))
        return None
    return _follow(ctx, dv, pod, ns, "Import")


def _upload(ctx: Context, dv: Obj, pvc: Obj, ns: str) -> float | None:
    spec = upload_pod(dv, pvc, ctx.cluster.image, namespace=ns)
    service = upload_service(dv, pvc, namespace=ns)
    if ctx.store.get("Service", service["metadata"]["name"], ns) is None:
        ctx.store.apply(service)
    pod = ctx.store.get("Pod", spec["metadata"]["name"], ns)
    if pod is None:
        ctx.store.apply(spec)
        if (dv.get("status") or {}).get("phase") != "UploadScheduled":
            set_phase(ctx, dv, "UploadScheduled", progress="N/A", ready=False,
                      event=("Normal", "UploadScheduled", f"Upload into {pvc['metadata']['name']} scheduled"))
        return None
    return _follow(ctx, dv, pod, ns, "Upload")


def _follow(ctx: Context, dv: Obj, pod: Obj, ns: str, what: str) -> float | None:
    """The DataVolume's phase from its Pod's; a finished Pod is deleted."""
    result = import_result(pod)
    status = dv.get("status") or {}
    if result is None:  # not started yet (Pending): stays scheduled
        return None
    restarts = result.restarts
    if restarts != status.get("restartCount", 0):
        ctx.store.merge_status("DataVolume", dv["metadata"]["name"], ns, restartCount=restarts)
    if result.phase == "Succeeded":
        set_phase(ctx, dv, "Succeeded", progress="100.0%", running=(False, "Completed", ""), ready=True,
                  event=("Normal", f"{what}Succeeded", f"Successfully {what.lower()}ed into {dv['metadata']['name']}"))
        ctx.store.delete("Pod", pod["metadata"]["name"], ns)
        return None
    if result.phase == "Failed":
        fail(ctx, dv, result.reason or f"{what}Failed", result.message or f"the {what.lower()} Pod failed")
        ctx.store.delete("Pod", pod["metadata"]["name"], ns)
        return None
    phase = "UploadReady" if what == "Upload" else "ImportInProgress"
    progress = result.progress or status.get("progress") or "N/A"
    if status.get("phase") != phase or status.get("progress") != progress:
        set_phase(ctx, dv, phase, progress=progress, running=(True, "Pod Running", ""), ready=False)
    return None
