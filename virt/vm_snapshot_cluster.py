"""What a VirtualMachineSnapshot does differently on a cluster (`pvlun controller`), as
KubeVirt's virt-controller does it there: the controller reaches neither QEMU's monitor nor
the CSI driver, so

- each disk gets its own VolumeSnapshot (`vmsnapshot-<uid>-volume-<volume>`, owned by the
  VirtualMachineSnapshotContent, spec.source.persistentVolumeClaimName its claim), of the
  VolumeSnapshotClass KubeVirt would pick: the claim's StorageProfile's snapshotClass, else the
  one class of the claim's driver, else the default one among several; the external-snapshotter
  and the CSI sidecars cut them. No group snapshot: KubeVirt takes one VolumeSnapshot per
  volume, consistent because the guest is frozen meanwhile;
- a running guest is frozen through its launcher Pod (pods/exec `pvlun launch-freeze`,
  virt/pod_freeze.py) while they are created, and thawed once each has status.creationTime
  (the instant KubeVirt waits for). The launcher thaws by itself after the unfreeze timeout,
  so a controller that dies meanwhile cannot leave it frozen. Without a guest agent nothing is
  frozen or paused (NoGuestAgent, as KubeVirt): pausing through QMP would need the controller
  to hold a QEMU it reaches only over an exec stream, with no bound it could keep.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Callable, Iterator

from controlplane.context import Context
from controlplane.kube_kinds import ApiError
from controlplane.store import Obj
from controlplane.user_text import one_line, user_text
from controlplane.vm_snapshot_spec import API_VERSION
from virt.launch_pods import active_pod
from virt.pod_freeze import DEFAULT_UNFREEZE_TIMEOUT, freeze_command, read_freeze, thaw_command
from virt.pods import CONTAINER

log = logging.getLogger("pvlun.virt")
VMI = "VirtualMachineInstance"
DEFAULT_CLASS = "snapshot.storage.kubernetes.io/is-default-class"
SOURCE_VM_LABEL = "snapshot.kubevirt.io/source-vm-name"
CUT_WAIT = 60.0  # seconds a frozen guest waits for its VolumeSnapshots to be cut (well under the unfreeze timeout)
EXEC_TIMEOUT = 30.0
CLUSTER_INDICATION_TEXT = {  # what the indications mean here (nothing is paused on a cluster)
    "NoGuestAgent": "no guest agent answered: the disks were snapshotted as they were (crash-consistent), the guest "
                    "neither frozen nor paused",
    "GuestAgent": "the guest agent froze the guest's filesystems until every VolumeSnapshot was cut",
    "QuiesceFailed": "the guest agent refused to freeze the filesystems: the disks were snapshotted as they were",
}


class ClusterSnapshotError(Exception):
    """Why the snapshot cannot be taken now (transient: tried again until the deadline)."""


def snapshot_class(ctx: Context, pvc: Obj) -> str:
    """KubeVirt's VolumeSnapshotClass for a claim; ValueError when there is none to use."""
    claim = pvc["metadata"]["name"]
    sc_name = (pvc.get("spec") or {}).get("storageClassName") or ""
    profile = ctx.store.get("StorageProfile", sc_name, "") if sc_name else None
    chosen = ((profile or {}).get("status") or {}).get("snapshotClass")
    if isinstance(chosen, str) and chosen:
        return chosen
    sc = ctx.store.get("StorageClass", sc_name, "") if sc_name else None
    if sc is None:
        raise ValueError(f"claim {claim} has no StorageClass{f' ({sc_name} does not exist)' if sc_name else ''}: "
                         "no VolumeSnapshotClass can be chosen")
    driver = sc.get("provisioner") or ""
    classes = sorted((c for c in ctx.store.list("VolumeSnapshotClass") if c.get("driver") == driver),
                     key=lambda c: c["metadata"]["name"])
    if len(classes) > 1:
        classes = [c for c in classes if (c["metadata"].get("annotations") or {}).get(DEFAULT_CLASS) == "true"]
    if len(classes) != 1:
        raise ValueError(f"claim {claim}: {'no' if not classes else 'more than one default'} VolumeSnapshotClass of "
                         f"driver {driver or '(none)'}: a VM snapshot needs one (mark one "
                         f"{DEFAULT_CLASS}: \"true\")")
    return classes[0]["metadata"]["name"]


def running_vmi(ctx: Context, vm: Obj) -> tuple[Obj | None, str]:
    """(the VM's running VMI or None, what is awaited): a VMI still starting or stopping is waited for."""
    meta = vm["metadata"]
    vmi = ctx.store.get(VMI, meta["name"], meta.get("namespace", "default"))
    if vmi is None:
        return None, ""
    phase = (vmi.get("status") or {}).get("phase")
    if phase != "Running" or vmi["metadata"].get("deletionTimestamp"):
        return None, f"Source not ready: its VirtualMachineInstance is {phase or 'Pending'}"
    return vmi, ""


