"""CDI's golden-image kinds in cluster mode, on the Kubernetes API server TEST DOUBLE
(tests/kube_api_double.py; no API server can run here): the same reconcile functions as
embedded mode keep a StorageProfile per StorageClass of the driver, a DataSource's Ready, and
turn a DataVolume's sourceRef into a clone claim with the profile's modes."""

from __future__ import annotations

from kube_fixtures import wait_until
from test_controller_cluster import NS, cluster, dv_status, set_claim_bound  # noqa: F401  (cluster: a fixture)


def test_profiles_data_sources_and_source_refs_on_a_cluster(cluster, kube_api_double):
    store = cluster
    store.apply({"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass", "metadata": {"name": "golden-sc"},
                 "provisioner": "csi.pvlun.dev"})
    profile = wait_until(lambda: (store.get("StorageProfile", "golden-sc", "") or {}).get("status"))
    assert profile["cloneStrategy"] == "csi-clone" and profile["provisioner"] == "csi.pvlun.dev"
    store.apply({"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataSource",
                 "metadata": {"name": "fedora", "namespace": NS},
                 "spec": {"source": {"pvc": {"name": "golden", "namespace": NS}}}})

    def ready() -> tuple:
        cond = next((c for c in ((store.get("DataSource", "fedora", NS) or {}).get("status") or {})
                     .get("conditions", []) if c["type"] == "Ready"), {})
        return cond.get("status"), cond.get("reason")

    assert wait_until(lambda: ready() == ("False", "NotFound"))
    store.apply({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "golden", "namespace": NS},
                 "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "golden-sc",
                          "resources": {"requests": {"storage": "8Mi"}}}})
    set_claim_bound(kube_api_double, store, "golden")
    assert wait_until(lambda: ready() == ("True", "Ready"))
    store.apply({"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
                 "metadata": {"name": "from-golden", "namespace": NS},
                 "spec": {"sourceRef": {"kind": "DataSource", "name": "fedora"},
                          "storage": {"storageClassName": "golden-sc", "resources": {"requests": {"storage": "8Mi"}}}}})
    claim = wait_until(lambda: store.get("PersistentVolumeClaim", "from-golden", NS))
    assert claim["spec"]["dataSource"]["name"] == "golden"
    assert (claim["spec"]["accessModes"], claim["spec"]["volumeMode"]) == (["ReadWriteOnce"], "Filesystem")
    assert dv_status(store, "from-golden").get("phase") != "Failed"
