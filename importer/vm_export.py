"""KubeVirt's VirtualMachineExport controller (export.kubevirt.io/v1beta1), embedded mode.

Where KubeVirt runs an exporter Pod and a Service, `pvlun serve` attaches the source's claims
read-only on its node (owner `vmexport/NS/NAME`, as kubelet would for the Pod) and serves them
from an in-process HTTPS server (vm_export_server.py) on loopback: status.links.external and
.internal carry its URLs and certificate. The token is the `token` key of the Secret
spec.tokenSecretRef names, or of one made for the export (`export-token-NAME`, owned by it),
named in status.tokenSecretRef. A source that cannot be served yet (in use, not populated)
leaves the export Pending, looked at again every few seconds, as KubeVirt requeues it; a
source that becomes busy stops the server (KubeVirt's ExportPaused).

ttlDuration (default 2h) counts from creation: when it runs out the server stops, the export
turns Terminated, and then it is deleted, as KubeVirt's exporter Pod ends at its deadline and
the controller deletes the export. Deleting it (finalizer `pvlun.dev/export-server`) stops
the server, detaches the claims and deletes the claims restored for a snapshot.

On a cluster KubeVirt's exporter Pod and Service serve it instead (vm_export_cluster.py).
"""

from __future__ import annotations

import base64
import copy
import logging
import secrets
import string
import threading
from datetime import datetime, timedelta, timezone

from controlplane import kubelet
from controlplane.context import Context
from controlplane.store import Obj, remove_finalizer, set_condition
from controlplane.vm_export_spec import parse_duration

from .vm_export_pods import exporter_name
from .vm_export_server import ExportedVolume, ExportServer, volume_urls
from .vm_export_sources import restored_claims, source_volumes

log = logging.getLogger("pvlun.vmexport")
KIND = "VirtualMachineExport"
API_VERSION = "export.kubevirt.io/v1beta1"
FINALIZER = "pvlun.dev/export-server"
SERVERS = "vm_exports"  # ctx.services key: export key -> RunningExport
DEFAULT_TTL = timedelta(hours=2)
REQUEUE = 3.0  # seconds, as KubeVirt requeues an export waiting for its source
TOKEN_KEY = "token"
TOKEN_LENGTH = 20

def expiration(vme: Obj) -> datetime:
    """creationTimestamp + ttlDuration (2h when none is given), as KubeVirt counts it."""
    created = datetime.strptime(vme["metadata"]["creationTimestamp"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    ttl = (vme.get("spec") or {}).get("ttlDuration")
    return created + (parse_duration(ttl) if ttl is not None else DEFAULT_TTL)


def owner_of(vme: Obj) -> str:
    """The attachment owner of the export's claims."""
    return f"vmexport/{vme['metadata'].get('namespace', 'default')}/{vme['metadata']['name']}"


def new_token() -> str:
    """KubeVirt's: 20 random letters and digits."""
    return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(TOKEN_LENGTH))


def token_secret(vme: Obj, name: str, token: str) -> Obj:
    """The export's own token Secret (key `token`), owned by it."""
    meta = vme["metadata"]
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": name, "namespace": meta.get("namespace", "default"), "ownerReferences": [
                {"apiVersion": API_VERSION, "kind": KIND, "name": meta["name"], "uid": meta.get("uid", ""),
                 "controller": True}]},
            "data": {TOKEN_KEY: base64.b64encode(token.encode()).decode()}}


def token_secret_name(export: str) -> str:
    """export-token-NAME, bounded to a DNS-1035 label as KubeVirt bounds it."""
    name = f"export-token-{export}"
    if len(name) <= 63:
        return name
    import hashlib
    return name[:54] + "-" + hashlib.sha256(name.encode()).hexdigest()[:8]


class RunningExport:
    """One export's server and the attachments it reads."""

    def __init__(self, server: ExportServer, attachments: list[kubelet.Attachment], claims: list[tuple[str, str]]):
        self.server, self.attachments, self.claims = server, attachments, claims


