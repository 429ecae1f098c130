"""VirtualMachinePool and VirtualMachineInstanceReplicaSet in cluster mode, on the Kubernetes
API server TEST DOUBLE (tests/kube_api_double.py; no API server can run here): the same
reconcile functions on a KubeStore make the pool's VMs (and, through the VM controller, their
DataVolumes) and the replica set's VMIs (and their launcher Pods), report status, and scale
in; and `pvlun controller` as a process does all that within deploy/full's RBAC."""

from __future__ import annotations

import yaml

from controlplane.replica_specs import REVISION_LABEL
from test_controller_cluster import NS, cluster, pods, set_claim_bound, wait_until  # noqa: F401 - a fixture
from test_controller_rbac import controller_calls, denied, get, leading_controller
from virt.guest_images import tick_vm_manifest


def pool(replicas: int) -> dict:
    vm = yaml.safe_load(tick_vm_manifest("t", "http://images.example/tick.qcow2"))
    vm["spec"]["dataVolumeTemplates"][0]["metadata"]["name"] = "disk"
    vm["spec"]["template"]["spec"]["volumes"][0]["dataVolume"]["name"] = "disk"
    labels = {"kubevirt.io/vmpool": "pool"}
    vm["spec"]["template"]["metadata"]["labels"] = labels
    return {"apiVersion": "pool.kubevirt.io/v1beta1", "kind": "VirtualMachinePool",
            "metadata": {"name": "pool", "namespace": NS},
            "spec": {"replicas": replicas, "selector": {"matchLabels": labels},
                     "scaleInStrategy": {"proactive": {"selectionPolicy": {"sortPolicy": "DescendingOrder"}}},
                     "virtualMachineTemplate": {"metadata": {"labels": labels}, "spec": vm["spec"]}}}


def replica_set(replicas: int) -> dict:
    labels = {"kubevirt.io/vmReplicaSet": "rs"}
    return {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstanceReplicaSet",
            "metadata": {"name": "rs", "namespace": NS},
            "spec": {"replicas": replicas, "selector": {"matchLabels": labels},
                     "template": {"metadata": {"labels": labels}, "spec": {
                         "domain": {"devices": {"disks": [{"name": "d", "disk": {"bus": "virtio"}}],
                                                "autoattachPodInterface": False},
                                    "resources": {"requests": {"memory": "64Mi"}}},
                         "volumes": [{"name": "d", "persistentVolumeClaim": {"claimName": "shared"}}]}}}}


def owned(store, kind: str, owner: str) -> list[dict]:
    return sorted((o for o in store.list(kind, NS) if any(r["name"] == owner for r in
                                                            o["metadata"].get("ownerReferences") or [])),
                  key=lambda o: o["metadata"]["name"])


def live(objs: list[dict]) -> list[str]:
    return [o["metadata"]["name"] for o in objs if not o["metadata"].get("deletionTimestamp")]


def test_a_pool_makes_its_vms_and_their_data_volumes_on_a_cluster_and_scales_in(cluster):
    store = cluster
    store.apply(pool(2))
    vms = wait_until(lambda: (lambda v: v if live(v) == ["pool-0", "pool-1"] else None)(owned(store, "VirtualMachine",
                                                                                            "pool")))
    uid = store.get("VirtualMachinePool", "pool", NS)["metadata"]["uid"]
    for i, vm in enumerate(vms):
        ref = vm["metadata"]["ownerReferences"][0]
        assert (ref["kind"], ref["uid"], ref["controller"], ref["blockOwnerDeletion"]) == \
            ("VirtualMachinePool", uid, True, True)
        assert vm["metadata"]["labels"][REVISION_LABEL] == "pool-1"
        dv = wait_until(lambda: store.get("DataVolume", f"disk-{i}", NS))  # the VM controller's, per VM
        assert dv["metadata"]["ownerReferences"][0]["name"] == f"pool-{i}"
    status = wait_until(lambda: (store.get("VirtualMachinePool", "pool", NS).get("status") or {}).get("replicas") == 2
                        and store.get("VirtualMachinePool", "pool", NS)["status"])
    assert status["labelSelector"] == "kubevirt.io/vmpool=pool" and status["readyReplicas"] == 0
    assert store.get("ControllerRevision", "pool-1", NS)["data"]["replicas"] == 2

    store.apply(pool(1))
    assert wait_until(lambda: live(owned(store, "VirtualMachine", "pool")) == ["pool-0"])
    assert wait_until(lambda: (store.get("VirtualMachinePool", "pool", NS).get("status") or {}).get("replicas") == 1)


