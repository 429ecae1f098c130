"""The tick VM and its migrations in cluster mode, on the Kubernetes API server TEST DOUBLE:
the VM on a Block claim made beforehand and bound (as the CSI sidecars would), the
controller's loop in-process, and the migrations' objects as a user applies them."""

from __future__ import annotations

import yaml

from controlplane.context import Cluster, Context
from controlplane.control_loop import ControlLoop
from controlplane.kube_store import USER_AGENT
from pvlun.controllers import CLUSTER_SELECTORS, CLUSTER_WATCHED, cluster_reconcilers
from virt.guest_images import tick_vm_manifest

NS = "vms"
IMAGE = "localhost/pvlun:0.1.0"
VMIM = "VirtualMachineInstanceMigration"
CONTROLLER_AGENT = f"{USER_AGENT} (the controller under test)"  # its calls told apart from the test's


def start_controller(make_store, **services) -> tuple[Context, ControlLoop]:
    """`pvlun controller`'s loop on a store of its own (seeing only its own Pods, as the
    controller's does; ctx.store), its informers started, pods/exec through it."""
    store = make_store(selectors=CLUSTER_SELECTORS)
    store.client.user_agent = CONTROLLER_AGENT
    reconcilers = cluster_reconcilers()
    store.start(dict.fromkeys([kind for kind, _ in reconcilers] + list(CLUSTER_WATCHED)))
    migration_port = services.pop("migration_port", None)
    ctx = Context(store=store, csi=None, data_dir="", node_ids=[], services={"pod_exec": store.exec, **services},
                  cluster=Cluster(image=IMAGE, namespace="pvlun-system", migration_port=migration_port))
    loop = ControlLoop(ctx, reconcilers, watched=CLUSTER_WATCHED)
    loop.start(workers=2)
    return ctx, loop


def stop_controller(ctx: Context, loop: ControlLoop) -> None:
    ctx.stopping.set()
    loop.join(5)
    ctx.jobs.join_all(5)


def apply_tick_vm(double, store, access: str = "ReadWriteMany", alone: bool = False) -> None:
    """The tick VM (runStrategy Always) booting from a bound Block claim `tick-root`; `alone`:
    its VMI applied by itself instead (no VM)."""
    vm = yaml.safe_load(tick_vm_manifest("tick", "http://images.example/tick.qcow2", access=access))
    vm["spec"].pop("dataVolumeTemplates")
    vm["metadata"]["namespace"] = NS
    volume = next(v for v in vm["spec"]["template"]["spec"]["volumes"] if "dataVolume" in v)
    volume["persistentVolumeClaim"] = {"claimName": volume.pop("dataVolume")["name"]}
    claim = store.apply({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                         "metadata": {"name": volume["persistentVolumeClaim"]["claimName"], "namespace": NS},
                         "spec": {"accessModes": [access], "volumeMode": "Block",
                                  "resources": {"requests": {"storage": "8Mi"}}}})
    code, body = double.call("PUT", f"/api/v1/namespaces/{NS}/persistentvolumeclaims/{claim['metadata']['name']}"
                             "/status", dict(claim, status={"phase": "Bound", "capacity": {"storage": "8Mi"}}))
    assert code == 200, body
    if alone:
        template = vm["spec"]["template"]
        vm = {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
              "metadata": {**vm["metadata"], **template.get("metadata", {})}, "spec": template["spec"]}
    store.apply(vm)


def running_vmi(store) -> dict | None:
    vmi = store.get("VirtualMachineInstance", "tick", NS) or {}
    return vmi if (vmi.get("status") or {}).get("phase") == "Running" else None


def migrate(store, name: str) -> dict:
    return store.apply({"apiVersion": "kubevirt.io/v1", "kind": VMIM, "metadata": {"name": name, "namespace": NS},
                        "spec": {"vmiName": "tick"}})


def status_of(store, kind: str, name: str) -> dict:
    return (store.get(kind, name, NS) or {}).get("status") or {}


def token_secret(double, mig: dict) -> tuple[int, dict]:
    """GET of the migration's token Secret, as the test (not the controller) may."""
    return double.call("GET", f"/api/v1/namespaces/{NS}/secrets/pvlun-migration-{mig['metadata']['uid']}")