def _servers(ctx: Context) -> tuple[dict[str, RunningExport], threading.Lock]:
    ctx.services.setdefault(SERVERS + "_lock", threading.Lock())
    return ctx.services.setdefault(SERVERS, {}), ctx.services[SERVERS + "_lock"]


def reconcile_virtual_machine_export(ctx: Context, vme: Obj) -> float | None:
    meta = vme["metadata"]
    ns, name = meta.get("namespace", "default"), meta["name"]
    if ctx.cluster is not None:
        from .vm_export_cluster import reconcile_in_pods

        return reconcile_in_pods(ctx, vme)
    if meta.get("deletionTimestamp"):
        stop_export(ctx, vme)
        if FINALIZER in (meta.get("finalizers") or []):
            remove_finalizer(ctx.store, vme, FINALIZER)
        return None
    if FINALIZER not in (meta.get("finalizers") or []):
        ctx.store.patch_metadata(KIND, name, ns, finalizers=[*(meta.get("finalizers") or []), FINALIZER])
    status, left = status_with_ttl(ctx, vme)
    if left is None:
        return None
    if left <= 0:
        return _expire(ctx, vme, status)
    status["serviceName"] = exporter_name(vme)
    sources = source_volumes(ctx.store, vme, owner_of(vme))
    if sources.vm_name:
        status["virtualMachineName"] = sources.vm_name
    set_condition(status, "PVCReady", *sources.pvc_condition)
    # as KubeVirt: the token Secret is made once there is something to serve
    token, why = _token(ctx, vme, status) if sources.available else (None, "")
    if not sources.available or token is None:
        if stop_export(ctx, vme, paused=True):
            ctx.store.add_event(vme, "Warning", "ExportPaused", sources.message or why)
        status.pop("links", None)
        reason = sources.ready_reason or "Initializing"
        write_status(ctx, vme, status, "Pending", reason, sources.message if sources.ready_reason else why)
        return min(REQUEUE, left)
    running = _ensure_server(ctx, vme, sources.volumes, token)
    base = running.server.url
    link = {"cert": running.server.cert_pem,
            "volumes": [{"name": v, "formats": volume_urls(base, v)} for v, _ in running.claims]}
    status["links"] = {"internal": link, "external": dict(link)}
    write_status(ctx, vme, status, "Ready", "PodReady", "")
    return left


def status_with_ttl(ctx: Context, vme: Obj) -> tuple[Obj, float | None]:
    """A copy of the export's status to change, with ttlExpirationTime, and the seconds left
    (None: the ttlDuration cannot be read, and the export is Skipped)."""
    status = copy.deepcopy(vme.get("status") or {})  # set_condition changes its lists in place
    try:
        expires = expiration(vme)
    except ValueError as exc:
        write_status(ctx, vme, status, "Skipped", "Initializing", f"spec.ttlDuration: {exc}")
        return status, None
    status["ttlExpirationTime"] = expires.strftime("%Y-%m-%dT%H:%M:%SZ")
    return status, (expires - datetime.now(timezone.utc)).total_seconds()


def write_status(ctx: Context, vme: Obj, status: Obj, phase: str, reason: str, message: str) -> None:
    status["phase"] = phase
    set_condition(status, "Ready", phase == "Ready", reason, message)
    old = vme.get("status") or {}
    if _comparable(old) != _comparable(status):
        meta = vme["metadata"]
        ctx.store.update_status(KIND, meta["name"], meta.get("namespace", "default"), status)


def _comparable(status: Obj) -> Obj:
    """The status without heartbeat times: only a change is written."""
    return {**status, "conditions": [{k: v for k, v in c.items() if k not in ("lastHeartbeatTime", "lastTransitionTime")}
                                     for c in status.get("conditions") or []]}


