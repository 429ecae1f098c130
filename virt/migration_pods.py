"""Cluster mode: KubeVirt's migration controller. A VirtualMachineInstanceMigration gets a
shared token (a Secret, made and deleted with direct calls: the controller may create and
delete Secrets but never read them), a target launcher Pod on another node that waits for
the stream with that token, and — once the target listens (its Pod is Ready) — a job that
carries the migration out (virt/migration_job.py). The phases follow the target Pod (see
virt/migration_status.py); the VMIM carries a finalizer so that its deletion, while the
stream runs, aborts it first (KubeVirt: abort if possible) and takes the target Pod and the
Secret along.

One migration of a VMI at a time: the oldest unfinished one goes first, the others wait
Pending. The token lives in the controller's memory only; a controller that restarted
before the stream began fails the migration (a new one gets a new token), one that
restarted while it ran settles it from the Pods (migration_job.settle)."""

from __future__ import annotations

import base64
import secrets
import time

from controlplane.context import Context
from controlplane.store import Conflict, Obj, remove_finalizer
from controlplane.user_text import user_text
from controlplane.vm_spec import SpecError
from virt.launch_pods import active_pod, claims_of
from virt.live_migration import FINALIZER, not_migratable
from virt.migration_job import MigrationRun, delete_quietly, job_key, running_jobs, set_phase
from virt.migration_status import FINISHED, IN_FLIGHT, started_state
from virt.pod_status import launcher_status, migration_address
from virt.pods import MIGRATION_JOB_LABEL, MIGRATION_PORT, migration_target_pod, vmi_spec

VMIM, VMI = "VirtualMachineInstanceMigration", "VirtualMachineInstance"
TOKEN_KEY = "token"
PENDING_RECHECK = 2.0  # seconds between looks of a migration waiting for another of its VMI


def _ns(obj: Obj) -> str:
    return obj["metadata"].get("namespace", "default")


def _tokens(ctx: Context) -> dict[str, str]:
    """Migration uid → its token, in memory only (never in a log, event or status)."""
    return ctx.services.setdefault("migration_tokens", {})


def token_secret_name(mig: Obj) -> str:
    return f"pvlun-migration-{mig['metadata']['uid']}"


def token_secret(mig: Obj, token: str) -> Obj:
    """The Secret the target Pod mounts: key `token`, immutable, owned by the migration (so
    Kubernetes removes it with the migration if the controller could not)."""
    meta = mig["metadata"]
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "immutable": True,
            "metadata": {"name": token_secret_name(mig), "namespace": _ns(mig),
                         "labels": {MIGRATION_JOB_LABEL: meta["uid"]},
                         "ownerReferences": [{"apiVersion": "kubevirt.io/v1", "kind": VMIM, "name": meta["name"],
                                              "uid": meta["uid"], "controller": True}]},
            "data": {TOKEN_KEY: base64.b64encode(token.encode()).decode()}}


def release(ctx: Context, mig: Obj) -> None:
    """Take away what the migration made: its target Pod (unless the VMI now runs there),
    its token Secret, its token."""
    ns, uid = _ns(mig), mig["metadata"]["uid"]
    vmi = ctx.store.get(VMI, (mig.get("spec") or {}).get("vmiName", ""), ns) or {}
    active = (vmi.get("status") or {}).get("activePods") or {}
    for pod in ctx.store.list("Pod", ns):
        meta = pod["metadata"]
        if (meta.get("labels") or {}).get(MIGRATION_JOB_LABEL) == uid and meta.get("uid") not in active:
            delete_quietly(ctx, "Pod", meta["name"], ns)
    delete_quietly(ctx, "Secret", token_secret_name(mig), ns)
    _tokens(ctx).pop(uid, None)


def _fail(ctx: Context, mig: Obj, error: str) -> None:
    release(ctx, mig)
    set_phase(ctx, mig, "Failed", error=error)
    ctx.store.add_event(mig, "Warning", "FailedMigration", error)


def _first_in_line(ctx: Context, mig: Obj) -> bool:
    """Whether no older unfinished migration of the same VMI is still there."""
    vmi_name = mig["spec"].get("vmiName")
    waiting = [m for m in ctx.store.list(VMIM, _ns(mig))
               if (m.get("spec") or {}).get("vmiName") == vmi_name
               and ((m.get("status") or {}).get("phase") not in FINISHED)]
    waiting.sort(key=lambda m: (m["metadata"].get("creationTimestamp") or "", m["metadata"]["name"]))
    return not waiting or waiting[0]["metadata"]["uid"] == mig["metadata"]["uid"]


def _token(ctx: Context, mig: Obj, phase: str | None) -> str | None:
    """The migration's token, made (with its Secret) before its target Pod; None when a
    restarted controller lost it."""
    uid = mig["metadata"]["uid"]
    token = _tokens(ctx).get(uid)
    if token is None and phase in (None, "", "Pending"):
        token = secrets.token_urlsafe(32)
        try:
            ctx.store.create(token_secret(mig, token))
        except Conflict:
            return None  # a Secret of an earlier controller's: its token is gone with it
        _tokens(ctx)[uid] = token
    return token


