"""Cluster mode: VirtualMachines as KubeVirt's virt-controller runs them — a VM makes and
removes its VirtualMachineInstance as its runStrategy says, a VMI gets one launcher Pod
(virt/pods.py; `pvlun launch` inside) whose status it mirrors — the Pod it runs in, which a
migration (virt/migration_pods.py) changes. Kubernetes places the Pods and the kubelet
attaches the claims through the CSI driver; the Pods' own ownerReferences let Kubernetes'
garbage collector remove them with their VMI.

The VM reconcile (virt/reconcile.py) hands over here when the Context is a cluster's; the
VM's fields mean the same in both modes (controlplane/vm_spec.py parses them)."""

from __future__ import annotations

import time

from controlplane.context import Context
from controlplane.instancetype_revisions import vm_as_run
from controlplane.store import Obj, remove_finalizer, set_condition
from controlplane.user_text import user_text
from controlplane.vm_spec import SpecError
from virt.container_volumes import cluster_refusal
from virt.migration_job import job_key
from virt.migration_status import in_flight
from virt.pod_status import launcher_status
from virt.pods import CREATED_BY_LABEL, launcher_pod
from virt.reconcile import (CRASH_LIMIT, CRASH_WINDOW, FINALIZER, VMI_FINALIZER, apply_start_stop, ensure_data_volumes, ensure_vmi, finish_request, requested,
                            volumes_ready)

FINISHED = ("Succeeded", "Failed")


def _ns(obj: Obj) -> str:
    return obj["metadata"].get("namespace", "default")


def _vm_status(ctx: Context, vm: Obj, printable: str, ready: bool = False, message: str = "", **extra) -> None:
    status = dict(vm.get("status") or {})
    created = ctx.store.get("VirtualMachineInstance", vm["metadata"]["name"], _ns(vm)) is not None
    status.update(printableStatus=printable, ready=ready, created=created, **extra)
    set_condition(status, "Ready", ready, printable, message)
    if status != vm.get("status"):
        ctx.store.update_status("VirtualMachine", vm["metadata"]["name"], _ns(vm), status)


def _want_running(vm: Obj, strategy: str) -> bool:
    """As embedded (virt/reconcile.py): a run that ended since the last start request counts
    for Manual (ended) and RerunOnFailure (ended well)."""
    status = vm.get("status") or {}
    ended_since_start = float(status.get("lastRunEndedAt") or 0) >= float(status.get("startRequestedAt") or 0) > 0 \
        or (float(status.get("lastRunEndedAt") or 0) > 0 and not status.get("startRequestedAt"))
    if strategy == "Always":
        return True
    if strategy == "Halted":
        return False
    if strategy == "RerunOnFailure":
        return not (ended_since_start and status.get("lastRunEnded") == "Succeeded")
    return bool(status.get("manualRunning")) and not ended_since_start


def _handle_request(ctx: Context, vm: Obj, parsed) -> None:
    """start/stop as embedded; restart ends the VMI (its runStrategy makes a new one); pause
    and unpause need the launcher's QMP, which the controller does not reach yet."""
    request = requested(vm)
    if not request:
        return
    spec_changes = {}
    if request in ("start", "stop"):
        spec_changes = apply_start_stop(ctx, vm, parsed, request)
    elif request == "restart":
        ctx.store.delete("VirtualMachineInstance", vm["metadata"]["name"], _ns(vm))
        ctx.store.merge_status("VirtualMachine", vm["metadata"]["name"], _ns(vm), startRequestedAt=time.time())
    else:
        ctx.store.add_event(vm, "Warning", "RequestNotSupported", f"{request} is not available on a cluster yet")
    finish_request(ctx, vm, request, spec_changes)


