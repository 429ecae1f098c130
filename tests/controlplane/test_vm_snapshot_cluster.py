"""On a cluster `pvlun controller` reaches neither a launcher's QEMU nor the CSI driver: a
VirtualMachineSnapshot and a VirtualMachineRestore there are refused (Failed, with a message
that says why and what to use instead) — through the Kubernetes API server TEST DOUBLE, every
call within deploy/full's RBAC."""

from __future__ import annotations

from test_controller_cluster import NS, wait_until
from test_controller_rbac import controller_calls, denied, leading_controller

BASE = f"/apis/snapshot.kubevirt.io/v1beta1/namespaces/{NS}"


def test_the_cluster_controller_refuses_vm_snapshots_and_restores_saying_why(kube_api_double, kube_kubeconfig,
                                                                              tmp_path):
    double = kube_api_double
    with leading_controller(double, kube_kubeconfig, tmp_path):
        ref = {"apiGroup": "kubevirt.io", "kind": "VirtualMachine", "name": "vm1"}
        assert double.call("POST", f"{BASE}/virtualmachinesnapshots", {
            "apiVersion": "snapshot.kubevirt.io/v1beta1", "kind": "VirtualMachineSnapshot",
            "metadata": {"name": "snap1", "namespace": NS}, "spec": {"source": ref}})[0] == 201
        assert double.call("POST", f"{BASE}/virtualmachinerestores", {
            "apiVersion": "snapshot.kubevirt.io/v1beta1", "kind": "VirtualMachineRestore",
            "metadata": {"name": "back1", "namespace": NS},
            "spec": {"target": ref, "virtualMachineSnapshotName": "snap1"}})[0] == 201

        def status(path: str) -> dict:
            code, body = double.call("GET", path)
            return (body.get("status") or {}) if code == 200 else {}

        snap = wait_until(lambda: status(f"{BASE}/virtualmachinesnapshots/snap1").get("phase") == "Failed"
                          and status(f"{BASE}/virtualmachinesnapshots/snap1"), 15)
        assert snap["readyToUse"] is False
        assert "pvlun serve" in snap["error"]["message"] and "QEMU" in snap["error"]["message"]
        restore = wait_until(lambda: status(f"{BASE}/virtualmachinerestores/back1").get("conditions")
                             and status(f"{BASE}/virtualmachinerestores/back1"), 15)
        failure = next(c for c in restore["conditions"] if c["type"] == "Failure")
        assert failure["status"] == "True" and "VirtualMachineRestores" in failure["message"]
        assert restore["complete"] is False
    calls = controller_calls(double)
    assert ("snapshot.kubevirt.io", "virtualmachinesnapshots/status", "update", NS) in calls
    assert denied(calls) == []
