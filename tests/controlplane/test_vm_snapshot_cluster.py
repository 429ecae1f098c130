"""On a cluster `pvlun controller` reaches neither a launcher's QEMU nor the CSI driver: a
VirtualMachineSnapshot and a VirtualMachineRestore there are refused (Failed, with a message
that says why and what to use instead) — through the Kubernetes API server TEST DOUBLE, every
call within deploy/full's RBAC."""

from __future__ import annotations

import signal

from controller_rbac import allowed, classify, rules
from controlplane.kube_store import USER_AGENT
from test_controller_cluster import NS, wait_until
from test_controller_process import CONTROLLER_NS, Controller

BASE = f"/apis/snapshot.kubevirt.io/v1beta1/namespaces/{NS}"


def test_the_cluster_controller_refuses_vm_snapshots_and_restores_saying_why(kube_api_double, kube_kubeconfig,
                                                                              tmp_path):
    double = kube_api_double
    for ns in (NS, CONTROLLER_NS):
        assert double.call("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                                          "metadata": {"name": ns}})[0] == 201
    controller = Controller(kube_kubeconfig, "replica-a", str(tmp_path / "controller.log"))
    try:
        assert wait_until(lambda: controller.get("/readyz") == 200, 20)
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
        controller.proc.send_signal(signal.SIGTERM)
        assert controller.proc.wait(20) == 0
    finally:
        controller.stop()
    calls = {classify(*request) for request, agent in zip(double.requests, double.agents) if agent == USER_AGENT}
    assert ("snapshot.kubevirt.io", "virtualmachinesnapshots/status", "update", NS) in calls
    cluster_role, role = rules()
    assert sorted(c for c in calls if not allowed(cluster_role, role, *c)) == []
