"""Every call `pvlun controller` makes is one deploy/full's RBAC allows: the controller runs
as a process on the Kubernetes API server TEST DOUBLE (which has no RBAC of its own), the
test drives a DataVolume and a VirtualMachine through it with raw HTTP calls of its own, and
each request the controller made (told apart by its User-Agent) is checked against the
ClusterRole and Role that `kubectl kustomize deploy/full` renders — list and watch included,
so an informer that reaches past its Role (all namespaces' Leases) fails here."""

from __future__ import annotations

import contextlib
import json
import signal
from typing import Iterator

import yaml

from controller_rbac import allowed, classify, rules
from controlplane.kube_store import USER_AGENT
from test_controller_cluster import NS, cdi_http_datavolume, importer_container, wait_until
from test_controller_process import CONTROLLER_NS, Controller
from virt.guest_images import tick_vm_manifest


def get(double, path: str) -> dict:
    code, body = double.call("GET", path)
    return body if code == 200 else {}


@contextlib.contextmanager
def leading_controller(double, kubeconfig: str, tmp_path) -> Iterator[Controller]:
    """Its namespaces made, one `pvlun controller` ready; stopped cleanly (SIGTERM, exit 0) at the end."""
    for ns in (NS, CONTROLLER_NS):
        assert double.call("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                                          "metadata": {"name": ns}})[0] == 201
    controller = Controller(kubeconfig, "replica-a", str(tmp_path / "controller.log"))
    try:
        assert wait_until(lambda: controller.get("/readyz") == 200, 20)
        yield controller
        controller.proc.send_signal(signal.SIGTERM)
        assert controller.proc.wait(20) == 0
    finally:
        controller.stop()


def controller_calls(double) -> set[tuple[str, str, str, str | None]]:
    """Every (group, resource, verb, namespace) the controller asked the API double for."""
    return {classify(*request) for request, agent in zip(double.requests, double.agents) if agent == USER_AGENT}


def denied(calls: set) -> list:
    """The calls deploy/full's RBAC does not allow."""
    cluster_role, role = rules()
    return sorted(c for c in calls if not allowed(cluster_role, role, *c))


def test_every_call_the_controller_makes_is_one_its_rbac_allows(kube_api_double, kube_kubeconfig, tmp_path):
    double = kube_api_double
    with leading_controller(double, kube_kubeconfig, tmp_path):
        dv = cdi_http_datavolume("fedora", "http://images.example/fedora.qcow2")
        assert double.call("POST", f"/apis/cdi.kubevirt.io/v1beta1/namespaces/{NS}/datavolumes", dv)[0] == 201
        pod_path = f"/api/v1/namespaces/{NS}/pods/importer-fedora"
        pod = wait_until(lambda: get(double, pod_path), 15)
        said = json.dumps({"phase": "Succeeded", "message": "Import Complete"})
        assert double.call("PUT", pod_path + "/status", dict(pod, status=importer_container(
            {"terminated": {"exitCode": 0, "message": said}})))[0] == 200
        dv_path = f"/apis/cdi.kubevirt.io/v1beta1/namespaces/{NS}/datavolumes/fedora"
        assert wait_until(lambda: (get(double, dv_path).get("status") or {}).get("phase") == "Succeeded", 15)
        vm = yaml.safe_load(tick_vm_manifest("tick", "http://images.example/tick.qcow2"))
        vm["metadata"]["namespace"] = NS
        assert double.call("POST", f"/apis/kubevirt.io/v1/namespaces/{NS}/virtualmachines", vm)[0] == 201
        assert wait_until(lambda: get(double, f"/apis/cdi.kubevirt.io/v1beta1/namespaces/{NS}/datavolumes/tick-root"),
                          15)
    calls = controller_calls(double)
    assert ("coordination.k8s.io", "leases", "update", CONTROLLER_NS) in calls  # the controller did lead
    assert ("", "pods", "create", NS) in calls and ("cdi.kubevirt.io", "datavolumes/status", "update", NS) in calls
    assert denied(calls) == []