def reconcile_vm_in_pods(ctx: Context, vm: Obj) -> float | None:
    """The VM's VMI as its runStrategy wants it; the VM's status from its VMI's."""
    meta, ns = vm["metadata"], _ns(vm)
    vmi = ctx.store.get("VirtualMachineInstance", meta["name"], ns)
    if meta.get("deletionTimestamp"):
        if vmi is not None:
            ctx.store.delete("VirtualMachineInstance", meta["name"], ns)  # its Pod goes with it (ownerReferences)
            return None
        remove_finalizer(ctx.store, vm, FINALIZER)
        return None
    try:
        vm, parsed = vm_as_run(ctx.store, vm)  # its instancetype and preference applied
    except SpecError as exc:
        _vm_status(ctx, vm, "ErrorUnschedulable", message=user_text(exc))
        return None
    _handle_request(ctx, vm, parsed)
    vm = ctx.store.get("VirtualMachine", meta["name"], ns) or vm
    vm, parsed = vm_as_run(ctx.store, vm)  # its instancetype and preference applied
    refusal = cluster_refusal(parsed.template)
    if refusal:  # a launcher Pod would need the image pulled as a container of its own: not done yet
        _vm_status(ctx, vm, "ErrorUnschedulable", message=refusal)
        return None
    ensure_data_volumes(ctx, vm, parsed.data_volume_templates)
    if vmi is not None and vmi["metadata"].get("deletionTimestamp"):
        _vm_status(ctx, vm, "Stopping")  # its launcher Pods are still going: no new run before they are gone
        return None
    phase = ((vmi or {}).get("status") or {}).get("phase")
    if vmi is not None and phase in FINISHED:
        ctx.store.delete("VirtualMachineInstance", meta["name"], ns)  # a new run gets a new VMI (and Pod)
        crashes = _recent_crashes(vm) + ([time.time()] if phase == "Failed" else [])
        _vm_status(ctx, vm, "Stopped" if phase == "Succeeded" else "CrashLoopBackOff",
                   lastRunEnded=phase, lastRunEndedAt=time.time(), crashes=crashes)
        return None
    if not _want_running(vm, parsed.run_strategy):
        if vmi is not None:
            ctx.store.delete("VirtualMachineInstance", meta["name"], ns)
            _vm_status(ctx, vm, "Stopping")
        else:
            _vm_status(ctx, vm, "Stopped")
        return None
    if vmi is None:
        waiting = volumes_ready(ctx, vm, parsed.template)
        if waiting:
            _vm_status(ctx, vm, waiting[0], message=waiting[1])
            return None
        crashes = _recent_crashes(vm)
        if len(crashes) >= CRASH_LIMIT:  # as embedded: runs that keep failing are started again ever later
            backoff = min(300.0, 10.0 * 2 ** (len(crashes) - CRASH_LIMIT))
            if time.time() - crashes[-1] < backoff:
                _vm_status(ctx, vm, "CrashLoopBackOff", message="its last runs failed")
                return backoff - (time.time() - crashes[-1])
        ensure_vmi(ctx, vm)
        _vm_status(ctx, vm, "Starting")
        return None
    printable = {"Running": "Running", "Scheduled": "Starting", "Scheduling": "Starting"}.get(phase or "", "Starting")
    if printable == "Running" and in_flight(vmi):
        printable = "Migrating"
    _vm_status(ctx, vm, printable, ready=printable in ("Running", "Migrating"))
    return None


def _recent_crashes(vm: Obj) -> list[float]:
    """When the VM's runs failed, within the crash window (bounded: the status stays small)."""
    crashes = (vm.get("status") or {}).get("crashes")
    if not isinstance(crashes, list):
        return []
    return [t for t in crashes if isinstance(t, (int, float)) and t > time.time() - CRASH_WINDOW][-10:]


def _release(ctx: Context, vmi: Obj) -> float | None:
    """A VMI being deleted: its launcher Pods are deleted (they stop their QEMU in their grace
    period); only once none is left does the VMI go, and with it the hold on a new run."""
    uid, ns = vmi["metadata"].get("uid"), _ns(vmi)
    pods = [p for p in ctx.store.list("Pod", ns) if (p["metadata"].get("labels") or {}).get(CREATED_BY_LABEL) == uid]
    for pod in pods:
        if not pod["metadata"].get("deletionTimestamp"):
            ctx.store.delete("Pod", pod["metadata"]["name"], ns)
    if pods:
        return 2.0  # a Pod's end reaches the VMI through its ownerReference; this is for one that does not
    if VMI_FINALIZER in (vmi["metadata"].get("finalizers") or []):
        remove_finalizer(ctx.store, vmi, VMI_FINALIZER)
    return None


