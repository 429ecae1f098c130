"""The migration controller's phases and cleanup in cluster mode, on the Kubernetes API server
TEST DOUBLE with the Pods' status written by hand, as a kubelet would (no QEMU here; the real
stream is tests/virt/test_cluster_migration.py): the token Secret and the target Pod, the
phases as the target Pod goes, a target that fails, one migration of a VMI at a time, a
deletion before the stream, a migration a restarted controller lost sight of, refusals."""

from __future__ import annotations

import base64
import json
import time

import pytest

from cluster_vms import (IMAGE, NS, VMIM, apply_tick_vm, migrate, running_vmi, start_controller, status_of,
                         stop_controller, token_secret)
from kube_fixtures import wait_until
from virt import migration_job
from virt.pods import TOKEN_DIR

class Controller:
    """`pvlun controller`'s loop in-process; `restart()` is a new process on the same API."""

    def __init__(self, make_store):
        self.make_store = make_store
        self.start()

    def start(self) -> None:
        self.ctx, self.loop = start_controller(self.make_store)

    def stop(self) -> None:
        stop_controller(self.ctx, self.loop)
        self.ctx.store.stop()

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture
def cluster(kube_api_double, make_kube_store):
    controller = Controller(make_kube_store)
    user = make_kube_store()
    user.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
    try:
        yield user, controller
    finally:
        controller.stop()


def put_status(double, kind_path: str, obj: dict, status: dict) -> dict:
    code, body = double.call("PUT", f"{kind_path}/{obj['metadata']['name']}/status", dict(obj, status=status))
    assert code == 200, body
    return body


PODS = f"/api/v1/namespaces/{NS}/pods"


def now(double, path: str) -> dict:
    """The object as the API server has it now (a store's cache may lag a write just made)."""
    code, body = double.call("GET", path)
    assert code == 200, body
    return body


def bind(double, name: str, node: str) -> dict:
    """The scheduler's part: the Pod on a node (the Pod as it is now)."""
    code, pod = double.call("PATCH", f"{PODS}/{name}", {"spec": {"nodeName": node}}, "application/merge-patch+json")
    assert code == 200, pod
    return pod


def running(ready: bool = True, ip: str = "10.244.1.7") -> dict:
    return {"phase": "Running", "podIP": ip,
            "containerStatuses": [{"name": "compute", "ready": ready, "restartCount": 0, "state": {"running": {}}}]}


def pods(store, migration: bool | None = None) -> list[dict]:
    return [p for p in store.list("Pod", NS)
            if migration is None or ("kubevirt.io/migrationJobUID" in p["metadata"]["labels"]) == migration]


def vmi_on_node_a(double, store, access: str = "ReadWriteMany") -> dict:
    """The tick VM's VMI, Running on node-a in its launcher Pod (the kubelet's status written by hand)."""
    apply_tick_vm(double, store, access)
    pod = wait_until(lambda: next(iter(pods(store)), None))
    put_status(double, PODS, bind(double, pod["metadata"]["name"], "node-a"), running())
    return wait_until(lambda: running_vmi(store))


def phase(store, name: str) -> str | None:
    return status_of(store, VMIM, name).get("phase")


