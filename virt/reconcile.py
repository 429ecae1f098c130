"""VirtualMachine and VirtualMachineInstanceMigration reconcile (KubeVirt's virt-controller
and virt-handler, folded into one process in embedded mode).

State-change requests (start, stop, restart, pause, unpause) arrive as the annotation
`pvlun.dev/state-change-request` on the VirtualMachine, written by `pvlun vm ...`.

A VirtualMachine carries a finalizer (as KubeVirt's does) from its first reconcile on, before
anything of it runs: deleting it stops its QEMU (ACPI powerdown, `quit` after a short grace,
then SIGKILL), which detaches its volumes; then its VMI, run directories and console history
go, and the VM itself. Its DataVolumes follow through the garbage collector (ownerReferences).
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import time

from controlplane import kubelet
from controlplane.context import Context
from controlplane.instancetype_revisions import vm_as_run
from controlplane.store import Obj, remove_finalizer, set_condition
from controlplane.user_text import user_text
from virt.launcher import LaunchError, Phase
from virt.qemu_args import guest_device_names, node_name
from virt.runtime import CSI_SOURCES, VmRuntime, owned_by_vm, owner
from virt.spec_warnings import announce_ignored
from controlplane.vm_spec import DEFAULT_GRACE_SECONDS, SpecError

log = logging.getLogger("pvlun.virt")
REQUEST = "pvlun.dev/state-change-request"
CRASH_WINDOW = 120  # seconds; failures inside it count towards CrashLoopBackOff
CRASH_LIMIT = 3
FINALIZER = "pvlun.dev/virtual-machine"
VMI_FINALIZER = "pvlun.dev/launcher-pods"
DELETE_GRACE_SECONDS = 30  # at most this long for the guest to power off when its VM is deleted


def runtime(ctx: Context) -> VmRuntime:
    if "vms" not in ctx.services:
        ctx.services["vms"] = VmRuntime(ctx, ctx.services.get("accel"))
    return ctx.services["vms"]


def key_of(obj: Obj) -> str:
    return f"{obj['metadata'].get('namespace', 'default')}/{obj['metadata']['name']}"


def _vm_status(ctx: Context, vm: Obj, printable: str, ready: bool = False, message: str = "", **extra) -> None:
    ns, name = vm["metadata"].get("namespace", "default"), vm["metadata"]["name"]
    status = dict(vm.get("status") or {})
    status.update(printableStatus=printable, ready=ready, created=bool(runtime(ctx).get(key_of(vm))), **extra)
    set_condition(status, "Ready", ready, printable, message)
    ctx.store.update_status("VirtualMachine", name, ns, status)


def ensure_data_volumes(ctx: Context, vm: Obj, templates) -> None:
    ns = vm["metadata"].get("namespace", "default")
    for template in templates:
        name = template["metadata"]["name"]
        if ctx.store.get("DataVolume", name, ns) is None:
            dv = {"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
                  "metadata": {**copy.deepcopy(template["metadata"]), "namespace": ns,
                               "ownerReferences": [{"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
                                                    "name": vm["metadata"]["name"], "uid": vm["metadata"]["uid"],
                                                    "controller": True}]},
                  "spec": copy.deepcopy(template["spec"])}
            ctx.store.apply(dv)


def volumes_ready(ctx: Context, vm: Obj, spec) -> tuple[str, str] | None:
    """None when every volume can be attached; else (printableStatus, message)."""
    ns = spec.namespace
    for volume in spec.volumes:
        if volume.source == "dataVolume":
            dv = ctx.store.get("DataVolume", volume.claim_name, ns)
            phase = ((dv or {}).get("status") or {}).get("phase")
            if dv is None:
                return "DataVolumeError", f"DataVolume {volume.claim_name} does not exist"
            if phase == "Failed":
                return "DataVolumeError", f"DataVolume {volume.claim_name} failed"
            if phase != "Succeeded":
                return "Provisioning", f"waiting for DataVolume {volume.claim_name} ({phase or 'Pending'})"
        elif volume.source == "persistentVolumeClaim":
            pvc = ctx.store.get("PersistentVolumeClaim", volume.claim_name, ns)
            if pvc is None:
                return "ErrorPvcNotFound", f"PersistentVolumeClaim {volume.claim_name} does not exist"
            if (pvc.get("status") or {}).get("phase") != "Bound":
                return "Provisioning", f"waiting for PersistentVolumeClaim {volume.claim_name} to be bound"
    return None


def _want_running(vm: Obj, strategy: str, last_exit) -> bool:
    if strategy == "Always":
        return True
    if strategy == "Halted":
        return False
    if strategy == "RerunOnFailure":
        return not (last_exit and last_exit[0] == "Succeeded" and last_exit[2] >= _created(vm))
    # Manual: what the last request said, until that run ends (a crash or shutdown is not restarted)
    ended = last_exit is not None and last_exit[2] >= _created(vm)
    return (vm.get("status") or {}).get("manualRunning", False) and not ended


def _created(vm: Obj) -> float:
    return float((vm.get("status") or {}).get("startRequestedAt", 0))


def requested(vm: Obj) -> str | None:
    return (vm["metadata"].get("annotations") or {}).get(REQUEST) or None


def apply_start_stop(ctx: Context, vm: Obj, parsed, request: str) -> dict:
    """virtctl's start/stop: start turns Halted into Always, stop turns Always and
    RerunOnFailure into Halted; RerunOnFailure is otherwise kept (started again through
    startRequestedAt), Manual always is. The spec changes to write."""
    ns, name = vm["metadata"].get("namespace", "default"), vm["metadata"]["name"]
    strategy = parsed.run_strategy
    new = {"start": "Always", "stop": "Halted"}[request]
    changes = {"start": ("Halted",), "stop": ("Always", "RerunOnFailure")}[request]
    ctx.store.merge_status("VirtualMachine", name, ns, manualRunning=request == "start",
                           startRequestedAt=time.time() if request == "start" else _created(vm))
    if strategy != new and (strategy in changes or "running" in (vm.get("spec") or {})):
        return {"runStrategy": new}
    return {}


def finish_request(ctx: Context, vm: Obj, request: str, spec_changes: dict) -> None:
    """Write the request's spec changes and clear it (as KubeVirt's subresources would)."""
    ns, name = vm["metadata"].get("namespace", "default"), vm["metadata"]["name"]
    if spec_changes:
        current = ctx.store.get("VirtualMachine", name, ns)
        current["spec"].pop("running", None)
        current["spec"].update(spec_changes)
        ctx.store.apply(current)
    ctx.store.annotate("VirtualMachine", name, ns, **{REQUEST: None})
    ctx.store.add_event(vm, "Normal", f"{request.capitalize()}Requested", f"{request} requested")


def _handle_request(ctx: Context, vm: Obj, parsed, rt: VmRuntime) -> None:
    """Apply one state-change request and clear it."""
    request = requested(vm)
    if not request:
        return
    ns, name, key = vm["metadata"].get("namespace", "default"), vm["metadata"]["name"], key_of(vm)
    running = rt.get(key)
    spec_changes = {}
    if request in ("restart", "pause", "unpause") and not running and ctx.jobs.running("vm:" + key):
        return  # a run is starting (or stopping): the request waits for it; the job's end brings the VM back here
    if request in ("start", "stop"):
        spec_changes = apply_start_stop(ctx, vm, parsed, request)
    elif request == "restart" and running:
        def restart() -> None:
            rt.stop(key, grace=min(parsed.template.termination_grace_period, 30))
            deadline = time.monotonic() + 30
            while rt.get(key) is not None and time.monotonic() < deadline:
                time.sleep(0.05)  # its end recorded (detached, last_exit) — a slow host may lag behind QEMU's exit
            # a new run is wanted: the end just recorded must not hold back Manual or RerunOnFailure
            ctx.store.merge_status("VirtualMachine", name, ns, startRequestedAt=time.time())

        ctx.jobs.start("vm:" + key, restart)
    elif request == "pause" and running:
        running.launcher.pause()
    elif request == "unpause" and running:
        running.launcher.unpause()
    finish_request(ctx, vm, request, spec_changes)


def ensure_vmi(ctx: Context, vm: Obj) -> None:
    meta = vm["metadata"]
    ns = meta.get("namespace", "default")
    template = (vm.get("spec") or {}).get("template") or {}
    vmi = ctx.store.apply({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
                     "metadata": {"name": meta["name"], "namespace": ns,
                                  # on a cluster a VMI outlives its deletion until its launcher Pods are gone,
                                  # so the next run's QEMU never opens the disks while the last one's still may
                                  **({"finalizers": [VMI_FINALIZER]} if ctx.cluster is not None else {}),
                                  "labels": (template.get("metadata") or {}).get("labels", {}),
                                  "ownerReferences": [{"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
                                                       "name": meta["name"], "uid": meta["uid"], "controller": True}]},
                     "spec": copy.deepcopy(template.get("spec") or {}),
                     "status": {"phase": "Pending"}})
    announce_ignored(ctx, vmi)


def follow_volume_qos(ctx: Context, running) -> None:
    """A volume's maxIOPS/maxMBps changed (ControllerModifyVolume): change QEMU's throttle
    group live, so the guest sees the new limits without a restart."""
    from virt.runtime import set_vmi_status, throttle_of

    changed = False
    refused = ctx.services.setdefault("qos_refused", {}).setdefault(running.key, {})
    for name, attachment in running.attachments.items():
        disk = running.launcher.disks.get(name)
        if disk is None:
            continue
        changed |= _follow_volume_size(running, name, disk)
        if disk.throttle is None:
            continue
        wanted = throttle_of(ctx, attachment.volume_id)
        if wanted != disk.throttle and refused.get(name) != wanted:
            try:
                running.launcher.set_throttle(name, wanted)
            except Exception as exc:  # noqa: BLE001 - QEMU's refusal is reported once, not retried each second
                refused[name] = wanted
                ns, vm_name = running.key.split("/", 1)
                about = ctx.store.get("VirtualMachine", vm_name, ns) or _vmi(ctx, running.key)  # a VMI alone: itself
                if about:
                    ctx.store.add_event(about, "Warning", "VolumeQoSRefused", f"volume {name}: {user_text(exc)}")
                continue
            log.info("VM %s volume %s: throttle now %s", running.key, name, wanted)
            changed = True
    if changed or "volumeStatus" not in (_vmi(ctx, running.key).get("status") or {}):
        set_vmi_status(ctx, running.key, volumeStatus=volume_status(running))


def _follow_volume_size(running, name: str, disk) -> bool:
    """A volume grown under a running VM (PVC expansion): tell QEMU, as KubeVirt's
    ExpandDisks does, so the guest sees the new size."""
    if not disk.block:
        return False
    with open(disk.path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
    nodes = running.launcher.execute("query-named-block-nodes", {"flat": True})
    fmt = node_name("fmt", name)
    current = next((n["image"]["virtual-size"] for n in nodes if n.get("node-name") == fmt), size)
    if size <= current:
        return False
    running.launcher.execute("block_resize", {"node-name": fmt, "size": size})
    log.info("VM %s volume %s: grown to %d bytes", running.key, name, size)
    return True


def _vmi(ctx: Context, key: str) -> Obj:
    ns, name = key.split("/", 1)
    return ctx.store.get("VirtualMachineInstance", name, ns) or {}


def volume_status(running) -> list[dict]:
    """KubeVirt's VMI volumeStatus: the guest's device name as `target`, the size and I/O limits
    as QEMU itself reports them (of the file it holds open: never of what a link names), and
    pvlun's `access`: how QEMU reaches the volume (virt/iscsi_direct.py)."""
    nodes = running.launcher.execute("query-named-block-nodes", {"flat": True})
    sizes = {n.get("node-name"): n["image"]["virtual-size"] for n in nodes}
    targets = guest_device_names(running.spec)
    out = []
    for name, attachment in running.attachments.items():
        entry = {"name": name, "target": targets.get(name, ""), "volumeId": attachment.volume_id,
                 "size": sizes.get(node_name("fmt", name), 0),
                 "access": running.launcher.disks[name].access}  # iscsi-direct, block-device or file
        if running.launcher.disks[name].throttle is not None:
            limits = running.launcher.throttle_limits(name)
            entry["ioLimits"] = {"iopsTotal": limits.get("iops-total", 0), "bpsTotal": limits.get("bps-total", 0)}
        out.append(entry)
    return out


