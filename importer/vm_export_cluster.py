"""A VirtualMachineExport on a cluster, as KubeVirt's controller runs it: a Service and an
exporter Pod (vm_export_pods.py) serving the source's claims, the Pod's readiness the
export's. The controller may create and delete Secrets but never read them: the token Secret
it makes is created once (one that exists is kept), the Pod mounts it; the serving
certificate is made here, its key only ever in the Secret the Pod mounts, its PEM on the Pod.

Only the internal links are given (https://virt-export-NAME.NS.svc/...): KubeVirt adds
external ones through an Ingress or Route, which pvlun does not make. Whoever owns what the
export made (its Pod, Service, Secrets, restored claims) is the export: Kubernetes' garbage
collector removes them with it. A claim is busy while a Pod the controller sees (its
importer and launcher Pods) uses it, or a VirtualMachineInstance names it.
"""

from __future__ import annotations

import secrets
import string

from controlplane.context import Context
from controlplane.store import Conflict, Obj, set_condition

from .upload_server import certificate_pem
from .vm_export import (REQUEUE, deleted_when_terminated, new_token, status_with_ttl, terminated, token_secret,
                        token_secret_name, write_status)
from .vm_export_pods import (CERT_ANNOTATION, cert_secret, exporter_name, exporter_pod, exporter_service,
                             internal_host)
from .vm_export_server import volume_urls
from .vm_export_sources import source_volumes


def reconcile_in_pods(ctx: Context, vme: Obj) -> float | None:
    meta = vme["metadata"]
    ns = meta.get("namespace", "default")
    if meta.get("deletionTimestamp"):
        return None  # what it made goes with it (ownerReferences)
    status, left = status_with_ttl(ctx, vme)
    if left is None:
        return None
    pod = ctx.store.get("Pod", exporter_name(vme), ns)
    if left <= 0:
        if deleted_when_terminated(ctx, vme, status):
            return None
        if pod is not None:
            _delete_pod(ctx, pod)
        return terminated(ctx, vme, status)
    if ctx.store.get("Service", exporter_name(vme), ns) is None:
        ctx.store.create(exporter_service(vme))
        ctx.store.add_event(vme, "Normal", "ServiceCreated", f"Created service {ns}/{exporter_name(vme)}")
    status["serviceName"] = exporter_name(vme)
    sources = source_volumes(ctx.store, vme, f"pod:{exporter_name(vme)}")
    if sources.vm_name:
        status["virtualMachineName"] = sources.vm_name
    set_condition(status, "PVCReady", *sources.pvc_condition)
    if not sources.available:
        if pod is not None:  # KubeVirt stops its exporter while the source is busy
            ctx.store.add_event(vme, "Warning", "ExportPaused", sources.message)
            _delete_pod(ctx, pod)
        status.pop("links", None)
        write_status(ctx, vme, status, "Pending", sources.ready_reason, sources.message)
        return min(REQUEUE, left)
    status["tokenSecretRef"] = _token_secret(ctx, vme)
    if pod is None:
        claims = [(volume, ctx.store.get("PersistentVolumeClaim", claim, ns)) for volume, claim in sources.volumes]
        _create_pod(ctx, vme, [(v, pvc) for v, pvc in claims if pvc is not None], status)
        status.pop("links", None)
        write_status(ctx, vme, status, "Pending", "PodPending", "")
        return min(REQUEUE, left)
    return _follow(ctx, vme, pod, status, sources.volumes, left)


def _token_secret(ctx: Context, vme: Obj) -> str:
    given = (vme.get("spec") or {}).get("tokenSecretRef")
    if given:
        return given
    name = (vme.get("status") or {}).get("tokenSecretRef") or token_secret_name(vme["metadata"]["name"])
    try:
        ctx.store.create(token_secret(vme, name, new_token()))
        ctx.store.add_event(vme, "Normal", "SecretCreated", f"Created default secret "
                                                            f"{vme['metadata'].get('namespace', 'default')}/{name}")
    except Conflict:
        pass  # made before: the Pod mounts it as it is
    return name


def _create_pod(ctx: Context, vme: Obj, claims: list[tuple[str, Obj]], status: Obj) -> None:
    assert ctx.cluster is not None
    ns, name = vme["metadata"].get("namespace", "default"), exporter_name(vme)
    cert, key = certificate_pem((internal_host(vme), name, f"{name}.{ns}"))
    suffix = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(10))
    secret = cert_secret(vme, f"{name}-{suffix}", cert, key)
    ctx.store.create(secret)
    ctx.store.create(exporter_pod(vme, claims, image=ctx.cluster.image, token_secret=status["tokenSecretRef"],
                                  cert_secret_name=secret["metadata"]["name"], cert_pem=cert.decode(),
                                  deadline=status["ttlExpirationTime"], pull_policy=ctx.cluster.pull_policy))
    ctx.store.add_event(vme, "Normal", "ExporterPodCreated", f"Created exporter pod {ns}/{name}")


def _delete_pod(ctx: Context, pod: Obj) -> None:
    """The Pod and the certificate Secret it mounts (made for it alone)."""
    ns = pod["metadata"].get("namespace", "default")
    for volume in (pod.get("spec") or {}).get("volumes") or []:
        if volume.get("name") == "certificates":
            ctx.store.delete("Secret", (volume.get("secret") or {}).get("secretName", ""), ns)
    ctx.store.delete("Pod", pod["metadata"]["name"], ns)


def _follow(ctx: Context, vme: Obj, pod: Obj, status: Obj, volumes: list[tuple[str, str]], left: float) -> float | None:
    """The export as its Pod is: Ready with its links, Pending, or (the Pod ended at the TTL) Terminated."""
    pod_status = pod.get("status") or {}
    phase = pod_status.get("phase")
    if phase in ("Succeeded", "Failed"):
        ctx.store.add_event(vme, "Warning", "ExporterPodFailedOrCompleted",
                            f"Exporter pod {pod['metadata'].get('namespace')}/{pod['metadata']['name']} is in phase {phase}")
        _delete_pod(ctx, pod)  # made again while the TTL lasts
        status.pop("links", None)
        write_status(ctx, vme, status, "Pending", "PodCompleted" if phase == "Succeeded" else "Unknown", "")
        return min(REQUEUE, left)
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in pod_status.get("conditions") or [])
    if not ready:
        status.pop("links", None)
        write_status(ctx, vme, status, "Pending", "PodPending" if phase in (None, "Pending") else "Unknown", "")
        return min(REQUEUE, left)
    base = f"https://{internal_host(vme)}"
    status["links"] = {"internal": {"cert": (pod["metadata"].get("annotations") or {}).get(CERT_ANNOTATION, ""),
                                    "volumes": [{"name": v, "formats": volume_urls(base, v)} for v, _ in volumes]}}
    write_status(ctx, vme, status, "Ready", "PodReady", "")
    return left
