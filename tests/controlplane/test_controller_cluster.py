"""Cluster mode end to end, on the Kubernetes API server TEST DOUBLE (tests/kube_api_double.py;
no API server can run here): the same reconcile functions as embedded mode, on a KubeStore,
make what CDI and KubeVirt make — a DataVolume's claim and importer Pod, a VM's VMI and
launcher Pod, a migration's target Pod — and follow the Pods' status, which the test writes
as the kubelet would (a simulated importer, a simulated launcher)."""

from __future__ import annotations

import json
import time

import pytest
import yaml

from controlplane.context import Cluster, Context
from controlplane.control_loop import ControlLoop
from kube_fixtures import wait_until
from pvlun.controllers import CLUSTER_SELECTORS, CLUSTER_WATCHED, cluster_reconcilers
from virt.guest_images import tick_vm_manifest
from virt.reconcile import CRASH_LIMIT, FINALIZER

IMAGE = "localhost/pvlun:0.1.0"
NS = "vms"


@pytest.fixture
def cluster(kube_api_double, make_kube_store):
    """A controller (its own KubeStore, informers started, the loop running) and a user's store."""
    store = make_kube_store(selectors=CLUSTER_SELECTORS)
    reconcilers = cluster_reconcilers()
    store.start(dict.fromkeys([kind for kind, _ in reconcilers] + list(CLUSTER_WATCHED)))
    ctx = Context(store=store, csi=None, data_dir="", node_ids=[], cluster=Cluster(image=IMAGE, namespace="pvlun-system"))
    loop = ControlLoop(ctx, reconcilers, watched=CLUSTER_WATCHED)
    loop.start(workers=2)
    user = make_kube_store()
    user.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
    user.controller_store = store  # what the controller sees, for tests that ask
    yield user
    ctx.stopping.set()
    loop.join(5)


def pods(store) -> list[dict]:
    return store.list("Pod", NS)


def set_pod_status(double, pod: dict, status: dict) -> None:
    """What the kubelet would write: over the Pod as the API server has it now (the controller
    may have written it since the test last read it)."""
    meta = pod["metadata"]
    path = f"/api/v1/namespaces/{meta.get('namespace', NS)}/pods/{meta['name']}"
    for _ in range(20):
        code, current = double.call("GET", path)
        assert code == 200, current
        code, answer = double.call("PUT", path + "/status", dict(current, status=status))
        if code != 409:
            break
    assert code == 200, answer


def set_claim_bound(double, store, name: str) -> None:
    pvc = store.get("PersistentVolumeClaim", name, NS)
    body = dict(pvc, status={"phase": "Bound", "capacity": {"storage": "8Mi"}})
    code, answer = double.call("PUT", f"/api/v1/namespaces/{NS}/persistentvolumeclaims/{name}/status", body)
    assert code == 200, answer


def vm_on_a_bound_claim(store, double, name: str = "tick", volume_name: str = "") -> dict:
    """The tick VM on a claim made beforehand (as users also do), Bound; applied."""
    vm = yaml.safe_load(tick_vm_manifest(name, "http://images.example/tick.qcow2"))
    template = vm["spec"].pop("dataVolumeTemplates")[0]
    vm["metadata"]["namespace"] = NS
    volume = next(v for v in vm["spec"]["template"]["spec"]["volumes"] if "dataVolume" in v)
    volume.pop("dataVolume")
    volume["persistentVolumeClaim"] = {"claimName": template["metadata"]["name"]}
    if volume_name:
        for disk in vm["spec"]["template"]["spec"]["domain"]["devices"]["disks"]:
            if disk["name"] == volume["name"]:
                disk["name"] = volume_name
        volume["name"] = volume_name
    store.apply({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                 "metadata": {"name": template["metadata"]["name"], "namespace": NS},
                 "spec": {"accessModes": ["ReadWriteMany"], "volumeMode": "Block",
                          "resources": {"requests": {"storage": "8Mi"}}}})
    set_claim_bound(double, store, template["metadata"]["name"])
    return store.apply(vm)


