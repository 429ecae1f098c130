"""VirtualMachinePool on `pvlun serve` (TCG): a pool of the tick guest whose VMs each get a
DataVolume of their own from the template's dataVolumeTemplates and boot; scaled out and in
(which VMs go, and their DataVolumes with them); its template changed (the VMs updated in
place, the running one restarted on the new template); deleted (its VMs and DataVolumes go)."""

from __future__ import annotations

import re

import pytest
import yaml
from guest_output import MARKER

from controlplane.replica_specs import REVISION_LABEL
from virt.guest_images import tick_vm_manifest


@pytest.fixture(scope="module")
def node(serve):
    return serve("--accel", "tcg")


def pool_yaml(name: str, url: str, replicas: int, memory: str = "64Mi", extra_label: str = "") -> str:
    """KubeVirt's vm-pool shape (pool.kubevirt.io/v1beta1) around the tick VM, which has a
    dataVolumeTemplate; the highest index goes first on scale-in."""
    vm = yaml.safe_load(tick_vm_manifest("tick", url, access="ReadWriteOnce", memory=memory))
    vm["spec"]["dataVolumeTemplates"][0]["metadata"]["name"] = "disk"
    vm["spec"]["template"]["spec"]["volumes"][0]["dataVolume"]["name"] = "disk"
    labels = {"kubevirt.io/vmpool": name, **({"extra": extra_label} if extra_label else {})}
    vm["spec"]["template"]["metadata"]["labels"] = labels
    return yaml.safe_dump({
        "apiVersion": "pool.kubevirt.io/v1beta1", "kind": "VirtualMachinePool", "metadata": {"name": name},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"kubevirt.io/vmpool": name}},
                 "scaleInStrategy": {"proactive": {"selectionPolicy": {"sortPolicy": "DescendingOrder"}}},
                 "virtualMachineTemplate": {"metadata": {"labels": labels}, "spec": vm["spec"]}}})


def vms_of(node, pool: str) -> list[str]:
    return sorted(vm["metadata"]["name"] for vm in node.store.list("VirtualMachine")
                  if any(r.get("kind") == "VirtualMachinePool" and r["name"] == pool
                         for r in vm["metadata"].get("ownerReferences") or []))


def booted(node, vm: str) -> None:
    node.wait_printable(vm, "Running", 90)
    node.wait(lambda: MARKER in node.all_serial_logs(vm), 60, f"{vm}'s marker")


def pool_status(node, name: str) -> dict:
    return (node.get("VirtualMachinePool", name) or {}).get("status") or {}


def test_a_pool_makes_indexed_vms_with_their_own_data_volumes_scales_and_goes(node, tick_image):
    out = node.apply(pool_yaml("web", tick_image, 2))
    assert "virtualmachinepool/web created" in out.stdout
    node.wait(lambda: vms_of(node, "web") == ["web-0", "web-1"], 30, "two VMs")
    pool = node.get("VirtualMachinePool", "web")
    for i in (0, 1):
        vm = node.get("VirtualMachine", f"web-{i}")
        (ref,) = vm["metadata"]["ownerReferences"]
        assert (ref["kind"], ref["name"], ref["uid"], ref["controller"]) == \
            ("VirtualMachinePool", "web", pool["metadata"]["uid"], True)
        assert vm["metadata"]["labels"] == {"kubevirt.io/vmpool": "web", REVISION_LABEL: "web-1"}
        assert vm["spec"]["dataVolumeTemplates"][0]["metadata"]["name"] == f"disk-{i}"
        assert vm["spec"]["template"]["spec"]["volumes"][0]["dataVolume"]["name"] == f"disk-{i}"
        booted(node, f"web-{i}")
        dv = node.get("DataVolume", f"disk-{i}")
        assert dv["metadata"]["ownerReferences"][0]["name"] == f"web-{i}" and dv["status"]["phase"] == "Succeeded"
    status = node.wait(lambda: pool_status(node, "web").get("readyReplicas") == 2 and pool_status(node, "web"), 30,
                       "2 ready replicas")
    assert status["replicas"] == 2 and status["labelSelector"] == "kubevirt.io/vmpool=web"
    assert "conditions" not in status
    assert re.search(r"web\s+2\s+2\s+2", node.cli("get", "vmpool").stdout)
    described = node.cli("describe", "vmpools", "web").stdout
    assert "SuccessfulCreate" in described and "Created VM default/web-1" in described

    out = node.apply(pool_yaml("web", tick_image, 3), "--wait", "--timeout", "90")  # scale out: the next index
    assert "virtualmachinepool/web 3/3 ready" in out.stdout
    assert vms_of(node, "web") == ["web-0", "web-1", "web-2"]
    booted(node, "web-2")
    node.apply(pool_yaml("web", tick_image, 1))  # scale in: the highest indexes go (DescendingOrder)
    node.wait(lambda: vms_of(node, "web") == ["web-0"], 60, "web-1 and web-2 gone")
    node.wait(lambda: node.get("DataVolume", "disk-1") is None and node.get("DataVolume", "disk-2") is None, 60,
              "their DataVolumes gone")
    assert node.get("DataVolume", "disk-0") is not None and node.printable("web-0") == "Running"
    node.wait(lambda: pool_status(node, "web").get("replicas") == 1, 30, "status: 1 replica")

    node.cli("delete", "vmpool", "web")
    node.wait(lambda: vms_of(node, "web") == [] and node.get("VirtualMachine", "web-0") is None, 60, "web-0 gone")
    node.wait(lambda: node.get("DataVolume", "disk-0") is None, 60, "disk-0 gone")
    assert not [r for r in node.store.list("ControllerRevision") if r["metadata"]["name"].startswith("web-")]