def _delete_vm(ctx: Context, vm: Obj, rt: VmRuntime) -> None:
    """The VM is being deleted: stop what runs, then release everything it held."""
    key = key_of(vm)
    ns, name = key.split("/", 1)
    if ctx.jobs.running("vm:" + key) or ctx.jobs.running("migration:" + key):
        return  # a start, stop or migration under way: finish it first
    if rt.get(key):
        try:
            grace = vm_as_run(ctx.store, vm)[1].template.termination_grace_period  # its preference's too
        except SpecError:
            grace = DEFAULT_GRACE_SECONDS
        _vm_status(ctx, vm, "Terminating")
        ctx.jobs.start("vm:" + key, lambda: rt.stop(key, min(grace, DELETE_GRACE_SECONDS)))
        return
    release_run(ctx, key)
    if ctx.store.get("VirtualMachineInstance", name, ns) is not None:
        ctx.store.delete("VirtualMachineInstance", name, ns)
    remove_finalizer(ctx.store, vm, FINALIZER)
    log.info("VM %s deleted", key)


def release_run(ctx: Context, key: str) -> None:
    """A VMI that no longer runs is going for good: what its runs held and left (attachments,
    run directories, console history, the runtime's record of it)."""
    ns, name = key.split("/", 1)
    for a in kubelet.attachments_of(ctx.store, owner(key)):  # normally none: QEMU's exit detached them
        kubelet.detach(ctx.store, ctx.csi, a["spec"]["volumeId"], a["spec"]["nodeName"], owner(key))
    runtime(ctx).forget(key)
    ctx.services.get("qos_refused", {}).pop(key, None)
    shutil.rmtree(os.path.join(ctx.data_dir, "vms", ns, name), ignore_errors=True)