def test_a_vm_gets_its_vmi_and_a_launcher_pod_and_runs_when_the_pod_does(cluster, kube_api_double):
    store = cluster
    vm_on_a_bound_claim(store, kube_api_double)

    pod = wait_until(lambda: next(iter(pods(store)), None))
    vmi = store.get("VirtualMachineInstance", "tick", NS)
    assert vmi["metadata"]["ownerReferences"][0]["kind"] == "VirtualMachine"
    assert pod["metadata"]["name"].startswith("virt-launcher-tick-")
    assert pod["metadata"]["ownerReferences"][0]["uid"] == vmi["metadata"]["uid"]
    container = pod["spec"]["containers"][0]
    assert container["image"] == IMAGE and (container["command"] + container.get("args", []))[:2] == ["pvlun", "launch"]
    assert container["volumeDevices"][0]["devicePath"].startswith("/dev/pvlun/")
    assert FINALIZER in store.get("VirtualMachine", "tick", NS)["metadata"]["finalizers"]  # deletion waits for the VMI
    assert wait_until(lambda: (store.get("VirtualMachineInstance", "tick", NS).get("status") or {}).get("phase")
                      == "Scheduling")

    code, pod = kube_api_double.call("PATCH", f"/api/v1/namespaces/{NS}/pods/{pod['metadata']['name']}",
                                     {"spec": {"nodeName": "node-a"}}, "application/merge-patch+json")
    assert code == 200  # the scheduler's binding first (the Pod as it is now: a cache may lag)
    set_pod_status(kube_api_double, pod, {"phase": "Running", "podIP": "10.244.1.7", "hostIP": "198.18.0.2",
                                          "conditions": [{"type": "Ready", "status": "True"}],
                                          "containerStatuses": [{"name": "compute", "ready": True, "restartCount": 0,
                                                                 "state": {"running": {}}}]})
    vmi = wait_until(lambda: (lambda v: v if (v.get("status") or {}).get("phase") == "Running" else None)(
        store.get("VirtualMachineInstance", "tick", NS)))
    assert vmi["status"]["nodeName"] == "node-a"
    assert vmi["status"]["interfaces"][0]["ipAddress"] == "10.244.1.7"
    assert wait_until(lambda: (store.get("VirtualMachine", "tick", NS).get("status") or {}).get("printableStatus")
                      == "Running")
    assert store.get("VirtualMachine", "tick", NS)["status"]["ready"] is True

    store.apply({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstanceMigration",
                 "metadata": {"name": "move", "namespace": NS}, "spec": {"vmiName": "tick"}})
    target = wait_until(lambda: next((p for p in pods(store) if p["metadata"]["name"] != pod["metadata"]["name"]), None))
    terms = json.dumps(target["spec"]["affinity"])
    assert "node-a" in terms  # kept off the source node
    assert wait_until(lambda: (store.get("VirtualMachineInstanceMigration", "move", NS).get("status") or {})
                      .get("phase") == "Scheduling")

    store.delete("VirtualMachine", "tick", NS)
    assert wait_until(lambda: store.get("VirtualMachine", "tick", NS) is None)
    assert store.get("VirtualMachineInstance", "tick", NS) is None


def test_a_halted_vm_has_no_vmi_and_a_start_request_makes_one(cluster, kube_api_double):
    store = cluster
    vm = yaml.safe_load(tick_vm_manifest("idle", "http://images.example/tick.qcow2", strategy="Halted"))
    vm["metadata"]["namespace"] = NS
    store.apply(vm)
    assert wait_until(lambda: (store.get("VirtualMachine", "idle", NS).get("status") or {}).get("printableStatus")
                      == "Stopped")
    assert store.get("VirtualMachineInstance", "idle", NS) is None
    assert store.get("DataVolume", "idle-root", NS) is not None  # its template's DataVolume, made at once


def test_a_container_disk_vm_is_refused_in_cluster_mode_with_what_to_do_and_gets_no_vmi(cluster):
    store = cluster
    store.apply({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "metadata": {"name": "cd", "namespace": NS},
                 "spec": {"runStrategy": "Always", "template": {"spec": {
                     "domain": {"resources": {"requests": {"memory": "64Mi"}}},
                     "volumes": [{"name": "containerdisk",
                                  "containerDisk": {"image": "registry.example/vm/cirros:v1"}}]}}}})

    def refused():
        status = store.get("VirtualMachine", "cd", NS).get("status") or {}
        ready = [c for c in status.get("conditions", []) if c["type"] == "Ready"]
        return status.get("printableStatus") == "ErrorUnschedulable" and ready and ready[0]["message"]
    message = wait_until(refused)
    assert "containerdisk (containerDisk)" in message and "not supported in cluster mode" in message
    assert store.get("VirtualMachineInstance", "cd", NS) is None


