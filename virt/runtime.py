"""The VMs this daemon runs: start a VMI (attach its volumes through CSI, as kubelet
would, then QEMU), stop it, and report its phase into the VMI and VM objects."""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field

import grpc

from csi.proto import csi_pb2 as pb
from controlplane import kubelet
from controlplane.context import Context
from host.sandbox import UnsafeFile
from controlplane.store import set_condition
from controlplane.user_text import shown_text, user_text
from controlplane.secret_refs import secret_data
from virt.agent_status import report_agent
from virt.console_history import ConsoleHistory, catch_up, history_file
from virt.container_volumes import SERVICE as IMAGES, BootKernel, boot_kernel, container_disks, remove_overlays
from virt.launcher import LaunchError, Phase, VmLauncher
from virt.iscsi_direct import direct_disk
from virt.local_volumes import local_attachments
from virt.qemu_args import DiskAttachment, Throttle
from controlplane.vm_spec import VmSpec

log = logging.getLogger("pvlun.virt")
CSI_SOURCES = ("dataVolume", "persistentVolumeClaim")
DISK_IMG = "disk.img"


@dataclass
class Running:
    """One VMI on one node: its QEMU and the CSI attachments it holds there."""

    key: str
    spec: VmSpec
    node: str
    launcher: VmLauncher
    attachments: dict[str, kubelet.Attachment] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    migrating: bool = False  # the source's own end (Succeeded "migrated") is not the VMI's end


def owner(key: str) -> str:
    """The owner of the VMI's VolumeAttachments: its namespace/name (a VM's VMI has the VM's),
    whether a VirtualMachine made it or a user applied it alone."""
    return f"vm/{key}"


def owned_by_vm(vmi: dict) -> bool:
    """Made by a VirtualMachine (its ownerReferences say so), not applied alone by a user."""
    refs = (vmi.get("metadata") or {}).get("ownerReferences") or []
    return any(isinstance(r, dict) and r.get("kind") == "VirtualMachine" for r in refs)


def run_dir(ctx: Context, key: str, node: str) -> str:
    return os.path.join(ctx.data_dir, "vms", key, node)


def _access_mode(ctx: Context, claim: str, namespace: str) -> str:
    pvc = ctx.store.get("PersistentVolumeClaim", claim, namespace) or {}
    modes = (pvc.get("spec") or {}).get("accessModes") or ["ReadWriteOnce"]
    return "ReadWriteMany" if "ReadWriteMany" in modes else modes[0]


def throttle_of(ctx: Context, volume_id: str) -> Throttle:
    """The volume's current QoS (CSI mutable parameters) as a QEMU throttle."""
    try:
        vol = ctx.csi.controller.ControllerGetVolume(pb.ControllerGetVolumeRequest(volume_id=volume_id)).volume
        return Throttle.from_volume_context(vol.volume_context)
    except grpc.RpcError:
        return Throttle()


def attach_volumes(ctx: Context, spec: VmSpec, key: str, node: str) -> tuple[dict[str, DiskAttachment], dict[str, kubelet.Attachment]]:
    """Publish every dataVolume/PVC volume on `node`; make the local ones (cloud-init, emptyDisk)."""
    disks: dict[str, DiskAttachment] = {}
    attached: dict[str, kubelet.Attachment] = {}
    try:
        for volume in spec.volumes:
            if volume.source not in CSI_SOURCES:
                continue
            mode = _access_mode(ctx, volume.claim_name, spec.namespace)
            a = kubelet.attach(ctx.store, ctx.csi, ctx.data_dir, volume.claim_name, spec.namespace, node, owner(key),
                               readonly=volume.readonly, access_mode=mode, direct_ok=True)
            attached[volume.name] = a
            if not a.staged:  # QEMU logs in to the LUN itself (virt/iscsi_direct.py)
                disks[volume.name] = DiskAttachment.for_iscsi(direct_disk(a.publish_context, node, a.stage_secrets),
                                                              readonly=volume.readonly,
                                                              throttle=throttle_of(ctx, a.volume_id))
                continue
            path = a.path if a.block else os.path.join(a.path, DISK_IMG)
            try:
                disks[volume.name] = DiskAttachment.for_path(path, readonly=volume.readonly,
                                                             throttle=throttle_of(ctx, a.volume_id))
            except UnsafeFile as exc:  # a Filesystem claim's disk.img is its owner's to replace
                raise UnsafeFile(exc.errno, f"volume {volume.name} (claim {volume.claim_name}): {exc}") from None
        disks.update(local_attachments(spec, run_dir(ctx, key, node)))
        disks.update(container_disks(spec, run_dir(ctx, key, node), ctx.services.get(IMAGES),
                                     lambda name: secret_data(ctx.store, name, spec.namespace, "imagePullSecret")))
    except BaseException:
        detach_volumes(ctx, attached, key)
        raise
    return disks, attached