def _exec(ctx: Context, pod: Obj, argv: list[str]) -> bytes:
    pod_exec = ctx.services.get("pod_exec")
    if pod_exec is None:
        raise ClusterSnapshotError("the controller cannot run commands in Pods (no pods/exec client)")
    meta = pod["metadata"]
    done = pod_exec(meta.get("namespace", "default"), meta["name"], CONTAINER, argv, timeout=EXEC_TIMEOUT)
    if done.code != 0:
        raise ClusterSnapshotError(f"{argv[1]} in Pod {meta['name']} exited {done.code}: "
                                   f"{one_line(done.stderr[-2000:].decode(errors='replace') or 'no message', 300)}")
    return done.stdout


@contextlib.contextmanager
def frozen(ctx: Context, vmi: Obj | None, indications: list[str]) -> Iterator[bool]:
    """A running guest frozen through its launcher Pod for the body (True when frozen; its
    indications added), thawed after it; a stopped VM as it is. ClusterSnapshotError when the
    launcher cannot be reached."""
    if vmi is None:
        yield False
        return
    pod = active_pod(ctx, vmi)
    if pod is None:
        raise ClusterSnapshotError(f"the launcher Pod of VirtualMachineInstance {vmi['metadata']['name']} is not known")
    try:
        is_frozen, indication = read_freeze(_exec(ctx, pod, freeze_command(DEFAULT_UNFREEZE_TIMEOUT)))
    except (ApiError, ValueError) as exc:
        raise ClusterSnapshotError(f"freeze in Pod {pod['metadata']['name']}: {user_text(exc)}") from None
    indications.extend(["Online", indication])
    try:
        yield is_frozen
    finally:
        if is_frozen:
            try:
                _exec(ctx, pod, thaw_command())
            except (ApiError, ClusterSnapshotError) as exc:  # the launcher's unfreeze deadline thaws it
                log.warning("VM snapshot: cannot thaw the guest in Pod %s (it thaws itself within %g s): %s",
                            pod["metadata"]["name"], DEFAULT_UNFREEZE_TIMEOUT, user_text(exc))


class ForeignVolumeSnapshot(Exception):
    """A VolumeSnapshot of the name this snapshot's would have that its content does not own."""


def create_volume_snapshots(ctx: Context, content: Obj, vm_name: str, members: list[tuple[str, Obj, str]]) -> None:
    """One VolumeSnapshot per (name, claim, class), owned by the content; one it owns already is
    kept (a retry), one it does not own is refused (ForeignVolumeSnapshot: never taken as ours)."""
    meta = content["metadata"]
    ns = meta.get("namespace", "default")
    for name, pvc, klass in members:
        existing = ctx.store.get("VolumeSnapshot", name, ns)
        if existing is not None:
            if not any(r.get("uid") == meta["uid"] for r in existing["metadata"].get("ownerReferences") or []):
                raise ForeignVolumeSnapshot(f"VolumeSnapshot {name} exists and was not made for this snapshot; "
                                            "delete it and the snapshot, then snapshot again")
            continue
        ctx.store.apply({"apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
                         "metadata": {"name": name, "namespace": ns, "labels": {SOURCE_VM_LABEL: vm_name},
                                      "ownerReferences": [{"apiVersion": API_VERSION, "kind": "VirtualMachineSnapshotContent",
                                                           "name": meta["name"], "uid": meta["uid"],
                                                           "controller": True}]},
                         "spec": {"source": {"persistentVolumeClaimName": pvc["metadata"]["name"]},
                                  "volumeSnapshotClassName": klass}})


def wait_cut(ctx: Context, names: list[str], ns: str, timeout: float = CUT_WAIT,
             sleep: Callable[[float], None] = time.sleep) -> None:
    """Until every VolumeSnapshot has status.creationTime (cut: the guest may go on); an error
    one reports is raised, and so is the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        waiting = []
        for name in names:
            status = (ctx.store.get("VolumeSnapshot", name, ns) or {}).get("status") or {}
            error = (status.get("error") or {}).get("message") if isinstance(status.get("error"), dict) else None
            if error:
                raise ClusterSnapshotError(f"VolumeSnapshot {name}: {one_line(str(error), 300)}")
            if not status.get("creationTime"):
                waiting.append(name)
        if not waiting:
            return
        if time.monotonic() > deadline:
            raise ClusterSnapshotError(f"VolumeSnapshots {', '.join(waiting)} were not cut within {timeout:g} s "
                                       "(is the external-snapshotter running?)")
        sleep(0.1)