def cdi_http_datavolume(name: str, url: str, block: bool = False) -> dict:
    """CDI's documented http DataVolume (spec.storage, the size and nothing else)."""
    storage: dict = {"resources": {"requests": {"storage": "64Mi"}}}
    if block:
        storage["volumeMode"] = "Block"
    return {"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume", "metadata": {"name": name, "namespace": NS},
            "spec": {"source": {"http": {"url": url}}, "storage": storage}}


def importer_container(state: dict, restarts: int = 0, last: dict | None = None) -> dict:
    entry = {"name": "importer", "ready": "running" in state, "restartCount": restarts, "state": state}
    if last:
        entry["lastState"] = {"terminated": last}
    return {"phase": "Running" if "running" in state else "Pending", "containerStatuses": [entry]}


def dv_status(store, name: str) -> dict:
    return (store.get("DataVolume", name, NS) or {}).get("status") or {}


def test_a_datavolume_gets_its_claim_and_an_importer_pod_and_succeeds_with_it(cluster, kube_api_double):
    store = cluster
    store.apply(cdi_http_datavolume("fedora", "http://images.example/fedora.qcow2?a=1&b=$(reboot)", block=True))
    pod = wait_until(lambda: store.get("Pod", "importer-fedora", NS))
    pvc = store.get("PersistentVolumeClaim", "fedora", NS)
    assert pvc["metadata"]["ownerReferences"][0]["kind"] == "DataVolume" and pvc["spec"]["volumeMode"] == "Block"
    assert pod["metadata"]["ownerReferences"][0] == {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                                                      "name": "fedora", "uid": pvc["metadata"]["uid"],
                                                      "controller": True, "blockOwnerDeletion": True}
    container = pod["spec"]["containers"][0]
    assert container["image"] == IMAGE and "import" in container["command"] + container.get("args", [])
    assert container["volumeDevices"] == [{"name": "cdi-data-vol", "devicePath": "/dev/cdi-block-volume"}]
    assert "reboot" not in json.dumps(container.get("args", []) + container["command"])  # the URL is no argv
    assert wait_until(lambda: dv_status(store, "fedora").get("phase") == "ImportScheduled")

    set_pod_status(kube_api_double, pod, importer_container({"running": {}}))
    assert wait_until(lambda: dv_status(store, "fedora").get("phase") == "ImportInProgress")
    # the first attempt fails (a server away for a moment): the kubelet restarts it, the DataVolume counts it
    set_pod_status(kube_api_double, store.get("Pod", "importer-fedora", NS), importer_container(
        {"running": {}}, restarts=1,
        last={"exitCode": 1, "message": json.dumps({"phase": "Failed", "reason": "TransferFailed",
                                                      "message": "GET: connection refused"})}))
    assert wait_until(lambda: dv_status(store, "fedora").get("restartCount") == 1)
    assert dv_status(store, "fedora")["phase"] == "ImportInProgress"
    set_pod_status(kube_api_double, store.get("Pod", "importer-fedora", NS), importer_container(
        {"terminated": {"exitCode": 0, "message": json.dumps({"phase": "Succeeded", "message": "Import Complete"})}},
        restarts=1))
    assert wait_until(lambda: dv_status(store, "fedora").get("phase") == "Succeeded")
    status = dv_status(store, "fedora")
    assert status["progress"] == "100.0%" and status["restartCount"] == 1
    assert {c["type"]: c["status"] for c in status["conditions"]}["Ready"] == "True"
    assert wait_until(lambda: store.get("Pod", "importer-fedora", NS) is None)  # a finished importer goes
    assert store.get("PersistentVolumeClaim", "fedora", NS) is not None  # its claim stays, with the data


def test_an_import_that_keeps_failing_ends_failed_with_the_reason_and_no_claim(cluster, kube_api_double):
    store = cluster
    store.apply(cdi_http_datavolume("broken", "http://images.example/backing.qcow2"))
    pod = wait_until(lambda: store.get("Pod", "importer-broken", NS))
    assert pod["spec"]["containers"][0]["volumeMounts"][0]["mountPath"] == "/data"
    said = json.dumps({"phase": "Failed", "reason": "InvalidImage",
                       "message": "the image names another file (a backing file): refused"})
    set_pod_status(kube_api_double, pod, importer_container({"waiting": {"reason": "CrashLoopBackOff"}}, restarts=3,
                                                            last={"exitCode": 1, "message": said}))
    assert wait_until(lambda: dv_status(store, "broken").get("phase") == "Failed")
    running = {c["type"]: c for c in dv_status(store, "broken")["conditions"]}["Running"]
    assert running["reason"] == "InvalidImage" and "backing file" in running["message"]
    assert wait_until(lambda: store.get("PersistentVolumeClaim", "broken", NS) is None)  # no half-written volume
    assert wait_until(lambda: store.get("Pod", "importer-broken", NS) is None)