def test_the_target_pod_mounts_the_token_and_the_phases_follow_it_until_it_fails(cluster, kube_api_double):
    store, _ = cluster
    vmi = vmi_on_node_a(kube_api_double, store)
    mig = migrate(store, "move")
    target = wait_until(lambda: next(iter(pods(store, migration=True)), None))
    assert wait_until(lambda: phase(store, "move") == "Scheduling")
    code, token = token_secret(kube_api_double, mig)
    assert code == 200 and token["immutable"] is True and len(base64.b64decode(token["data"]["token"])) >= 32
    assert token["metadata"]["ownerReferences"][0] == {"apiVersion": "kubevirt.io/v1", "kind": VMIM, "name": "move",
                                                       "uid": mig["metadata"]["uid"], "controller": True}
    assert {"name": "pvlun-migration", "secret": {"secretName": token["metadata"]["name"], "defaultMode": 0o400}} in \
        target["spec"]["volumes"]
    compute = target["spec"]["containers"][0]
    assert compute["args"][compute["args"].index("--token-file") + 1].startswith(TOKEN_DIR)
    assert store.get(VMIM, "move", NS)["metadata"]["finalizers"] == ["pvlun.dev/migration"]

    put_status(kube_api_double, PODS, bind(kube_api_double, target["metadata"]["name"], "node-b"),
               {"phase": "Pending", "containerStatuses": [{"name": "compute", "ready": False,
                                                           "state": {"waiting": {"reason": "ContainerCreating"}}}]})
    assert wait_until(lambda: phase(store, "move") == "Scheduled")
    put_status(kube_api_double, PODS, now(kube_api_double, f"{PODS}/{target['metadata']['name']}"), running(ready=False))
    assert wait_until(lambda: phase(store, "move") == "PreparingTarget")  # runs, its launcher not listening yet
    status = store.get(VMIM, "move", NS)["status"]
    assert (status["targetPod"], status["targetNode"]) == (target["metadata"]["name"], "node-b")
    put_status(kube_api_double, PODS, now(kube_api_double, f"{PODS}/{target['metadata']['name']}"), {"phase": "Failed", "containerStatuses": [
        {"name": "compute", "ready": False, "state": {"terminated": {"exitCode": 1, "reason": "Error",
                                                                     "message": "pvlun launch: QEMU failed"}}}]})
    assert wait_until(lambda: phase(store, "move") == "Failed")
    assert "ended: Error: pvlun launch: QEMU failed" in store.get(VMIM, "move", NS)["status"]["error"]
    assert wait_until(lambda: not pods(store, migration=True))  # the target Pod goes, and the token
    assert token_secret(kube_api_double, mig)[0] == 404
    after = store.get("VirtualMachineInstance", "tick", NS)["status"]
    assert (after["phase"], after["nodeName"], after["activePods"]) == ("Running", "node-a", vmi["status"]["activePods"])
    assert "migrationState" not in after  # no stream ever started


def test_one_migration_of_a_vmi_at_a_time_the_next_waits_pending(cluster, kube_api_double):
    store, _ = cluster
    vmi_on_node_a(kube_api_double, store)
    migrate(store, "first")
    assert wait_until(lambda: phase(store, "first") == "Scheduling")
    time.sleep(1.1)  # creationTimestamp has whole seconds
    migrate(store, "second")
    assert wait_until(lambda: phase(store, "second") == "Pending")
    assert len(pods(store, migration=True)) == 1
    store.delete(VMIM, "first", NS)  # before its stream: its Pod and token go, then it does
    assert wait_until(lambda: store.get(VMIM, "first", NS) is None)
    assert wait_until(lambda: phase(store, "second") == "Scheduling")
    [target] = pods(store, migration=True)
    assert target["metadata"]["annotations"]["kubevirt.io/migrationJobName"] == "second"
    assert [s["metadata"]["name"] for s in kube_api_double.call("GET", f"/api/v1/namespaces/{NS}/secrets")[1]["items"]
            ] == [f"pvlun-migration-{store.get(VMIM, 'second', NS)['metadata']['uid']}"]


def test_a_restarted_controller_fails_a_migration_whose_token_it_lost(cluster, kube_api_double):
    store, controller = cluster
    vmi_on_node_a(kube_api_double, store)
    mig = migrate(store, "move")
    assert wait_until(lambda: phase(store, "move") == "Scheduling")
    controller.restart()  # the token lived in the old process only
    assert wait_until(lambda: phase(store, "move") == "Failed")
    assert "token was lost" in store.get(VMIM, "move", NS)["status"]["error"]
    assert wait_until(lambda: not pods(store, migration=True)) and token_secret(kube_api_double, mig)[0] == 404


