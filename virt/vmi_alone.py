"""A VirtualMachineInstance a user applied alone (no VirtualMachine owns it), run as KubeVirt
runs one: `Pending` while its volumes are not ready, `Scheduling`, `Scheduled`, `Running`;
once its guest ends it stays `Succeeded` or `Failed` — nothing starts it again, as there is no
VM to. Its spec never changes (controlplane/object_update.py). Deleting it stops the guest
(ACPI, then `quit` after its terminationGracePeriodSeconds, at most 30 s) and detaches its
volumes before it goes: it carries a finalizer from its first reconcile on. `pause` and
`unpause` arrive as a VM's requests do, the annotation `pvlun.dev/state-change-request`
(`pvlun vm pause vmi/NAME`). Its runs hold their attachments under its own name, as a VM's
VMI does under the VM's (which is the same name).

Embedded, the daemon runs its QEMU (virt/runtime.py); on a cluster it gets its launcher Pod
as a VM's VMI does (virt/launch_pods.py), under the same finalizer. A daemon restart starts
it again (virt/recovery.py): nothing else would."""

from __future__ import annotations

import logging

from controlplane import kubelet
from controlplane.context import Context
from controlplane.store import Obj, remove_finalizer, set_condition
from controlplane.user_text import user_text
from controlplane.vm_spec import DEFAULT_GRACE_SECONDS, SpecError, parse_virtual_machine_instance
from virt.launcher import Phase
from virt.reconcile import (DELETE_GRACE_SECONDS, REQUEST, VMI_FINALIZER, follow_volume_qos, key_of, release_run,
                            requested, runtime, volumes_ready)
from virt.runtime import CSI_SOURCES, VmRuntime, owner, set_vmi_status
from virt.spec_warnings import announce_ignored

log = logging.getLogger("pvlun.virt")
FINISHED = ("Succeeded", "Failed")
KIND = "VirtualMachineInstance"


def reconcile_vmi_alone(ctx: Context, vmi: Obj) -> float | None:
    meta = vmi["metadata"]
    ns = meta.get("namespace", "default")
    if not meta.get("deletionTimestamp") and VMI_FINALIZER not in (meta.get("finalizers") or []):
        vmi = ctx.store.patch_metadata(KIND, meta["name"], ns, finalizers=(meta.get("finalizers") or []) + [VMI_FINALIZER])
        if vmi is None:
            return None  # deleted meanwhile
    announce_ignored(ctx, vmi)  # FieldIgnored Warning events, in both modes
    if ctx.cluster is not None:
        from virt.launch_pods import reconcile_vmi_in_pods

        if requested(vmi):  # as for a VM's: the controller does not reach the launcher's QMP yet
            ctx.store.add_event(vmi, "Warning", "RequestNotSupported",
                                f"{requested(vmi)} is not available on a cluster yet")
            ctx.store.annotate(KIND, meta["name"], ns, **{REQUEST: None})
        return reconcile_vmi_in_pods(ctx, vmi)
    rt, key = runtime(ctx), key_of(vmi)
    if ctx.jobs.running("vm:" + key) or ctx.jobs.running("migration:" + key):
        return None  # its start, stop or migration says what comes next when it ends
    if vmi["metadata"].get("deletionTimestamp"):
        _delete(ctx, vmi, rt)
        return None
    running = rt.get(key)
    if running:
        _handle_request(ctx, vmi, running)
        if running.launcher.phase in (Phase.RUNNING, Phase.PAUSED):
            follow_volume_qos(ctx, running)
        return None
    vmi = ctx.store.get(KIND, meta["name"], ns)  # as it is now: a run's end is written before it unregisters
    if vmi is None:
        return None
    phase = (vmi.get("status") or {}).get("phase") or "Pending"
    _handle_request(ctx, vmi, None)
    if phase in FINISHED:
        return None
    if phase != "Pending":  # scheduled or running, yet neither its QEMU nor its start is here
        _fail(ctx, vmi, "its QEMU is gone")
        return None
    _start(ctx, vmi, rt)
    return None