def test_an_upload_into_a_cluster_is_refused_with_what_to_do(cluster):
    store = cluster
    store.apply({"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
                 "metadata": {"name": "up", "namespace": NS},
                 "spec": {"source": {"upload": {}}, "storage": {"resources": {"requests": {"storage": "64Mi"}}}}})
    assert wait_until(lambda: dv_status(store, "up").get("phase") == "Failed")
    running = {c["type"]: c for c in dv_status(store, "up")["conditions"]}["Running"]
    assert running["reason"] == "UploadNotSupported" and "embedded mode" in running["message"]
    assert store.get("Pod", "cdi-upload-up", NS) is None


def test_a_clone_from_another_namespace_is_refused_on_a_cluster_before_any_claim_is_made(cluster):
    """A claim's dataSource has no namespace field: the API server would drop it and clone a namesake."""
    store = cluster
    store.apply({"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
                 "metadata": {"name": "copy", "namespace": NS},
                 "spec": {"source": {"pvc": {"name": "golden", "namespace": "os-images"}},
                          "storage": {"resources": {"requests": {"storage": "64Mi"}}}}})
    assert wait_until(lambda: dv_status(store, "copy").get("phase") == "Failed")
    running = {c["type"]: c for c in dv_status(store, "copy")["conditions"]}["Running"]
    assert running["reason"] == "CrossNamespaceClone" and "os-images" in running["message"]
    assert store.get("PersistentVolumeClaim", "copy", NS) is None


def test_a_pod_someone_else_made_under_the_importers_name_is_neither_believed_nor_deleted(cluster, kube_api_double):
    store = cluster
    impostor = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "importer-target", "namespace": NS, "labels": {
                    "app.kubernetes.io/managed-by": "pvlun-controller"}},  # our label copied: not our ownerReference
                "spec": {"containers": [{"name": "importer", "image": "busybox"}]}}
    assert kube_api_double.call("POST", f"/api/v1/namespaces/{NS}/pods", impostor)[0] == 201
    said = json.dumps({"phase": "Succeeded", "message": "Import Complete"})
    set_pod_status(kube_api_double, store.get("Pod", "importer-target", NS) or impostor,
                   importer_container({"terminated": {"exitCode": 0, "message": said}}))
    store.apply(cdi_http_datavolume("target", "http://images.example/fedora.qcow2"))
    assert wait_until(lambda: any(e["reason"] == "ImporterPodNameTaken"
                                  for e in store.events(store.get("DataVolume", "target", NS))))
    time.sleep(0.5)
    assert dv_status(store, "target").get("phase") != "Succeeded"
    assert store.get("Pod", "importer-target", NS)["spec"]["containers"][0]["image"] == "busybox"


def test_the_controller_sees_only_the_pods_it_labels(cluster, kube_api_double):
    store = cluster
    other = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web", "namespace": NS},
             "spec": {"containers": [{"name": "web", "image": "nginx"}]}}
    assert kube_api_double.call("POST", f"/api/v1/namespaces/{NS}/pods", other)[0] == 201
    store.apply(cdi_http_datavolume("seen", "http://images.example/fedora.qcow2"))
    wait_until(lambda: store.get("Pod", "importer-seen", NS))
    assert store.get("Pod", "web", NS) is not None  # a user's store sees every Pod
    assert store.controller_store.get("Pod", "web", NS) is None  # the controller's only its own
    assert store.controller_store.get("Pod", "importer-seen", NS) is not None