def reconcile_vm(ctx: Context, vm: Obj) -> float | None:
    meta = vm["metadata"]
    if not meta.get("deletionTimestamp") and FINALIZER not in meta.get("finalizers", []):  # before anything runs
        vm = ctx.store.patch_metadata("VirtualMachine", meta["name"], meta.get("namespace", "default"),
                                      finalizers=meta.get("finalizers", []) + [FINALIZER])
        if vm is None:
            return  # deleted meanwhile
        meta = vm["metadata"]
    announce_ignored(ctx, vm)  # FieldIgnored Warning events, in both modes
    if ctx.cluster is not None:  # KubeVirt's way: a VMI, and a launcher Pod Kubernetes places
        from virt.launch_pods import reconcile_vm_in_pods

        return reconcile_vm_in_pods(ctx, vm)
    rt = runtime(ctx)
    key = key_of(vm)
    if meta.get("deletionTimestamp"):
        _delete_vm(ctx, vm, rt)
        return
    try:
        vm, parsed = vm_as_run(ctx.store, vm)  # its instancetype and preference applied
    except SpecError as exc:
        _vm_status(ctx, vm, "ErrorUnschedulable", message=user_text(exc))
        return
    _handle_request(ctx, vm, parsed, rt)
    vm = ctx.store.get("VirtualMachine", vm["metadata"]["name"], vm["metadata"].get("namespace", "default")) or vm
    vm, parsed = vm_as_run(ctx.store, vm)  # its instancetype and preference applied
    ensure_data_volumes(ctx, vm, parsed.data_volume_templates)
    running = rt.get(key)
    want = _want_running(vm, parsed.run_strategy, rt.last_exit.get(key))
    busy = ctx.jobs.running("vm:" + key)
    if running:
        if not want and not busy:
            _vm_status(ctx, vm, "Stopping")
            grace = parsed.template.termination_grace_period
            ctx.jobs.start("vm:" + key, lambda: rt.stop(key, grace))
            return
        phase = running.launcher.phase
        if phase in (Phase.RUNNING, Phase.PAUSED) and not ctx.jobs.running("migration:" + key):
            follow_volume_qos(ctx, running)
        if ctx.jobs.running("migration:" + key) or phase is Phase.MIGRATING:
            _vm_status(ctx, vm, "Migrating", ready=True)
        elif phase is Phase.PAUSED:
            _vm_status(ctx, vm, "Paused", message="paused by user")
        elif phase is Phase.RUNNING:
            _vm_status(ctx, vm, "Running", ready=True)
        elif phase in (Phase.SUCCEEDED, Phase.FAILED):
            return 0.5  # QEMU ended and its VMI is being unregistered: look again then, nothing else will say
        return
    if busy:
        return
    if not want:
        vmi = ctx.store.get("VirtualMachineInstance", vm["metadata"]["name"], vm["metadata"].get("namespace", "default"))
        if vmi is not None:
            ctx.store.delete("VirtualMachineInstance", vm["metadata"]["name"], vm["metadata"].get("namespace", "default"))
        _vm_status(ctx, vm, "Stopped")
        return
    restoring = (vm.get("status") or {}).get("restoreInProgress")
    if restoring and ctx.store.get("VirtualMachineRestore", restoring, vm["metadata"].get("namespace", "default")):
        # KubeVirt's rule: a VM is not started under a restore of its disks (one deleted meanwhile holds nothing)
        _vm_status(ctx, vm, "Stopped", message=f"VirtualMachineRestore {restoring} in progress")
        return
    waiting = volumes_ready(ctx, vm, parsed.template)
    if waiting:
        _vm_status(ctx, vm, waiting[0], message=waiting[1])
        return
    recent = [t for t in rt.failures.get(key, []) if t > time.time() - CRASH_WINDOW]
    if len(recent) >= CRASH_LIMIT:
        backoff = min(300, 10 * 2 ** (len(recent) - CRASH_LIMIT))
        if time.time() - recent[-1] < backoff:
            _vm_status(ctx, vm, "CrashLoopBackOff", message=rt.last_exit.get(key, ("", ""))[1])
            return backoff - (time.time() - recent[-1])  # seconds until the loop looks again
    _vm_status(ctx, vm, "Starting")
    ensure_vmi(ctx, vm)

    def start(node: str) -> None:
        try:
            rt.start(parsed.template, key, node)
        except kubelet.NodeFull:
            raise  # back to the job queue until a node has room for every volume
        except (LaunchError, Exception) as exc:  # noqa: BLE001 - reported on the VM, retried by policy
            log.warning("VM %s failed to start: %s", key, exc)
            ctx.store.add_event(vm, "Warning", "FailedCreate", user_text(exc))

    ctx.jobs.start_on_node("vm:" + key, start, owner(key),
                           volumes=sum(v.source in CSI_SOURCES for v in parsed.template.volumes))


