"""VirtualMachineInstanceReplicaSet on `pvlun serve` (TCG), shaped as KubeVirt's
vmi-replicaset-cirros.yaml: the tick guest as a containerDisk from a real registry (Debian's
docker-registry on loopback), VMIs named as the API server names a generateName of the
replica set, Running; scaled out and in (the newest go), a finished VMI replaced, paused;
deleted (its VMIs stop and go)."""

from __future__ import annotations

import re
import subprocess
import time

import pytest
import yaml
from container_registry import docker_config_secret, install_ca
from guest_output import MARKER
from test_container_disks import cirros_like, reg  # noqa: F401 - reg is a fixture

from virt.guest_images import build_tick_disk


@pytest.fixture(scope="module")
def image(reg, tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("images")
    tick = build_tick_disk(d / "tick.raw")
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(tick), str(d / "tick.qcow2")], check=True)
    return reg.push("vm/tick:v1", [{"disk/disk.qcow2": (d / "tick.qcow2").read_bytes()}])


@pytest.fixture(scope="module")
def node(serve, reg):
    inst = serve("--accel", "tcg")
    install_ca(inst.data_dir, reg)
    inst.apply(docker_config_secret("regcred", reg.host))
    return inst


def replica_set(name: str, image: str, replicas: int, paused: bool = False) -> str:
    """KubeVirt's examples/vmi-replicaset-cirros.yaml with our image and its pull secret (the
    VMI template of test_container_disks' vm-cirros shape)."""
    template = yaml.safe_load(cirros_like(name, image))["spec"]["template"]
    template["metadata"]["labels"] = {"kubevirt.io/vmReplicaSet": name}
    return yaml.safe_dump({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstanceReplicaSet",
                           "metadata": {"name": name},
                           "spec": {"replicas": replicas, "paused": paused,
                                    "selector": {"matchLabels": {"kubevirt.io/vmReplicaSet": name}},
                                    "template": template}})


def vmis_of(node, rs: str) -> list[dict]:
    return [v for v in node.store.list("VirtualMachineInstance")
            if any(r["kind"] == "VirtualMachineInstanceReplicaSet" and r["name"] == rs
                   for r in v["metadata"].get("ownerReferences") or [])]


def running(node, rs: str, count: int) -> list[dict]:
    """Wait for exactly `count` VMIs of the replica set, each Running with its guest booted."""
    def ready():
        vmis = vmis_of(node, rs)
        if len(vmis) != count or any((v.get("status") or {}).get("phase") != "Running" for v in vmis):
            return None
        return vmis if all(MARKER in node.all_serial_logs(v["metadata"]["name"]) for v in vmis) else None
    return node.wait(ready, 90, f"{count} VMIs of {rs} Running and booted")


def rs_status(node, name: str) -> dict:
    return (node.get("VirtualMachineInstanceReplicaSet", name) or {}).get("status") or {}


def test_a_replica_set_runs_its_vmis_scales_replaces_and_goes(node, image):
    out = node.apply(replica_set("cirros", image, 2), "--wait", "--timeout", "90")
    assert "virtualmachineinstancereplicaset/cirros created" in out.stdout
    assert "virtualmachineinstancereplicaset/cirros 2/2 ready" in out.stdout
    first = running(node, "cirros", 2)
    rs = node.get("VirtualMachineInstanceReplicaSet", "cirros")
    for vmi in first:
        assert re.fullmatch(r"cirros[bcdfghjklmnpqrstvwxz2456789]{5}", vmi["metadata"]["name"])
        assert vmi["metadata"]["labels"] == {"kubevirt.io/vmReplicaSet": "cirros"}
        (ref,) = vmi["metadata"]["ownerReferences"]
        assert (ref["kind"], ref["uid"], ref["controller"]) == ("VirtualMachineInstanceReplicaSet",
                                                                 rs["metadata"]["uid"], True)
    status = node.wait(lambda: rs_status(node, "cirros").get("readyReplicas") == 2 and rs_status(node, "cirros"),
                       30, "2 ready")
    assert status["replicas"] == 2 and status["labelSelector"] == "kubevirt.io/vmReplicaSet=cirros"
    assert re.search(r"cirros\s+2\s+2\s+2", node.cli("get", "vmirs").stdout)
    assert "Started the virtual machine by creating the new virtual machine instance" in \
        node.cli("describe", "vmirss", "cirros").stdout

    time.sleep(1.1)  # creationTimestamp counts seconds: the third VMI is the newest
    node.apply(replica_set("cirros", image, 3))
    third = next(v for v in running(node, "cirros", 3) if v["metadata"]["uid"] not in
                 {f["metadata"]["uid"] for f in first})
    node.apply(replica_set("cirros", image, 2))  # scale in: the newest goes (all are Running)
    left = node.wait(lambda: (lambda vs: vs if len(vs) == 2 else None)(vmis_of(node, "cirros")), 60, "back to 2")
    assert third["metadata"]["uid"] not in {v["metadata"]["uid"] for v in left}
    assert {v["metadata"]["uid"] for v in left} == {f["metadata"]["uid"] for f in first}

    victim = left[0]["metadata"]["name"]  # its guest ends: a Succeeded VMI is deleted and replaced
    node.store.merge_status("VirtualMachineInstance", victim, "default", phase="Succeeded")
    node.wait(lambda: node.get("VirtualMachineInstance", victim) is None, 60, f"finished {victim} deleted")
    running(node, "cirros", 2)

    node.cli("delete", "vmirs", "cirros")
    node.wait(lambda: vmis_of(node, "cirros") == [], 60, "its VMIs gone")


