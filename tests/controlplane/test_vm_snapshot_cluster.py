"""A stopped VM's VirtualMachineSnapshot and VirtualMachineRestores on a cluster (`pvlun
controller`), as KubeVirt's virt-controller makes them: one VolumeSnapshot per claim, of the
driver's VolumeSnapshotClass, owned by the VirtualMachineSnapshotContent; restored claims whose
dataSource is that VolumeSnapshot, and the VM updated (the same one) or made (a new name).

On the Kubernetes API server TEST DOUBLE the controller runs as a process, the CSI sidecars are
played by tests/csi_sidecars_double.py, and every call the controller made is checked against
deploy/full's RBAC. With PVLUN_TEST_KUBECONFIG the same scenario runs against a real cluster
with deploy/csi and deploy/full installed (its own namespace and an Immediate StorageClass of
csi.pvlun.dev, deleted afterwards)."""

from __future__ import annotations

import json
import os
import uuid
from typing import Callable

import pytest
import yaml

from csi_sidecars_double import CsiSidecarsDouble
from controlplane.kube_kinds import ApiError
from controlplane.kube_store import KubeStore
from kube_fixtures import wait_until
from test_controller_cluster import NS
from test_controller_rbac import controller_calls, denied, leading_controller
from virt.guest_images import tick_vm_manifest

DRIVER = "csi.pvlun.dev"
Call = Callable[..., tuple[int, dict]]  # (method, path, body=None) → (HTTP code, body)


def snapshots_path(ns: str, plural: str) -> str:
    return f"/apis/snapshot.kubevirt.io/v1beta1/namespaces/{ns}/{plural}"


def get(call: Call, path: str) -> dict:
    code, body = call("GET", path)
    return body if code == 200 else {}


def halted_vm(ns: str, name: str, claim: str) -> dict:
    """The tick VM, Halted, booting from `claim` (a persistentVolumeClaim volume)."""
    vm = yaml.safe_load(tick_vm_manifest(name, "http://images.example/tick.qcow2", strategy="Halted"))
    vm["spec"].pop("dataVolumeTemplates")
    vm["metadata"]["namespace"] = ns
    volume = next(v for v in vm["spec"]["template"]["spec"]["volumes"] if "dataVolume" in v)
    volume.pop("dataVolume")
    volume["persistentVolumeClaim"] = {"claimName": claim}
    return vm


def snapshot_a_stopped_vm(call: Call, ns: str, storage_class: str) -> str:
    """A claim `disk1`, the Halted VM `snapvm` on it and its VirtualMachineSnapshot `snap1`, applied: its path."""
    assert call("POST", f"/api/v1/namespaces/{ns}/persistentvolumeclaims", {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "disk1", "namespace": ns},
        "spec": {"accessModes": ["ReadWriteOnce"], "volumeMode": "Block", "storageClassName": storage_class,
                 "resources": {"requests": {"storage": "8Mi"}}}})[0] == 201
    assert call("POST", f"/apis/kubevirt.io/v1/namespaces/{ns}/virtualmachines", halted_vm(ns, "snapvm", "disk1"))[0] == 201
    assert call("POST", snapshots_path(ns, "virtualmachinesnapshots"), {
        "apiVersion": "snapshot.kubevirt.io/v1beta1", "kind": "VirtualMachineSnapshot",
        "metadata": {"name": "snap1", "namespace": ns},
        "spec": {"source": {"apiGroup": "kubevirt.io", "kind": "VirtualMachine", "name": "snapvm"}}})[0] == 201
    return f"{snapshots_path(ns, 'virtualmachinesnapshots')}/snap1"


def ended(call: Call, path: str, timeout: float) -> dict:
    """The VirtualMachineSnapshot at `path` once Succeeded or Failed."""
    return wait_until(lambda: (lambda s: s if s.get("status", {}).get("phase") in ("Succeeded", "Failed") else None)(
        get(call, path)), timeout, lambda: str(get(call, path).get("status")))


def classes(double, binding: str = "Immediate", snapshot_classes: dict[str, str] | None = None) -> None:
    """The StorageClass `fast` of the driver, and VolumeSnapshotClasses (name → driver)."""
    assert double.call("POST", "/apis/storage.k8s.io/v1/storageclasses", {
        "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass", "metadata": {"name": "fast"},
        "provisioner": DRIVER, "volumeBindingMode": binding})[0] == 201
    for name, driver in (snapshot_classes or {}).items():
        assert double.call("POST", "/apis/snapshot.storage.k8s.io/v1/volumesnapshotclasses", {
            "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshotClass", "metadata": {"name": name},
            "driver": driver, "deletionPolicy": "Delete"})[0] == 201


