"""A running VM's VirtualMachineSnapshot on a cluster, with real QEMU (TCG, the tick guest):
the controller's loop on a KubeStore against the Kubernetes API server TEST DOUBLE, the test
playing the kubelet with a real `pvlun launch` (launcher_kubelet.py) and the CSI sidecars
(csi_sidecars_double.py). The controller asks the launcher for the freeze through pods/exec
(`pvlun launch-freeze`); the tick guest has no agent, so nothing is frozen or paused and the
snapshot says Online and NoGuestAgent, as KubeVirt's does; the linux test guest's qemu-ga is
frozen while the VolumeSnapshots are cut and thawed after (Online, GuestAgent). (The launcher's
own thaw at its deadline: test_pod_freeze.py.)"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import pytest
import yaml

from cluster_vms import CONTROLLER_AGENT, NS, running_vmi, start_controller, status_of, stop_controller
from controller_rbac import allowed, classify, rules
from csi_sidecars_double import CsiSidecarsDouble
from kube_fixtures import wait_until
from launcher_kubelet import LauncherKubelet
from virt.guest_images import tick_vm_manifest
from test_guest_agent import agent_boot_disk  # noqa: F401 - a fixture
from virt.pod_freeze import freeze_command, thaw_command

DRIVER = "csi.pvlun.dev"


@contextlib.contextmanager
def controller_on(double, make_kube_store, image: Path, tmp_path):
    """The controller, the kubelet (its launcher's disk a copy of `image`) and the CSI sidecars:
    (a user's store, the kubelet, the sidecars)."""
    disk = tmp_path / "root.img"
    disk.write_bytes(image.read_bytes())
    ctx, loop = start_controller(make_kube_store)
    kubelet = LauncherKubelet(double, NS, tmp_path / "pods", disk).start()
    sidecars = CsiSidecarsDouble(double, NS).start()
    user = make_kube_store()
    user.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
    user.apply({"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass", "metadata": {"name": "fast"},
                "provisioner": DRIVER})
    user.apply({"apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshotClass",
                "metadata": {"name": "pvlun-snaps"}, "driver": DRIVER, "deletionPolicy": "Delete"})
    try:
        yield user, kubelet, sidecars
    finally:
        stop_controller(ctx, loop)
        sidecars.stop()
        kubelet.stop()


@pytest.fixture
def cluster(kube_api_double, make_kube_store, tick_disk, tmp_path):
    with controller_on(kube_api_double, make_kube_store, tick_disk, tmp_path) as parts:
        yield parts


def run_tick_vm(store, kubelet, memory: str = "64Mi", booted: str = "") -> str:
    """The tick VM running from a claim of class `fast`, ticking (or its console saying `booted`):
    its launcher Pod's name."""
    vm = yaml.safe_load(tick_vm_manifest("tick", "http://images.example/tick.qcow2", memory=memory))
    vm["spec"].pop("dataVolumeTemplates")
    vm["metadata"]["namespace"] = NS
    volume = next(v for v in vm["spec"]["template"]["spec"]["volumes"] if "dataVolume" in v)
    volume["persistentVolumeClaim"] = {"claimName": volume.pop("dataVolume")["name"]}
    store.apply({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                 "metadata": {"name": volume["persistentVolumeClaim"]["claimName"], "namespace": NS},
                 "spec": {"accessModes": ["ReadWriteMany"], "volumeMode": "Block", "storageClassName": "fast",
                          "resources": {"requests": {"storage": "8Mi"}}}})
    wait_until(lambda: (store.get("PersistentVolumeClaim", "tick-root", NS).get("status") or {}).get("phase")
               == "Bound")
    store.apply(vm)
    wait_until(lambda: running_vmi(store), 20.0)
    pod = next(iter(kubelet.processes))
    if booted:
        wait_until(lambda: booted in kubelet.processes[pod].stdout(), 90.0, lambda: kubelet.processes[pod].stdout())
    else:
        kubelet.wait_for_ticks(pod, 2)
    return pod


def test_a_running_vm_is_snapshotted_through_its_launcher_pod_online_without_an_agent(cluster, kube_api_double):
    store, kubelet, sidecars = cluster
    pod = run_tick_vm(store, kubelet)
    store.apply({"apiVersion": "snapshot.kubevirt.io/v1beta1", "kind": "VirtualMachineSnapshot",
                 "metadata": {"name": "live", "namespace": NS},
                 "spec": {"source": {"apiGroup": "kubevirt.io", "kind": "VirtualMachine", "name": "tick"}}})
    status = wait_until(lambda: (lambda s: s if s.get("phase") in ("Succeeded", "Failed") else None)(
        status_of(store, "VirtualMachineSnapshot", "live")), 20.0,
        lambda: str(status_of(store, "VirtualMachineSnapshot", "live")))
    assert status["phase"] == "Succeeded" and status["readyToUse"] is True, status
    assert status["indications"] == ["Online", "NoGuestAgent"]
    said = {i["indication"]: i["message"] for i in status["sourceIndications"]}
    assert said.keys() == {"Online", "NoGuestAgent"} and "neither frozen nor paused" in said["NoGuestAgent"]
    uid = store.get("VirtualMachineSnapshot", "live", NS)["metadata"]["uid"]
    assert sidecars.cut == [f"vmsnapshot-{uid}-volume-root"]

    # the freeze went to the launcher Pod's compute container; with nothing frozen there is no thaw
    launch_freezes = [e for e in kube_api_double.execs if e[3][:2] == ["pvlun", "launch-freeze"]]
    assert launch_freezes == [(NS, pod, "compute", freeze_command())]
    ticks = kubelet.ticks(pod)
    kubelet.wait_for_ticks(pod, len(ticks) + 1)  # the guest ran on
    calls = {classify(*request) for request, agent in zip(kube_api_double.requests, kube_api_double.agents)
             if agent == CONTROLLER_AGENT or request[1].endswith("/exec")}  # a websocket exec carries no agent
    assert {("", "pods/exec", "get", NS), ("snapshot.storage.k8s.io", "volumesnapshots", "create", NS)} <= calls
    granted = rules()
    assert sorted(c for c in calls if not allowed(*granted, *c)) == []  # deploy/full's RBAC allows every call


def test_a_running_vm_whose_volume_snapshots_are_not_cut_is_not_ready_and_fails_at_its_deadline(cluster):
    """Until the external-snapshotter has cut its VolumeSnapshots, the snapshot is not ready; past
    its failureDeadline it fails, as KubeVirt's does."""
    store, kubelet, sidecars = cluster
    run_tick_vm(store, kubelet)
    sidecars.holding.set()
    store.apply({"apiVersion": "snapshot.kubevirt.io/v1beta1", "kind": "VirtualMachineSnapshot",
                 "metadata": {"name": "live", "namespace": NS},
                 "spec": {"source": {"apiGroup": "kubevirt.io", "kind": "VirtualMachine", "name": "tick"}}})
    status = wait_until(lambda: (lambda s: s if s.get("phase") == "InProgress" and s.get("indications") else None)(
        status_of(store, "VirtualMachineSnapshot", "live")), 20.0)
    assert status["indications"] == ["Online", "NoGuestAgent"] and status["readyToUse"] is False
    uid = store.get("VirtualMachineSnapshot", "live", NS)["metadata"]["uid"]
    assert store.get("VolumeSnapshot", f"vmsnapshot-{uid}-volume-root", NS) is not None
    # another one with a short deadline fails at it, and its content (never ready) goes with its VolumeSnapshot
    store.apply({"apiVersion": "snapshot.kubevirt.io/v1beta1", "kind": "VirtualMachineSnapshot",
                 "metadata": {"name": "late", "namespace": NS},
                 "spec": {"source": {"apiGroup": "kubevirt.io", "kind": "VirtualMachine", "name": "tick"},
                          "failureDeadline": "2s"}})
    late = wait_until(lambda: (lambda s: s if s.get("phase") == "Failed" else None)(
        status_of(store, "VirtualMachineSnapshot", "late")), 20.0)
    assert "deadline exceeded (2s)" in late["error"]["message"] and late["readyToUse"] is False
    late_uid = store.get("VirtualMachineSnapshot", "late", NS)["metadata"]["uid"]
    assert wait_until(lambda: store.get("VirtualMachineSnapshotContent", f"vmsnapshot-content-{late_uid}", NS) is None
                      and store.get("VolumeSnapshot", f"vmsnapshot-{late_uid}-volume-root", NS) is None, 10.0)
    sidecars.holding.clear()
    assert wait_until(lambda: status_of(store, "VirtualMachineSnapshot", "live").get("readyToUse"), 10.0)


@pytest.fixture
def agent_cluster(kube_api_double, make_kube_store, agent_boot_disk, tmp_path):
    """As `cluster`, the guest the linux test guest with qemu-ga."""
    with controller_on(kube_api_double, make_kube_store, agent_boot_disk, tmp_path) as parts:
        yield parts


def test_a_running_vm_with_an_agent_is_frozen_while_its_volume_snapshots_are_cut_then_thawed(agent_cluster,
                                                                                             kube_api_double):
    store, kubelet, sidecars = agent_cluster
    pod = run_tick_vm(store, kubelet, memory="256Mi", booted="PVLUN-AGENT started")
    execs = len(kube_api_double.execs)
    sidecars.holding.set()  # the external-snapshotter is slow: the guest stays frozen until it has cut
    store.apply({"apiVersion": "snapshot.kubevirt.io/v1beta1", "kind": "VirtualMachineSnapshot",
                 "metadata": {"name": "live", "namespace": NS},
                 "spec": {"source": {"apiGroup": "kubevirt.io", "kind": "VirtualMachine", "name": "tick"}}})
    assert wait_until(lambda: store.list("VolumeSnapshot", NS), 20.0)
    time.sleep(1.0)
    assert [e[3] for e in kube_api_double.execs[execs:]] == [freeze_command()]  # frozen, not yet thawed
    sidecars.holding.clear()
    status = wait_until(lambda: (lambda s: s if s.get("phase") in ("Succeeded", "Failed") else None)(
        status_of(store, "VirtualMachineSnapshot", "live")), 30.0,
        lambda: str(status_of(store, "VirtualMachineSnapshot", "live")))
    assert status["phase"] == "Succeeded" and status["indications"] == ["Online", "GuestAgent"], status
    assert [e[3] for e in kube_api_double.execs[execs:]] == [freeze_command(), thaw_command()]
    assert all(e[1:3] == (pod, "compute") for e in kube_api_double.execs[execs:])
    assert sidecars.cut == [f"vmsnapshot-{store.get('VirtualMachineSnapshot', 'live', NS)['metadata']['uid']}"
                            "-volume-root"]