@pytest.mark.parametrize("source_ended, outcome", [(True, "Succeeded"), (False, "Failed")])
def test_a_stream_a_restarted_controller_lost_is_settled_from_the_pods(cluster, kube_api_double, monkeypatch,
                                                                      source_ended, outcome):
    """The source launcher ended while the target runs: the guest moved. Still running: it stayed."""
    monkeypatch.setattr(migration_job, "SETTLE_SECONDS", 1.0)
    store, controller = cluster
    vmi = vmi_on_node_a(kube_api_double, store)
    [source] = pods(store)
    controller.stop()  # the controller that ran the stream is gone; the Pods are where it left them
    mig = migrate(store, "move")
    target = store.apply({"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": "virt-launcher-tick-target", "namespace": NS, "labels": {
            "kubevirt.io/created-by": vmi["metadata"]["uid"], "kubevirt.io/migrationJobUID": mig["metadata"]["uid"],
            "app.kubernetes.io/managed-by": "pvlun-controller"},
        "annotations": {"kubevirt.io/migrationJobName": "move"}},
        "spec": {"nodeName": "node-b", "containers": [{"name": "compute", "image": IMAGE}]}})
    target = put_status(kube_api_double, PODS, target, running(ip="10.244.2.8"))
    state = {"migrationUid": mig["metadata"]["uid"], "startTimestamp": "2024-01-01T00:00:00Z", "mode": "PreCopy",
             "sourceNode": "node-a", "sourcePod": source["metadata"]["name"], "targetNode": "node-b",
             "targetPod": target["metadata"]["name"], "completed": False, "failed": False}
    migrations = f"/apis/kubevirt.io/v1/namespaces/{NS}/virtualmachineinstancemigrations"
    put_status(kube_api_double, migrations, now(kube_api_double, f"{migrations}/move"),
               {"phase": "Running", "migrationState": state})
    vmis = f"/apis/kubevirt.io/v1/namespaces/{NS}/virtualmachineinstances"
    current = now(kube_api_double, f"{vmis}/tick")
    put_status(kube_api_double, vmis, current, dict(current["status"], migrationState=state))
    if source_ended:
        put_status(kube_api_double, PODS, now(kube_api_double, f"{PODS}/{source['metadata']['name']}"),
                   {"phase": "Succeeded", "containerStatuses": [
            {"name": "compute", "ready": False, "state": {"terminated": {"exitCode": 0}}}]})
    controller.start()
    assert wait_until(lambda: phase(store, "move") == outcome)
    after = store.get("VirtualMachineInstance", "tick", NS)["status"]
    assert after["phase"] == "Running" and after["nodeName"] == ("node-b" if source_ended else "node-a")
    assert after["migrationState"]["completed"] is source_ended and after["migrationState"]["failed"] is not source_ended
    if source_ended:
        assert after["activePods"] == {target["metadata"]["uid"]: "node-b"}
        assert wait_until(lambda: store.get("Pod", source["metadata"]["name"], NS) is None)
    else:
        assert "lost the migration's stream" in store.get(VMIM, "move", NS)["status"]["error"]
        assert wait_until(lambda: store.get("Pod", target["metadata"]["name"], NS) is None)
        assert store.get("Pod", source["metadata"]["name"], NS) is not None


def test_what_cannot_migrate_is_refused_with_the_reason(cluster, kube_api_double):
    store, _ = cluster
    store.apply({"apiVersion": "kubevirt.io/v1", "kind": VMIM, "metadata": {"name": "nothing", "namespace": NS},
                 "spec": {"vmiName": "absent"}})
    assert wait_until(lambda: phase(store, "nothing") == "Failed")
    assert store.get(VMIM, "nothing", NS)["status"]["error"] == "VirtualMachineInstance absent is not running"
    vmi_on_node_a(kube_api_double, store, access="ReadWriteOnce")
    migrate(store, "rwo")
    assert wait_until(lambda: phase(store, "rwo") == "Failed")
    assert "is not shared: live migration needs volumeMode Block with accessModes ReadWriteMany" in \
        store.get(VMIM, "rwo", NS)["status"]["error"]
    assert not pods(store, migration=True)
    assert json.dumps(kube_api_double.call("GET", f"/api/v1/namespaces/{NS}/secrets")[1]["items"]) == "[]"