def _token(ctx: Context, vme: Obj, status: Obj) -> tuple[str | None, str]:
    """The export's token, or None and why not; makes the export's own Secret when it names none."""
    from controlplane.secret_refs import SecretRefError, secret_data

    meta = vme["metadata"]
    ns = meta.get("namespace", "default")
    given = (vme.get("spec") or {}).get("tokenSecretRef")
    secret = given or status.get("tokenSecretRef") or token_secret_name(meta["name"])
    status["tokenSecretRef"] = secret
    if not given and ctx.store.get("Secret", secret, ns) is None:
        ctx.store.create(token_secret(vme, secret, new_token()))
        ctx.store.add_event(vme, "Normal", "SecretCreated", f"Created default secret {ns}/{secret}")
    try:
        token = secret_data(ctx.store, secret, ns, "token secret").get(TOKEN_KEY, "")
    except SecretRefError as exc:
        return None, str(exc)
    if not token:
        return None, f"token secret {ns}/{secret} has no {TOKEN_KEY!r} key"
    return token, ""


def _ensure_server(ctx: Context, vme: Obj, claims: list[tuple[str, str]], token: str) -> RunningExport:
    key = owner_of(vme)
    servers, lock = _servers(ctx)
    with lock:
        running = servers.get(key)
        if running is not None and running.claims == claims and running.server.token == token.encode():
            return running
    if running is not None:
        stop_export(ctx, vme)
    ns = vme["metadata"].get("namespace", "default")
    attachments: list[kubelet.Attachment] = []
    try:
        for _, claim in claims:
            attachments.append(kubelet.attach(ctx.store, ctx.csi, ctx.data_dir, claim, ns, ctx.node_id, key,
                                              readonly=True))
        server = ExportServer([ExportedVolume(v, a.path) for (v, _), a in zip(claims, attachments)], token,
                              export_uid=vme["metadata"].get("uid", "")).start()
    except BaseException:
        for att in attachments:
            kubelet.detach(ctx.store, ctx.csi, att.volume_id, att.node_id, key)
        raise
    running = RunningExport(server, attachments, claims)
    with lock:
        servers[key] = running
    ctx.store.add_event(vme, "Normal", "ExporterPodCreated", f"Serving {len(claims)} volume(s) at {server.url}")
    return running


def stop_export(ctx: Context, vme: Obj, paused: bool = False) -> bool:
    """Stop the export's server and detach its claims (and, unless only paused, delete the
    claims restored for it); True when a server was running."""
    key = owner_of(vme)
    servers, lock = _servers(ctx)
    with lock:
        running = servers.pop(key, None)
    if running is not None:
        running.server.stop()
    for att in kubelet.attachments_of(ctx.store, key):  # also those a restart left behind
        spec = att["spec"]
        kubelet.detach(ctx.store, ctx.csi, spec["volumeId"], spec["nodeName"], key)
    if not paused:
        ns = vme["metadata"].get("namespace", "default")
        for claim in restored_claims(ctx.store, vme):
            ctx.store.delete("PersistentVolumeClaim", claim, ns)
    return running is not None


def stop_all(ctx: Context) -> None:
    """The daemon stops: every export server ends and gives its claims back."""
    servers, lock = _servers(ctx)
    with lock:
        keys = list(servers)
    for key in keys:
        _, ns, name = key.split("/", 2)
        stop_export(ctx, {"metadata": {"name": name, "namespace": ns}}, paused=True)


def _expire(ctx: Context, vme: Obj, status: Obj) -> float | None:
    if deleted_when_terminated(ctx, vme, status):
        return None
    stop_export(ctx, vme)
    return terminated(ctx, vme, status)


def deleted_when_terminated(ctx: Context, vme: Obj, status: Obj) -> bool:
    """An export seen Terminated goes now, as KubeVirt deletes it once its TTL ran out."""
    if status.get("phase") != "Terminated":
        return False
    meta = vme["metadata"]
    ctx.store.delete(KIND, meta["name"], meta.get("namespace", "default"))
    return True


def terminated(ctx: Context, vme: Obj, status: Obj) -> float:
    """Its server ended at the TTL: Terminated (looked at again in a second, to be deleted)."""
    status.pop("links", None)
    ctx.store.add_event(vme, "Normal", "ExportTerminated", f"ttlDuration ran out at {status['ttlExpirationTime']}")
    write_status(ctx, vme, status, "Terminated", "PodCompleted",
                 f"the export's ttlDuration ran out at {status['ttlExpirationTime']}")
    return 1.0