def test_a_restart_makes_no_new_launcher_while_the_old_one_may_still_write_the_disks(cluster, kube_api_double):
    """The old launcher Pod takes its grace period to stop its QEMU: until it is gone the VMI
    stays (a finalizer), and the VM makes no new VMI, so two QEMUs never share the disks."""
    store = cluster
    vm_on_a_bound_claim(store, kube_api_double)
    old = wait_until(lambda: next(iter(pods(store)), None))
    path = f"/api/v1/namespaces/{NS}/pods/{old['metadata']['name']}"
    assert kube_api_double.call("PATCH", path, {"metadata": {"finalizers": ["test/kubelet-grace"]}},
                                "application/merge-patch+json")[0] == 200  # the kubelet still stopping it
    old_vmi = store.get("VirtualMachineInstance", "tick", NS)
    assert "pvlun.dev/launcher-pods" in old_vmi["metadata"]["finalizers"]
    store.annotate("VirtualMachine", "tick", NS, **{"pvlun.dev/state-change-request": "restart"})
    assert wait_until(lambda: (kube_api_double.call("GET", path)[1].get("metadata") or {}).get("deletionTimestamp"))
    assert wait_until(lambda: (store.get("VirtualMachine", "tick", NS).get("status") or {}).get("printableStatus")
                      == "Stopping")
    time.sleep(1.0)
    assert [p["metadata"]["name"] for p in pods(store)] == [old["metadata"]["name"]]  # no second launcher
    assert store.get("VirtualMachineInstance", "tick", NS)["metadata"]["uid"] == old_vmi["metadata"]["uid"]

    assert kube_api_double.call("PATCH", path, {"metadata": {"finalizers": None}},
                                "application/merge-patch+json")[0] == 200  # stopped: the Pod goes
    new = wait_until(lambda: next((p for p in pods(store) if p["metadata"]["name"] != old["metadata"]["name"]), None))
    assert new["metadata"]["ownerReferences"][0]["uid"] != old_vmi["metadata"]["uid"]


def test_a_vm_whose_launcher_cannot_be_made_backs_off_instead_of_spinning(cluster, kube_api_double):
    store = cluster
    vm_on_a_bound_claim(store, kube_api_double, name="spin", volume_name="private")  # a name the Pod keeps
    # the first CRASH_LIMIT runs are made again at once; after them each waits its backoff (10 s first)
    assert wait_until(lambda: len((store.get("VirtualMachine", "spin", NS).get("status") or {}).get("crashes") or [])
                      >= CRASH_LIMIT, 30)
    start = len(kube_api_double.requests)
    time.sleep(3.0)
    made = [p for m, p, q in kube_api_double.requests[start:] if m == "POST" and p.endswith("/virtualmachineinstances")]
    assert len(made) <= 1  # not dozens a second: the next try waits its backoff


def test_a_vm_naming_a_missing_instancetype_waits_for_it_and_then_runs_with_its_size(cluster, kube_api_double):
    store = cluster
    vm = yaml.safe_load(tick_vm_manifest("sized", "http://images.example/tick.qcow2", strategy="Halted"))
    domain = vm["spec"]["template"]["spec"]["domain"]
    del domain["cpu"], domain["memory"]
    vm["spec"].update(runStrategy="Always", instancetype={"name": "u1.small"})
    vm["spec"].pop("dataVolumeTemplates")
    vm["spec"]["template"]["spec"]["volumes"] = []
    domain["devices"]["disks"] = []
    vm["metadata"]["namespace"] = NS
    store.apply(vm)
    status = wait_until(lambda: (lambda s: s if s.get("printableStatus") == "ErrorUnschedulable" else None)(
        store.get("VirtualMachine", "sized", NS).get("status") or {}))
    assert "spec.instancetype.name: VirtualMachineClusterInstancetype 'u1.small' not found" in \
        status["conditions"][0]["message"]
    assert store.get("VirtualMachineInstance", "sized", NS) is None  # it does not start without it

    store.apply({"apiVersion": "instancetype.kubevirt.io/v1beta1", "kind": "VirtualMachineClusterInstancetype",
                 "metadata": {"name": "u1.small"}, "spec": {"cpu": {"guest": 2}, "memory": {"guest": "2Gi"}}})
    vmi = wait_until(lambda: store.get("VirtualMachineInstance", "sized", NS))  # the VM followed the new object
    assert vmi["spec"]["domain"]["cpu"] == {"sockets": 2, "cores": 1, "threads": 1}
    assert vmi["spec"]["domain"]["memory"] == {"guest": "2Gi"}
    ref = store.get("VirtualMachine", "sized", NS)["status"]["instancetypeRef"]
    revision = store.get("ControllerRevision", ref["controllerRevisionRef"]["name"], NS)
    assert revision["data"]["spec"]["cpu"]["guest"] == 2
    assert revision["metadata"]["ownerReferences"][0]["name"] == "sized"


