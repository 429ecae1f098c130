"""Cluster mode (on the Kubernetes API server TEST DOUBLE, tests/kube_api_double.py): a
DataVolume whose StorageClass does not exist yet waits Pending, without an importer Pod, and
goes on once the class is there; a clone with `storage: {}` gets a claim of its source's size
and volume mode (the API server refuses a claim without a size)."""

from __future__ import annotations

import time

from kube_fixtures import wait_until
from test_controller_cluster import NS, cdi_http_datavolume, cluster, dv_status  # noqa: F401  (cluster: a fixture)


def test_a_datavolume_waits_for_its_storage_class_without_an_importer_pod(cluster, kube_api_double):  # noqa: F811
    store = cluster
    dv = cdi_http_datavolume("waits", "http://images.example/fedora.qcow2")
    dv["spec"]["storage"]["storageClassName"] = "fast-later"
    store.apply(dv)
    assert wait_until(lambda: dv_status(store, "waits").get("phase") == "Pending"
                      and any(c["type"] == "Bound" for c in dv_status(store, "waits").get("conditions", [])))
    time.sleep(1)
    bound = next(c for c in dv_status(store, "waits")["conditions"] if c["type"] == "Bound")
    assert dv_status(store, "waits")["phase"] == "Pending" and "StorageClass fast-later" in bound["message"]
    assert store.get("PersistentVolumeClaim", "waits", NS) is not None  # Kubernetes keeps it Pending
    assert store.get("Pod", "importer-waits", NS) is None
    store.apply({"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass", "metadata": {"name": "fast-later"},
                 "provisioner": "csi.pvlun.dev", "volumeBindingMode": "WaitForFirstConsumer"})
    # nothing announces a new class to the controller: it looks again every CLASS_RECHECK_SECONDS
    assert wait_until(lambda: store.get("Pod", "importer-waits", NS), timeout=20)
    # the Pod is made first, the DataVolume's phase written next: a read may fall in between
    assert wait_until(lambda: dv_status(store, "waits")["phase"] == "ImportScheduled", timeout=10)


def test_a_clone_with_empty_storage_claims_its_sources_size_and_volume_mode(cluster, kube_api_double):  # noqa: F811
    store = cluster
    golden = store.apply({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "golden", "namespace": NS},
                          "spec": {"accessModes": ["ReadWriteOnce"], "volumeMode": "Block",
                                   "resources": {"requests": {"storage": "40Mi"}}}})
    code, answer = kube_api_double.call("PUT", f"/api/v1/namespaces/{NS}/persistentvolumeclaims/golden/status",
                                        dict(golden, status={"phase": "Bound", "capacity": {"storage": "40Mi"}}))
    assert code == 200, answer
    store.apply({"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume", "metadata": {"name": "copy", "namespace": NS},
                 "spec": {"source": {"pvc": {"name": "golden"}}, "storage": {}}})
    claim = wait_until(lambda: store.get("PersistentVolumeClaim", "copy", NS))
    assert claim["spec"]["volumeMode"] == "Block"
    assert claim["spec"]["resources"]["requests"]["storage"] == str(40 << 20)
    assert claim["spec"]["dataSource"]["kind"] == "PersistentVolumeClaim" and claim["spec"]["dataSource"]["name"] == "golden"