def _start(ctx: Context, mig: Obj, run: MigrationRun, how: str, *args: str) -> None:
    """Run `run.start(*args)` or `run.recover()` as the VMI's migration job."""
    key, uid = run.key, mig["metadata"]["uid"]
    running_jobs(ctx)[key] = uid

    def job() -> None:
        try:
            run.cancel = ctx.jobs.cancel_event(key)
            getattr(run, how)(*args)
        finally:
            running_jobs(ctx).pop(key, None)
            _tokens(ctx).pop(uid, None)

    if not ctx.jobs.start(key, job):
        running_jobs(ctx).pop(key, None)


def reconcile_migration_in_pods(ctx: Context, mig: Obj) -> float | None:
    """The migration's target Pod, token and phases; its job once the target listens."""
    assert ctx.cluster is not None
    meta, ns = mig["metadata"], _ns(mig)
    status = mig.get("status") or {}
    phase = status.get("phase")
    if not isinstance(mig.get("spec"), dict) or not isinstance(mig["spec"].get("vmiName"), str):
        return None  # admission (the CRD's schema) refuses these
    key = job_key(ns, mig["spec"]["vmiName"])
    ours = running_jobs(ctx).get(key) == meta["uid"]
    if ours and ctx.jobs.running(key):
        if not meta.get("deletionTimestamp"):
            return None
        ctx.jobs.cancel(key)  # a running job aborts the stream and cleans up; its end brings us back
        if ctx.jobs.running(key):
            return None
    if ours:
        running_jobs(ctx).pop(key, None)  # its job was dropped before it ran
    vmi = ctx.store.get(VMI, mig["spec"]["vmiName"], ns)
    if phase in IN_FLIGHT:  # the stream was under way when this controller lost it: where is the guest?
        state = status.get("migrationState") or {}
        if vmi is not None and state.get("sourcePod") and state.get("migrationUid") == meta["uid"]:
            _start(ctx, mig, MigrationRun(ctx, mig, vmi, state), "recover")
            return None
        _fail(ctx, mig, "the migration was interrupted and what it moved is gone")
        return None
    if meta.get("deletionTimestamp"):
        if phase != "Succeeded":
            release(ctx, mig)
        remove_finalizer(ctx.store, mig, FINALIZER)
        return None
    if phase in FINISHED:
        return None
    if FINALIZER not in (meta.get("finalizers") or []):  # a deletion then waits for the cleanup
        ctx.store.patch_metadata(VMIM, meta["name"], ns, finalizers=(meta.get("finalizers") or []) + [FINALIZER])
        return None
    if vmi is None or (vmi.get("status") or {}).get("phase") != "Running":
        _fail(ctx, mig, f"VirtualMachineInstance {mig['spec']['vmiName']} is not running")
        return None
    if not _first_in_line(ctx, mig) or ctx.jobs.running(key):
        if phase != "Pending":
            set_phase(ctx, mig, "Pending")
        return PENDING_RECHECK  # the end of the one before it changes nothing this one links to
    return _prepare_target(ctx, mig, vmi, phase)


def _prepare_target(ctx: Context, mig: Obj, vmi: Obj, phase: str | None) -> float | None:
    meta, ns = mig["metadata"], _ns(mig)
    source = active_pod(ctx, vmi)
    claims, missing = claims_of(ctx, vmi)
    try:
        problem = missing or not_migratable(ctx, vmi_spec(vmi)) or ("" if source is not None else
                                                                     "the VMI's launcher Pod is not known")
    except SpecError as exc:
        problem = user_text(exc)
    if problem:
        _fail(ctx, mig, problem)
        return None
    token = _token(ctx, mig, phase)
    if token is None:
        _fail(ctx, mig, "the migration's token was lost (the controller restarted before the stream began); "
              "create the migration again")
        return None
    port = ctx.cluster.migration_port or MIGRATION_PORT
    try:
        spec = migration_target_pod(vmi, mig, claims, ctx.cluster.image, namespace=ns, kvm=ctx.cluster.kvm,
                                    source_node=(vmi.get("status") or {}).get("nodeName", ""), port=port,
                                    token_secret=token_secret_name(mig))
    except (ValueError, SpecError) as exc:
        _fail(ctx, mig, user_text(exc))
        return None
    pod = ctx.store.get("Pod", spec["metadata"]["name"], ns)
    if pod is None:
        if phase not in (None, "", "Pending"):
            _fail(ctx, mig, f"the target pod {spec['metadata']['name']} was deleted")
            return None
        ctx.store.apply(spec)
        ctx.store.add_event(mig, "Normal", "SuccessfulCreate", f"Created migration target pod {spec['metadata']['name']}")
        set_phase(ctx, mig, "Scheduling")
        return None
    target = launcher_status(pod)
    if target["phase"] in FINISHED or target["phase"] == "Unknown":
        _fail(ctx, mig, f"target pod {pod['metadata']['name']} ended: {target.get('reason') or target['phase']}")
        return None
    address = migration_address(pod)
    if address is None:
        want = "PreparingTarget" if target["phase"] == "Running" else \
            "Scheduled" if target["phase"] == "Scheduled" else "Scheduling"
        if want != phase:
            set_phase(ctx, mig, want, targetPod=pod["metadata"]["name"], targetNode=target.get("nodeName", ""))
        return None
    state = started_state(mig, vmi, source, pod, address, time.time())
    _start(ctx, mig, MigrationRun(ctx, mig, vmi, state), "start", address, token, token_secret_name(mig))
    return None