def test_a_template_change_updates_the_vms_and_restarts_the_running_one(node, tick_image):
    node.apply(pool_yaml("upd", tick_image, 1).replace("disk", "updisk"))
    booted(node, "upd-0")
    first = node.get("VirtualMachineInstance", "upd-0")
    assert first["metadata"]["labels"][REVISION_LABEL] == "upd-1"

    node.apply(pool_yaml("upd", tick_image, 1, memory="80Mi", extra_label="two").replace("disk", "updisk"))
    vm = node.wait(lambda: (lambda v: v if v["metadata"]["labels"].get(REVISION_LABEL) == "upd-2" else None)(
        node.get("VirtualMachine", "upd-0")), 30, "upd-0 updated in place")
    assert vm["metadata"]["uid"] == first["metadata"]["ownerReferences"][0]["uid"]  # the same VM
    assert vm["spec"]["template"]["spec"]["domain"]["memory"]["guest"] == "80Mi"
    assert vm["metadata"]["labels"]["extra"] == "two"
    vmi = node.wait(lambda: (lambda v: v if v and (v["metadata"].get("labels") or {}).get(REVISION_LABEL) == "upd-2"
                             and (v.get("status") or {}).get("phase") == "Running" else None)(
        node.get("VirtualMachineInstance", "upd-0")), 90, "the VMI restarted on the new template")
    assert vmi["spec"]["domain"]["memory"]["guest"] == "80Mi"
    assert "Restarting VM default/upd-0 with its updated template" in node.cli("describe", "vmpool", "upd").stdout
    revisions = [r["metadata"]["name"] for r in node.store.list("ControllerRevision")
                 if r["metadata"]["name"].startswith("upd-")]
    node.wait(lambda: [r["metadata"]["name"] for r in node.store.list("ControllerRevision")
                       if r["metadata"]["name"].startswith("upd-")] == ["upd-2"], 30, f"upd-1 pruned ({revisions})")
    node.cli("delete", "vmpool", "upd")
    node.wait(lambda: node.get("VirtualMachine", "upd-0") is None and node.get("DataVolume", "updisk-0") is None,
              60, "upd-0 and its disk gone")


def test_a_paused_pool_makes_nothing_and_says_so(node, tick_image):
    manifest = pool_yaml("still", tick_image, 2).replace("  replicas: 2", "  paused: true\n  replicas: 2")
    node.apply(manifest)
    status = node.wait(lambda: pool_status(node, "still").get("conditions") and pool_status(node, "still"), 30,
                       "ReplicaPaused")
    assert [(c["type"], c["status"], c["reason"]) for c in status["conditions"]] == \
        [("ReplicaPaused", "True", "SuccessfulPaused")]
    assert vms_of(node, "still") == [] and status["replicas"] == 0
    changed = node.apply(manifest.replace("kubevirt.io/vmpool: still", "kubevirt.io/vmpool: moved"), check=False)
    assert changed.returncode == 1  # KubeVirt's webhook: the selector stays
    assert "spec.selector.matchLabels" in changed.stderr and "selector is immutable after creation" in changed.stderr
    node.cli("delete", "vmpool", "still")