def reconcile_migration(ctx: Context, mig: Obj) -> float | None:
    if ctx.cluster is not None:
        from virt.migration_pods import reconcile_migration_in_pods

        return reconcile_migration_in_pods(ctx, mig)
    from virt.live_migration import cancel_migration, start_migration

    if mig["metadata"].get("deletionTimestamp"):
        cancel_migration(ctx, mig)
        return
    status = mig.get("status") or {}
    if status.get("phase") in ("Succeeded", "Failed"):
        return
    vmi = f"{mig['metadata'].get('namespace', 'default')}/{(mig.get('spec') or {}).get('vmiName', '')}"
    if ctx.jobs.running("migration:" + vmi):  # the job is keyed by the VMI: one migration at a time
        return
    start_migration(ctx, mig)


def reconcile_vmi(ctx: Context, vmi: Obj) -> float | None:
    """A VMI a user applied alone runs as KubeVirt runs it (virt/vmi_alone.py); one a VM made
    is the VM's to run (embedded) or gets its launcher Pod (on a cluster)."""
    from virt.vmi_alone import reconcile_vmi_alone

    if not owned_by_vm(vmi):
        return reconcile_vmi_alone(ctx, vmi)
    if ctx.cluster is None:
        return None
    from virt.launch_pods import reconcile_vmi_in_pods

    return reconcile_vmi_in_pods(ctx, vmi)


RECONCILERS = [
    ("VirtualMachine", reconcile_vm),
    ("VirtualMachineInstance", reconcile_vmi),
    ("VirtualMachineInstanceMigration", reconcile_migration),
]
CLUSTER_RECONCILERS = RECONCILERS