def _start(ctx: Context, vmi: Obj, rt: VmRuntime) -> None:
    key = key_of(vmi)
    try:
        spec = parse_virtual_machine_instance(vmi)
    except SpecError as exc:  # admitted once; a stored object may come from an older pvlun
        _fail(ctx, vmi, user_text(exc))
        return
    waiting = volumes_ready(ctx, vmi, spec)
    _synchronized(ctx, vmi, waiting)
    if waiting:
        return  # a change of its claims or DataVolumes brings it back (object_links)
    set_vmi_status(ctx, key, phase="Scheduling", reason="")

    def start(node: str) -> None:
        try:
            rt.start(spec, key, node)
        except kubelet.NodeFull:
            raise  # back to the job queue until a node has room for every volume
        except Exception as exc:  # noqa: BLE001 - the VMI ends Failed, as KubeVirt's would
            log.warning("VMI %s failed to start: %s", key, exc)
            current = ctx.store.get(KIND, vmi["metadata"]["name"], spec.namespace) or vmi
            ctx.store.add_event(current, "Warning", "FailedCreate", user_text(exc))
            if (current.get("status") or {}).get("phase") != "Failed":
                _fail(ctx, current, user_text(exc))

    ctx.jobs.start_on_node("vm:" + key, start, owner(key), volumes=sum(v.source in CSI_SOURCES for v in spec.volumes))


def _synchronized(ctx: Context, vmi: Obj, waiting: tuple[str, str] | None) -> None:
    """KubeVirt's Synchronized condition: False, with why, while a volume keeps it Pending."""
    status = dict(vmi.get("status") or {})
    status["phase"] = status.get("phase") or "Pending"
    set_condition(status, "Synchronized", waiting is None, waiting[0] if waiting else "", waiting[1] if waiting else "")
    if status != vmi.get("status"):
        ctx.store.update_status(KIND, vmi["metadata"]["name"], vmi["metadata"].get("namespace", "default"), status)


def _fail(ctx: Context, vmi: Obj, reason: str) -> None:
    set_vmi_status(ctx, key_of(vmi), phase="Failed", reason=reason, paused=False)


def _handle_request(ctx: Context, vmi: Obj, running) -> None:
    """pause/unpause of a running guest, then the request is cleared; what needs a VM is refused."""
    request, meta = requested(vmi), vmi["metadata"]
    if not request:
        return
    if running is not None and request == "pause":
        running.launcher.pause()
    elif running is not None and request == "unpause":
        running.launcher.unpause()
    elif request in ("pause", "unpause"):
        ctx.store.add_event(vmi, "Warning", "RequestNotSupported", f"{request}: the VMI is not running")
    else:
        ctx.store.add_event(vmi, "Warning", "RequestNotSupported",
                            f"{request} acts on a VirtualMachine; this VMI has none (delete it to stop it)")
    ctx.store.annotate(KIND, meta["name"], meta.get("namespace", "default"), **{REQUEST: None})
    if running is not None and request in ("pause", "unpause"):
        ctx.store.add_event(vmi, "Normal", f"{request.capitalize()}Requested", f"{request} requested")


def _delete(ctx: Context, vmi: Obj, rt: VmRuntime) -> None:
    """Being deleted: stop the guest first; once nothing runs, release what it held and go."""
    key = key_of(vmi)
    if rt.get(key):
        try:
            grace = parse_virtual_machine_instance(vmi).termination_grace_period
        except SpecError:
            grace = DEFAULT_GRACE_SECONDS
        ctx.jobs.start("vm:" + key, lambda: rt.stop(key, min(grace, DELETE_GRACE_SECONDS)))
        return
    release_run(ctx, key)
    remove_finalizer(ctx.store, vmi, VMI_FINALIZER)
    log.info("VMI %s deleted", key)