def detach_volumes(ctx: Context, attached: dict[str, kubelet.Attachment], key: str) -> None:
    for a in attached.values():
        try:
            kubelet.detach(ctx.store, ctx.csi, a.volume_id, a.node_id, owner(key))
        except grpc.RpcError as exc:
            log.warning("detach %s from %s: %s", a.volume_id, a.node_id, exc.details())


class VmRuntime:
    """Registry of running VMIs; lives in ctx.services['vms']."""

    def __init__(self, ctx: Context, accel: str | None = None):
        self.ctx = ctx
        self.accel = accel
        self.lock = threading.Lock()
        self.running: dict[str, Running] = {}
        self.last_exit: dict[str, tuple[str, str, float]] = {}  # key -> (phase, reason, time)
        self.failures: dict[str, list[float]] = {}
        self.histories: dict[str, ConsoleHistory] = {}

    def get(self, key: str) -> Running | None:
        with self.lock:
            return self.running.get(key)

    def history(self, key: str) -> ConsoleHistory:
        """The VM's console history, one per VM (its launchers append to it in turn)."""
        with self.lock:
            if key not in self.histories:
                ns, name = key.split("/", 1)
                history = ConsoleHistory(history_file(self.ctx.data_dir, ns, name))
                vm_dir = os.path.join(self.ctx.data_dir, "vms", ns, name)
                for node in sorted(os.listdir(vm_dir)) if os.path.isdir(vm_dir) else []:
                    if os.path.isdir(os.path.join(vm_dir, node)):  # what QEMUs wrote while no daemon copied
                        catch_up(history, os.path.join(vm_dir, node))
                self.histories[key] = history
            return self.histories[key]

    def forget(self, key: str) -> None:
        """The VM is deleted: a new one of the same name starts with a clean record."""
        with self.lock:
            self.last_exit.pop(key, None)
            self.failures.pop(key, None)
            self.histories.pop(key, None)

    def launcher(self, spec: VmSpec, key: str, node: str, disks: dict[str, DiskAttachment],
                 incoming: str | None = None, kernel: BootKernel | None = None) -> VmLauncher:
        return VmLauncher(spec, disks, run_dir(self.ctx, key, node), accel=self.accel, incoming=incoming,
                          node=node, console=True, on_phase=lambda l, p, r: self.on_phase(key, l, p, r),
                          history=self.history(key), kernel=kernel,
                          on_agent=lambda l, connected, info: self.on_agent(key, l, connected, info))

    def on_agent(self, key: str, launcher: VmLauncher, connected: bool, osinfo: dict | None) -> bool:
        """The guest agent came or went: the VMI's AgentConnected condition and guestOSInfo.
        False (not taken) from a launcher that is not the VMI's: a migration's target before it
        takes over (it tells again), a source after it."""
        rt = self.get(key)
        if rt is None or rt.launcher is not launcher:
            return False
        report_agent(self.ctx, key, connected, osinfo)
        return True

    def start(self, spec: VmSpec, key: str, node: str) -> None:
        """Attach, launch and register; a failure leaves nothing attached."""
        set_vmi_status(self.ctx, key, phase="Scheduled", nodeName=node)
        try:
            kernel = boot_kernel(spec, self.ctx.services.get(IMAGES),
                                 lambda name: secret_data(self.ctx.store, name, spec.namespace, "imagePullSecret"))
            disks, attached = attach_volumes(self.ctx, spec, key, node)
        except (OSError, ValueError) as exc:  # a volume QEMU may not have (a linked disk.img), a disk too big,
            # an image refused or not to be had
            self._exited(key, "Failed", user_text(exc))
            raise
        launcher = self.launcher(spec, key, node, disks, kernel=kernel)
        with self.lock:
            self.running[key] = Running(key, spec, node, launcher, attached)
        try:
            launcher.start()
        except LaunchError as exc:
            with self.lock:
                mine = self.running.get(key) is not None and self.running[key].launcher is launcher
                if mine:  # not yet cleaned up by on_phase (QEMU never reported Failed)
                    self.running.pop(key)
            if mine:
                detach_volumes(self.ctx, attached, key)
                remove_overlays(spec, run_dir(self.ctx, key, node))
                self._exited(key, "Failed", user_text(exc))
            raise

    def stop(self, key: str, grace: float | None = None) -> None:
        rt = self.get(key)
        if rt:
            rt.launcher.stop(grace)

    def on_phase(self, key: str, launcher: VmLauncher, phase: Phase, reason: str) -> None:
        with self.lock:
            rt = self.running.get(key)
        if rt is None or rt.launcher is not launcher:
            return  # a migration's target reporting before it takes over
        if rt.migrating and phase is Phase.SUCCEEDED:
            return  # the source quit because the VMI now runs on the target
        if phase in (Phase.SUCCEEDED, Phase.FAILED):
            # Detach and record the end while the VMI is still registered, so that the reconcile
            # loop cannot start the next run (same VolumeAttachments) before this one is undone.
            self._cleanup(rt, phase, reason)
            with self.lock:
                if self.running.get(key) is rt:
                    self.running.pop(key)
            return
        vmi_phase = {Phase.RUNNING: "Running", Phase.PAUSED: "Running", Phase.MIGRATING: "Running",
                     Phase.SCHEDULING: "Scheduled"}[phase]
        status = {"phase": vmi_phase, "nodeName": rt.node, "reason": reason, "paused": phase is Phase.PAUSED,
                  "launcher": launcher.status()}
        set_vmi_status(self.ctx, key, **status)

    def _cleanup(self, rt: Running, phase: Phase, reason: str) -> None:
        detach_volumes(self.ctx, rt.attachments, rt.key)
        remove_overlays(rt.spec, run_dir(self.ctx, rt.key, rt.node))
        self._exited(rt.key, phase.value, reason)

    def _exited(self, key: str, phase: str, reason: str) -> None:
        reason = shown_text(reason)  # QEMU's own words may name host paths
        self.last_exit[key] = (phase, reason, time.time())
        if phase == "Failed":
            self.failures.setdefault(key, []).append(time.time())
        ns, name = key.split("/", 1)
        vmi = self.ctx.store.get("VirtualMachineInstance", name, ns)
        bare = vmi is not None and not owned_by_vm(vmi)
        if bare and self.ctx.stopping.is_set():
            return  # the daemon stops, not the VMI: no VM would run it again, so start-up does (virt/recovery.py)
        set_vmi_status(self.ctx, key, phase=phase, reason=reason, paused=False)
        about = vmi if bare else self.ctx.store.get("VirtualMachine", name, ns)
        if about:
            self.ctx.store.add_event(about, "Normal" if phase == "Succeeded" else "Warning",
                                     "Stopped" if phase == "Succeeded" else "Failed", reason or phase)

    def stop_all(self, grace: float = 10) -> None:
        """Stop every VMI, each within its own terminationGracePeriodSeconds (at most `grace`)."""
        with self.lock:
            running = list(self.running.values())
        threads = [threading.Thread(target=self.stop, args=(r.key, min(grace, r.spec.termination_grace_period)))
                   for r in running]
        for t in threads:
            t.start()
        for t in threads:
            t.join(grace + 30)


def set_vmi_status(ctx: Context, key: str, **fields) -> None:
    ns, name = key.split("/", 1)
    vmi = ctx.store.get("VirtualMachineInstance", name, ns)
    if vmi is None:
        return
    status = dict(vmi.get("status") or {})
    status.update(fields)
    set_condition(status, "Ready", status.get("phase") == "Running" and not status.get("paused"),
                  "" if status.get("phase") == "Running" else "NotRunning", "")
    set_condition(status, "Paused", bool(status.get("paused")), "PausedByUser" if status.get("paused") else "", "")
    ctx.store.update_status("VirtualMachineInstance", name, ns, status)