def claims_of(ctx: Context, vmi: Obj) -> tuple[dict[str, Obj], str]:
    """Claim name → the claim, for every claim the VMI's volumes name; else ({}, what is missing)."""
    claims = {}
    for volume in (vmi.get("spec") or {}).get("volumes") or []:
        if not isinstance(volume, dict):
            continue
        name = (volume.get("persistentVolumeClaim") or {}).get("claimName") or (volume.get("dataVolume") or {}).get("name")
        if not name:
            continue
        pvc = ctx.store.get("PersistentVolumeClaim", name, _ns(vmi))
        if pvc is None:
            return {}, f"PersistentVolumeClaim {name} does not exist"
        claims[name] = pvc
    return claims, ""


def active_pod(ctx: Context, vmi: Obj) -> Obj | None:
    """The Pod the VMI runs in, as its status.activePods names it (KubeVirt's map of pod uid
    to node; after a migration, the target's): one of the VMI's own launcher Pods."""
    active = (vmi.get("status") or {}).get("activePods")
    uid = vmi["metadata"].get("uid")
    if not isinstance(active, dict) or not active or not uid:
        return None
    for pod in ctx.store.list("Pod", _ns(vmi)):
        meta = pod["metadata"]
        if meta.get("uid") in active and (meta.get("labels") or {}).get(CREATED_BY_LABEL) == uid:
            return pod
    return None


def _first_pod(ctx: Context, vmi: Obj) -> Obj | None:
    """Before the VMI runs anywhere: its launcher Pod, made once (None meanwhile)."""
    meta, ns = vmi["metadata"], _ns(vmi)
    claims, missing = claims_of(ctx, vmi)
    if missing:
        ctx.store.merge_status("VirtualMachineInstance", meta["name"], ns, phase="Pending", reason=missing)
        return None
    try:
        spec = launcher_pod(vmi, claims, ctx.cluster.image, namespace=ns, kvm=ctx.cluster.kvm)
    except (ValueError, SpecError) as exc:
        ctx.store.merge_status("VirtualMachineInstance", meta["name"], ns, phase="Failed", reason=user_text(exc))
        ctx.store.add_event(vmi, "Warning", "FailedCreate", user_text(exc))
        return None
    pod = ctx.store.get("Pod", spec["metadata"]["name"], ns)
    if pod is None:
        ctx.store.apply(spec)
        ctx.store.add_event(vmi, "Normal", "SuccessfulCreate", f"Created virtual machine pod {spec['metadata']['name']}")
        ctx.store.merge_status("VirtualMachineInstance", meta["name"], ns, phase="Scheduling")
    return pod


def reconcile_vmi_in_pods(ctx: Context, vmi: Obj) -> float | None:
    """A VMI's launcher Pod, made once; the VMI's status mirrors the Pod it runs in (the one
    its activePods names: after a migration, the target's). While a migration may move it,
    the migration has the last word (virt/migration_pods.py)."""
    assert ctx.cluster is not None
    meta, ns = vmi["metadata"], _ns(vmi)
    status = vmi.get("status") or {}
    if meta.get("deletionTimestamp"):
        return _release(ctx, vmi)
    if status.get("phase") in FINISHED or ctx.jobs.running(job_key(ns, meta["name"])):
        return None
    if status.get("activePods"):
        pod = active_pod(ctx, vmi)
        if pod is None:
            if not in_flight(vmi):
                ctx.store.merge_status("VirtualMachineInstance", meta["name"], ns, phase="Failed",
                                       reason="its launcher Pod is gone")
            return None
    else:
        pod = _first_pod(ctx, vmi)
        if pod is None:
            return None
    name = next((i.get("name") for i in status.get("interfaces") or [] if isinstance(i, dict)), None)
    fields = launcher_status(pod, interface=name if isinstance(name, str) else None)
    if fields["phase"] != "Running" and in_flight(vmi):
        return None  # a source that ended may have handed its guest over: the migration says
    if any(status.get(k) != v for k, v in fields.items()):
        ctx.store.merge_status("VirtualMachineInstance", meta["name"], ns, **fields)
    return None