def test_a_paused_replica_set_leaves_its_vmis_alone(node, image):
    node.apply(replica_set("held", image, 1))
    running(node, "held", 1)
    node.apply(replica_set("held", image, 3, paused=True))
    status = node.wait(lambda: rs_status(node, "held").get("conditions") and rs_status(node, "held"), 30, "paused")
    assert [(c["type"], c["reason"], c["message"]) for c in status["conditions"]] == \
        [("ReplicaPaused", "Paused", "Controller got paused")]
    assert len(vmis_of(node, "held")) == 1 and status["replicas"] == 1
    node.apply(replica_set("held", image, 2))
    running(node, "held", 2)
    assert "conditions" not in rs_status(node, "held")
    node.cli("delete", "vmirs", "held")
    node.wait(lambda: vmis_of(node, "held") == [], 60, "its VMIs gone")


def test_a_replica_set_whose_vmis_cannot_start_backs_off_instead_of_churning(node):
    """The hostile review's case: an image no registry serves. Its VMIs fail at once; the
    replica set waits 5 s, 10 s, ... before making new ones (it made hundreds in 10 s)."""
    start = time.monotonic()
    node.apply(replica_set("churn", "127.0.0.1:1/nothing/here:1", 2))
    failure = node.wait(lambda: next((c for c in rs_status(node, "churn").get("conditions") or []
                                      if c["type"] == "ReplicaFailure"), None), 30, "ReplicaFailure")
    assert failure["reason"] == "FailedCreate" and "VMIs in a row finished before all replicas ran" in \
        failure["message"]
    time.sleep(max(0.0, 10 - (time.monotonic() - start)))
    rs = node.get("VirtualMachineInstanceReplicaSet", "churn")
    created = [e for e in node.store.events(rs) if e.get("reason") == "SuccessfulCreate"]
    assert 2 <= len(created) <= 6, len(created)
    node.cli("delete", "vmirs", "churn")
    node.wait(lambda: vmis_of(node, "churn") == [], 60, "its VMIs gone")


def test_a_pool_shaped_as_kubevirts_vm_pool_cirros_runs_its_container_disk_vms(node, image):
    """examples/vm-pool-cirros.yaml's shape (pool.kubevirt.io/v1alpha1, `creationTimestamp: null`, a
    containerDisk VM): every VM boots from its own overlay of the one cached image."""
    vm = yaml.safe_load(cirros_like("vm-pool-cirros", image))
    labels = {"kubevirt.io/vmpool": "vm-pool-cirros"}
    vm["spec"]["template"]["metadata"] = {"creationTimestamp": None, "labels": labels}
    pool = {"apiVersion": "pool.kubevirt.io/v1alpha1", "kind": "VirtualMachinePool",
            "metadata": {"name": "vm-pool-cirros"},
            "spec": {"replicas": 2, "selector": {"matchLabels": labels},
                     "virtualMachineTemplate": {"metadata": {"creationTimestamp": None, "labels": labels},
                                                "spec": vm["spec"]}}}
    out = node.apply(yaml.safe_dump(pool), "--wait", "--timeout", "90")
    assert "virtualmachinepool/vm-pool-cirros 2/2 ready" in out.stdout
    for name in ("vm-pool-cirros-0", "vm-pool-cirros-1"):
        node.wait(lambda: MARKER in node.all_serial_logs(name), 30, f"{name}'s marker")
    node.cli("delete", "vmpool", "vm-pool-cirros")
    node.wait(lambda: not [v for v in node.store.list("VirtualMachine") if v["metadata"]["name"].startswith("vm-pool")],
              60, "its VMs gone")