def test_a_pool_skips_the_names_other_vms_hold(cluster):
    store = cluster
    other = yaml.safe_load(tick_vm_manifest("pool-0", "http://images.example/tick.qcow2", strategy="Halted"))
    other["metadata"]["namespace"] = NS
    store.apply(other)  # a user's VM of the name the pool's first would get
    store.apply(pool(1))
    assert wait_until(lambda: live(owned(store, "VirtualMachine", "pool")) == ["pool-1"])
    assert not store.get("VirtualMachine", "pool-0", NS)["metadata"].get("ownerReferences")


def test_a_replica_set_makes_its_vmis_and_their_launcher_pods_on_a_cluster(cluster, kube_api_double):
    store = cluster
    store.apply({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "shared", "namespace": NS},
                 "spec": {"accessModes": ["ReadWriteMany"], "volumeMode": "Block",
                          "resources": {"requests": {"storage": "8Mi"}}}})
    set_claim_bound(kube_api_double, store, "shared")
    store.apply(replica_set(2))
    vmis = wait_until(lambda: (lambda v: v if len(live(v)) == 2 else None)(
        owned(store, "VirtualMachineInstance", "rs")))
    for vmi in vmis:
        assert vmi["metadata"]["name"].startswith("rs") and len(vmi["metadata"]["name"]) == 7
        assert vmi["metadata"]["ownerReferences"][0]["kind"] == "VirtualMachineInstanceReplicaSet"
    launchers = wait_until(lambda: (lambda p: p if len(p) == 2 else None)(
        [p for p in pods(store) if p["metadata"]["ownerReferences"][0]["kind"] == "VirtualMachineInstance"]))
    assert sorted(p["metadata"]["ownerReferences"][0]["name"] for p in launchers) == live(vmis)
    status = wait_until(lambda: (store.get("VirtualMachineInstanceReplicaSet", "rs", NS).get("status") or {})
                        .get("replicas") == 2 and store.get("VirtualMachineInstanceReplicaSet", "rs", NS)["status"])
    assert status["labelSelector"] == "kubevirt.io/vmReplicaSet=rs"
    store.apply(replica_set(1))
    assert wait_until(lambda: len(live(owned(store, "VirtualMachineInstance", "rs"))) == 1)
    assert wait_until(lambda: (store.get("VirtualMachineInstanceReplicaSet", "rs", NS).get("status") or {})
                      .get("replicas") == 1)


def test_pvlun_controller_runs_pools_and_replica_sets_within_its_rbac(kube_api_double, kube_kubeconfig, tmp_path):
    double = kube_api_double
    with leading_controller(double, kube_kubeconfig, tmp_path):
        assert double.call("POST", f"/apis/pool.kubevirt.io/v1beta1/namespaces/{NS}/virtualmachinepools",
                           pool(1))[0] == 201
        assert double.call("POST", f"/apis/kubevirt.io/v1/namespaces/{NS}/virtualmachineinstancereplicasets",
                           replica_set(1))[0] == 201
        assert wait_until(lambda: get(double, f"/apis/kubevirt.io/v1/namespaces/{NS}/virtualmachines/pool-0"), 15)
        assert wait_until(lambda: (get(double, f"/apis/pool.kubevirt.io/v1beta1/namespaces/{NS}/virtualmachinepools/"
                                               "pool").get("status") or {}).get("replicas") == 1, 15)
        assert wait_until(lambda: (get(double, f"/apis/kubevirt.io/v1/namespaces/{NS}/"
                                               "virtualmachineinstancereplicasets/rs").get("status") or {})
                          .get("replicas") == 1, 15)
        pool_path = f"/apis/pool.kubevirt.io/v1beta1/namespaces/{NS}/virtualmachinepools/pool"
        assert double.call("PATCH", pool_path, {"spec": {"replicas": 0}}, "application/merge-patch+json")[0] == 200
        assert wait_until(lambda: (get(double, f"/apis/kubevirt.io/v1/namespaces/{NS}/virtualmachines/pool-0")
                                   .get("metadata") or {}).get("deletionTimestamp")
                          or not get(double, f"/apis/kubevirt.io/v1/namespaces/{NS}/virtualmachines/pool-0"), 15)
    calls = controller_calls(double)
    for call in (("kubevirt.io", "virtualmachines", "create", NS), ("kubevirt.io", "virtualmachines", "delete", NS),
                 ("kubevirt.io", "virtualmachineinstances", "create", NS),
                 ("pool.kubevirt.io", "virtualmachinepools/status", "update", NS),
                 ("kubevirt.io", "virtualmachineinstancereplicasets/status", "update", NS),
                 ("apps", "controllerrevisions", "create", NS)):
        assert call in calls, call
    assert denied(calls) == []
