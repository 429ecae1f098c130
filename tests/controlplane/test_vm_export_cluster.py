"""On a cluster (the Kubernetes API server TEST DOUBLE, tests/kube_api_double.py: no API server
runs here) a VirtualMachineExport is not served yet: KubeVirt's exporter Pod and Service are
not built. The controller says so in the export's Ready condition and leaves it Pending,
creating nothing."""

from __future__ import annotations

from controlplane.context import Cluster, Context
from controlplane.control_loop import ControlLoop
from importer.vm_export import CLUSTER_MESSAGE
from kube_fixtures import wait_until
from pvlun.controllers import CLUSTER_SELECTORS, CLUSTER_WATCHED, cluster_reconcilers

NS = "exports"


def test_an_export_on_a_cluster_stays_pending_saying_the_exporter_is_not_built(kube_api_double, make_kube_store):
    store = make_kube_store(selectors=CLUSTER_SELECTORS)
    reconcilers = cluster_reconcilers()
    store.start(dict.fromkeys([kind for kind, _ in reconcilers] + list(CLUSTER_WATCHED)))
    ctx = Context(store=store, csi=None, data_dir="", node_ids=[],
                  cluster=Cluster(image="localhost/pvlun:0.1.0", namespace="pvlun-system"))
    loop = ControlLoop(ctx, reconcilers, watched=CLUSTER_WATCHED)
    loop.start(workers=1)
    try:
        user = make_kube_store()
        user.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
        user.apply({"apiVersion": "export.kubevirt.io/v1beta1", "kind": "VirtualMachineExport",
                    "metadata": {"name": "disk", "namespace": NS},
                    "spec": {"source": {"apiGroup": "", "kind": "PersistentVolumeClaim", "name": "disk"},
                             "ttlDuration": "1h"}})

        def pending() -> dict | None:
            status = (user.get("VirtualMachineExport", "disk", NS) or {}).get("status") or {}
            return status if status.get("phase") == "Pending" else None

        status = wait_until(pending, 10)
        ready = next(c for c in status["conditions"] if c["type"] == "Ready")
        assert (ready["status"], ready["reason"], ready["message"]) == ("False", "NotSupported", CLUSTER_MESSAGE)
        assert status["ttlExpirationTime"] and "links" not in status
        assert user.list("Secret", NS) == [] and user.list("Pod", NS) == [] and user.list("Service", NS) == []
        assert not (user.get("VirtualMachineExport", "disk", NS)["metadata"].get("finalizers"))
    finally:
        ctx.stopping.set()
        loop.join(5)