def scenario(call: Call, ns: str, storage_class: str, snapshot_class: str, timeout: float,
             restored_phase: str = "Bound") -> None:
    """Snapshot a stopped VM, restore it to a new VM and to itself: what each step made (the
    restored claims `restored_phase` when the restores complete)."""
    snap = ended(call, snapshot_a_stopped_vm(call, ns, storage_class), timeout)
    ref = {"apiGroup": "kubevirt.io", "kind": "VirtualMachine", "name": "snapvm"}
    claims = f"/api/v1/namespaces/{ns}/persistentvolumeclaims"
    status = snap["status"]
    assert status["phase"] == "Succeeded" and status["readyToUse"] is True, status
    assert status.get("indications") == []  # stopped: neither Online nor frozen
    assert status["snapshotVolumes"]["includedVolumes"] == ["root"]
    content = get(call, f"{snapshots_path(ns, 'virtualmachinesnapshotcontents')}/"
                        f"{status['virtualMachineSnapshotContentName']}")
    assert content["status"]["readyToUse"] is True
    assert content["spec"]["source"]["virtualMachine"]["spec"]["runStrategy"] == "Halted"
    backup = content["spec"]["volumeBackups"][0]
    vs_name = f"vmsnapshot-{snap['metadata']['uid']}-volume-root"
    assert backup["volumeSnapshotName"] == vs_name and backup["persistentVolumeClaim"]["metadata"]["name"] == "disk1"
    vs = get(call, f"/apis/snapshot.storage.k8s.io/v1/namespaces/{ns}/volumesnapshots/{vs_name}")
    assert vs["spec"] == {"source": {"persistentVolumeClaimName": "disk1"}, "volumeSnapshotClassName": snapshot_class}
    owner = vs["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["uid"], owner["controller"]) == ("VirtualMachineSnapshotContent",
                                                                  content["metadata"]["uid"], True)
    assert vs["status"]["readyToUse"] is True

    def restore(name: str, target: str) -> dict:
        assert call("POST", snapshots_path(ns, "virtualmachinerestores"), {
            "apiVersion": "snapshot.kubevirt.io/v1beta1", "kind": "VirtualMachineRestore",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"target": dict(ref, name=target), "virtualMachineSnapshotName": "snap1"}})[0] == 201
        path = f"{snapshots_path(ns, 'virtualmachinerestores')}/{name}"
        done = wait_until(lambda: (lambda r: r if r.get("status", {}).get("complete") else None)(get(call, path)),
                          timeout, lambda: str(get(call, path).get("status")))
        restored = done["status"]["restores"][0]
        assert (restored["volumeName"], restored["volumeSnapshotName"]) == ("root", vs_name)
        claim = get(call, f"{claims}/{restored['persistentVolumeClaim']}")
        assert claim["spec"]["dataSource"] == {"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot",
                                               "name": vs_name}
        assert claim["status"]["phase"] == restored_phase
        vm = get(call, f"/apis/kubevirt.io/v1/namespaces/{ns}/virtualmachines/{target}")
        volume = next(v for v in vm["spec"]["template"]["spec"]["volumes"] if v["name"] == "root")
        assert volume == {"name": "root", "persistentVolumeClaim": {"claimName": claim["metadata"]["name"]}}
        return claim

    copy_claim = restore("to-copy", "snapvm-copy")
    assert copy_claim["metadata"]["ownerReferences"][0]["name"] == "snapvm-copy"  # volumeOwnershipPolicy Vm
    back_claim = restore("back", "snapvm")  # the snapshot's own VM, stopped
    assert back_claim["metadata"]["name"] != copy_claim["metadata"]["name"]


@pytest.mark.parametrize("binding", ["Immediate", "WaitForFirstConsumer"])
def test_a_stopped_vms_snapshot_is_volume_snapshots_and_restores_make_claims_from_them(kube_api_double,
                                                                                      kube_kubeconfig, tmp_path,
                                                                                      binding):
    """WaitForFirstConsumer: the restored claims stay Pending until the VM runs, and the restores
    complete without them bound, as KubeVirt's do."""
    double = kube_api_double
    classes(double, binding, {"other-driver": "other.csi.example", "pvlun-snaps": DRIVER})
    with leading_controller(double, kube_kubeconfig, tmp_path):
        sidecars = CsiSidecarsDouble(double, NS)
        if binding == "WaitForFirstConsumer":
            sidecars.consumed = {"disk1"}  # it was used before: bound
        sidecars.start()
        try:
            scenario(double.call, NS, "fast", "pvlun-snaps", 20.0, "Bound" if binding == "Immediate" else "Pending")
            # deleted: the snapshot lets go; its content, deleted by the garbage collector (the double's),
            # deletes the VolumeSnapshots it owns, then goes
            snaps, volume_snapshots = (snapshots_path(NS, "virtualmachinesnapshots"),
                                       f"/apis/snapshot.storage.k8s.io/v1/namespaces/{NS}/volumesnapshots")
            content = (f"{snapshots_path(NS, 'virtualmachinesnapshotcontents')}/"
                       f"{get(double.call, f'{snaps}/snap1')['status']['virtualMachineSnapshotContentName']}")
            assert double.call("DELETE", f"{snaps}/snap1")[0] == 200
            assert wait_until(lambda: double.call("GET", f"{snaps}/snap1")[0] == 404
                              and double.call("GET", content)[0] == 404)
            assert get(double.call, volume_snapshots)["items"] == []
        finally:
            sidecars.stop()
    calls = controller_calls(double)
    assert {("snapshot.storage.k8s.io", "volumesnapshots", "create", NS),
            ("snapshot.kubevirt.io", "virtualmachinesnapshotcontents", "create", NS),
            ("", "persistentvolumeclaims", "create", NS),
            ("kubevirt.io", "virtualmachines", "create", NS),
            ("snapshot.storage.k8s.io", "volumesnapshots", "delete", NS)} <= calls
    assert denied(calls) == [], denied(calls)