def test_a_vmi_applied_alone_gets_its_launcher_pod_ends_for_good_and_deleting_it_removes_the_pod(
        cluster, kube_api_double):
    """A VMI without a VM (KubeVirt's examples/vmi-pvc.yaml shape): its own launcher Pod, its
    status from the Pod's; once the Pod ends it stays Succeeded — no VM makes another."""
    store = cluster
    store.apply({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "disk-alpine", "namespace": NS},
                 "spec": {"accessModes": ["ReadWriteOnce"], "volumeMode": "Block",
                          "resources": {"requests": {"storage": "8Mi"}}}})
    set_claim_bound(kube_api_double, store, "disk-alpine")
    store.apply({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
                 "metadata": {"name": "vmi-pvc", "namespace": NS, "labels": {"special": "vmi-pvc"}},
                 "spec": {"domain": {"cpu": {"cores": 1, "sockets": 1, "threads": 1},
                                     "devices": {"disks": [{"disk": {"bus": "virtio"}, "name": "pvcdisk"}]},
                                     "memory": {"guest": "128Mi"}, "resources": {"requests": {"memory": "128Mi"}}},
                          "terminationGracePeriodSeconds": 0,
                          "volumes": [{"name": "pvcdisk", "persistentVolumeClaim": {"claimName": "disk-alpine"}}]}})
    pod = wait_until(lambda: next(iter(pods(store)), None))
    vmi = store.get("VirtualMachineInstance", "vmi-pvc", NS)
    assert "ownerReferences" not in vmi["metadata"]
    assert pod["metadata"]["name"].startswith("virt-launcher-vmi-pvc-")
    assert pod["metadata"]["ownerReferences"][0]["uid"] == vmi["metadata"]["uid"]
    assert pod["spec"]["containers"][0]["volumeDevices"][0]["devicePath"].startswith("/dev/pvlun/")
    assert wait_until(lambda: "pvlun.dev/launcher-pods" in (store.get("VirtualMachineInstance", "vmi-pvc", NS)
                                                            ["metadata"].get("finalizers") or []))

    code, pod = kube_api_double.call("PATCH", f"/api/v1/namespaces/{NS}/pods/{pod['metadata']['name']}",
                                     {"spec": {"nodeName": "node-b"}}, "application/merge-patch+json")
    assert code == 200
    set_pod_status(kube_api_double, pod, {"phase": "Running", "podIP": "10.244.2.9",
                                          "conditions": [{"type": "Ready", "status": "True"}],
                                          "containerStatuses": [{"name": "compute", "ready": True, "restartCount": 0,
                                                                 "state": {"running": {}}}]})
    assert wait_until(lambda: (store.get("VirtualMachineInstance", "vmi-pvc", NS).get("status") or {})
                      .get("phase") == "Running")
    assert store.get("VirtualMachineInstance", "vmi-pvc", NS)["status"]["nodeName"] == "node-b"
    store.annotate("VirtualMachineInstance", "vmi-pvc", NS, **{"pvlun.dev/state-change-request": "pause"})
    assert wait_until(lambda: "pvlun.dev/state-change-request" not in (
        store.get("VirtualMachineInstance", "vmi-pvc", NS)["metadata"].get("annotations") or {}))  # said, not kept

    set_pod_status(kube_api_double, pod, {"phase": "Succeeded", "containerStatuses": [
        {"name": "compute", "ready": False, "restartCount": 0, "state": {"terminated": {"exitCode": 0}}}]})
    assert wait_until(lambda: (store.get("VirtualMachineInstance", "vmi-pvc", NS).get("status") or {})
                      .get("phase") == "Succeeded")
    time.sleep(1.0)
    assert [p["metadata"]["name"] for p in pods(store)] == [pod["metadata"]["name"]]  # not started again
    assert store.get("VirtualMachineInstance", "vmi-pvc", NS)["status"]["phase"] == "Succeeded"

    store.delete("VirtualMachineInstance", "vmi-pvc", NS)
    assert wait_until(lambda: store.get("VirtualMachineInstance", "vmi-pvc", NS) is None)
    assert wait_until(lambda: not [p for p in pods(store) if not p["metadata"].get("deletionTimestamp")])