def test_a_vm_snapshot_with_no_volume_snapshot_class_of_the_driver_fails_saying_so(kube_api_double, kube_kubeconfig,
                                                                                   tmp_path):
    double = kube_api_double
    classes(double)
    with leading_controller(double, kube_kubeconfig, tmp_path):
        sidecars = CsiSidecarsDouble(double, NS).start()
        try:
            status = ended(double.call, snapshot_a_stopped_vm(double.call, NS, "fast"), 15.0)["status"]
        finally:
            sidecars.stop()
    assert status["phase"] == "Failed" and status["readyToUse"] is False
    assert "no VolumeSnapshotClass of driver csi.pvlun.dev" in status["error"]["message"]
    assert not get(double.call, f"/apis/snapshot.storage.k8s.io/v1/namespaces/{NS}/volumesnapshots")["items"]


def test_a_volume_snapshot_of_its_name_that_it_did_not_make_fails_the_snapshot(kube_api_double, kube_kubeconfig,
                                                                                tmp_path):
    """One planted under the name the snapshot's would have (its uid is known once it exists) is never taken."""
    double = kube_api_double
    classes(double, snapshot_classes={"pvlun-snaps": DRIVER})
    with leading_controller(double, kube_kubeconfig, tmp_path):
        sidecars = CsiSidecarsDouble(double, NS)
        sidecars.consumed = set()  # disk1 stays Pending meanwhile: the snapshot waits for it
        sidecars.start()
        try:
            snap_path = snapshot_a_stopped_vm(double.call, NS, "fast")
            snap = wait_until(lambda: "waiting for volume root" in json.dumps(get(double.call, snap_path).get("status"))
                              and get(double.call, snap_path), 15)
            name = f"vmsnapshot-{snap['metadata']['uid']}-volume-root"
            assert double.call("POST", f"/apis/snapshot.storage.k8s.io/v1/namespaces/{NS}/volumesnapshots", {
                "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
                "metadata": {"name": name, "namespace": NS},
                "spec": {"source": {"persistentVolumeClaimName": "someone-elses"}}})[0] == 201
            sidecars.consumed = None  # now disk1 binds
            status = ended(double.call, snap_path, 20)["status"]
        finally:
            sidecars.stop()
    assert status["phase"] == "Failed" and f"VolumeSnapshot {name} exists and was not made" in status["error"]["message"]


def test_on_a_real_cluster():
    kubeconfig = os.environ.get("PVLUN_TEST_KUBECONFIG")
    if not kubeconfig:
        pytest.skip("PVLUN_TEST_KUBECONFIG is not set")
    suffix = uuid.uuid4().hex[:8]
    ns, storage_class = f"vmsnap-{suffix}", f"pvlun-vmsnap-{suffix}"
    store = KubeStore.from_kubeconfig(kubeconfig)

    def call(method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        try:
            return (201 if method == "POST" else 200), store.api.request(method, path, body=body)
        except ApiError as exc:
            return exc.code, {}

    classes = [c for c in store.list("VolumeSnapshotClass") if c.get("driver") == DRIVER]
    if len(classes) != 1:
        pytest.fail(f"the cluster needs one VolumeSnapshotClass of {DRIVER} (deploy/csi), it has {len(classes)}")
    store.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    store.apply({"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass", "metadata": {"name": storage_class},
                 "provisioner": DRIVER, "volumeBindingMode": "Immediate", "reclaimPolicy": "Delete"})
    try:
        scenario(call, ns, storage_class, classes[0]["metadata"]["name"], 180.0)
    finally:
        store.delete("Namespace", ns, "")
        store.delete("StorageClass", storage_class, "")
        store.stop()
