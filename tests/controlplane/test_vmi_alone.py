"""A VirtualMachineInstance applied alone, as KubeVirt's examples/vmi-*.yaml are (no
VirtualMachine): `pvlun serve` (2 nodes, TCG) runs the tick guest from a claim a DataVolume
filled; its lifecycle is KubeVirt's (it ends Succeeded/Failed and stays so), its spec is
fixed, `pvlun vm` pauses and migrates it, deleting it stops it and detaches its volumes,
and a daemon restart starts it again."""

from __future__ import annotations

import os
import re
import signal
import time

import pytest
from guest_output import MARKER, alive, ticks


@pytest.fixture(scope="module")
def node(serve):
    return serve("--nodes", "2", "--accel", "tcg")


def disk(inst, name: str, url: str) -> None:
    """A ReadWriteMany Block claim the tick guest's image was imported into (a DataVolume)."""
    inst.apply(f"""apiVersion: cdi.kubevirt.io/v1beta1
kind: DataVolume
metadata: {{name: {name}}}
spec:
  source: {{http: {{url: "{url}"}}}}
  storage: {{volumeMode: Block, accessModes: [ReadWriteMany], resources: {{requests: {{storage: 8Mi}}}}}}
""", "--wait")


def vmi_pvc(name: str, claim: str, memory: str = "64Mi", extra_disks: str = "", extra_volumes: str = "",
            extra_spec: str = "") -> str:
    """Shaped as KubeVirt's examples/vmi-pvc.yaml (our own manifest, the same fields)."""
    return f"""---
apiVersion: kubevirt.io/v1
kind: VirtualMachineInstance
metadata:
  labels:
    special: {name}
  name: {name}
spec:
  domain:
    cpu:
      cores: 1
      sockets: 1
      threads: 1
    devices:
      autoattachPodInterface: false
      disks:
      - disk:
          bus: virtio
        name: pvcdisk
{extra_disks}    memory:
      guest: {memory}
    resources:
      requests:
        memory: {memory}
  terminationGracePeriodSeconds: 1
{extra_spec}  volumes:
  - name: pvcdisk
    persistentVolumeClaim:
      claimName: {claim}
{extra_volumes}"""


def phase(inst, name: str) -> str:
    return inst.vmi_status(name).get("phase", "")


def running(inst, name: str, timeout: float = 60) -> dict:
    """Wait until the VMI is Running and its guest printed the marker; its status."""
    inst.wait(lambda: phase(inst, name) == "Running", timeout, f"VMI {name} Running ({inst.vmi_status(name)})")
    inst.wait(lambda: MARKER in inst.all_serial_logs(name), 30, f"{name}'s marker")
    return inst.vmi_status(name)


def test_a_vmi_alone_runs_from_its_claim_and_deleting_it_stops_it_and_detaches(node, tick_image):
    disk(node, "disk-alone", tick_image)
    out = node.apply(vmi_pvc("alone", "disk-alone"), "--wait", "--timeout", "60")
    assert "virtualmachineinstance/alone created" in out.stdout and "virtualmachineinstance/alone Running" in out.stdout
    status = running(node, "alone")
    assert status["nodeName"] in node.nodes()
    assert {c["type"]: c["status"] for c in status["conditions"]}["Ready"] == "True"
    status = node.wait(lambda: node.vmi_status("alone").get("volumeStatus") and node.vmi_status("alone"), 15,
                       "volumeStatus")
    assert [(v["name"], v["target"]) for v in status["volumeStatus"]] == [("pvcdisk", "vda")]
    (attachment,) = node.attachments("alone")  # the VMI holds its volume itself: no VM
    assert attachment["spec"]["nodeName"] == status["nodeName"] and attachment["status"]["attached"] is True
    assert node.get("VirtualMachine", "alone") is None
    assert re.search(r"alone\s+Running\s+" + re.escape(status["nodeName"]), node.cli("get", "vmi").stdout)
    text = node.wait(lambda: "tick 2" in node.cli("logs", "vmi/alone").stdout and node.cli("logs", "vmi/alone").stdout,
                     20, "ticks in pvlun logs vmi/alone")
    assert ticks(text)[:2] == [1, 2]
    pid, before = status["launcher"]["pid"], node.get("VirtualMachineInstance", "alone")

    assert node.cli("delete", "vmi", "alone").stdout.strip() == 'virtualmachineinstance "alone" deleted'
    node.wait(lambda: node.get("VirtualMachineInstance", "alone") is None, 30, "the VMI gone")
    assert not alive(pid)
    assert "Stopped" in [e["reason"] for e in node.store.events(before)]  # its guest ended Succeeded first
    assert node.attachments("alone") == []
    assert not os.path.exists(os.path.join(node.data_dir, "vms", "default", "alone"))
    assert node.get("PersistentVolumeClaim", "disk-alone") is not None  # the claim is not the VMI's


def test_a_vmi_spec_cannot_change_but_its_labels_can(node, tick_image):
    disk(node, "disk-fixed", tick_image)
    node.apply(vmi_pvc("fixed", "disk-fixed"))
    running(node, "fixed")
    refused = node.apply(vmi_pvc("fixed", "disk-fixed", memory="96Mi"), check=False)
    assert refused.returncode == 1
    assert "spec.domain.memory.guest: update of VMI object is restricted" in refused.stderr, refused.stderr
    assert node.get("VirtualMachineInstance", "fixed")["spec"]["domain"]["memory"]["guest"] == "64Mi"
    node.apply(vmi_pvc("fixed", "disk-fixed"))  # the same spec again is no change ("unchanged" unless a
    relabelled = node.apply(vmi_pvc("fixed", "disk-fixed").replace("special: fixed", "special: other"))
    assert "configured" in relabelled.stdout  # status write came between the CLI's read and its apply)
    meta = node.get("VirtualMachineInstance", "fixed")["metadata"]
    assert meta["labels"] == {"special": "other"} and meta["generation"] == 1
    assert phase(node, "fixed") == "Running"
    node.cli("delete", "vmi", "fixed")
    node.wait(lambda: node.get("VirtualMachineInstance", "fixed") is None, 30, "the VMI gone")


def test_a_vmi_whose_qemu_dies_stays_failed_and_is_not_started_again(node, tick_image):
    disk(node, "disk-once", tick_image)
    node.apply(vmi_pvc("once", "disk-once"))
    pid = running(node, "once")["launcher"]["pid"]
    os.kill(pid, signal.SIGKILL)
    node.wait(lambda: phase(node, "once") == "Failed", 30, "the VMI Failed")
    waited = node.apply(vmi_pvc("once", "disk-once"), "--wait", "--timeout", "10", check=False)
    assert waited.returncode == 1 and "virtualmachineinstance/once Failed: QEMU exited" in waited.stderr
    node.wait(lambda: node.attachments("once") == [], 15, "its volume detached")
    time.sleep(3)  # no VM: nothing may start it again
    assert phase(node, "once") == "Failed" and node.all_serial_logs("once").count(MARKER) == 1
    refused = node.cli("vm", "stop", "vmi/once", check=False)
    assert refused.returncode == 1 and "pvlun delete vmi once" in refused.stderr
    node.cli("delete", "vmi", "once")
    node.wait(lambda: node.get("VirtualMachineInstance", "once") is None, 30, "the VMI gone")


def test_pvlun_vm_pauses_unpauses_and_migrates_a_vmi_alone(node, tick_image):
    disk(node, "disk-moved", tick_image)
    node.apply(vmi_pvc("moved", "disk-moved", extra_spec="  evictionStrategy: LiveMigrate\n"))
    source = running(node, "moved")["nodeName"]
    said = node.cli("describe", "vmi", "moved").stdout
    assert re.search(r"FieldIgnored\s+spec\.evictionStrategy", said), said  # kept, not run: said so
    assert "VMI moved is Paused" in node.cli("vm", "pause", "vmi/moved", "--wait", "--timeout", "30").stdout
    time.sleep(0.5)  # what was on its way to the log is there
    seen = ticks(node.all_serial_logs("moved"))
    time.sleep(2.5)
    assert ticks(node.all_serial_logs("moved")) == seen  # the guest is stopped
    assert "VMI moved is Running" in node.cli("vm", "unpause", "moved", "--wait", "--timeout", "30").stdout
    node.wait(lambda: len(ticks(node.all_serial_logs("moved"))) > len(seen), 15, "ticks again")
    said = node.cli("describe", "vmi", "moved").stdout
    assert "PauseRequested" in said and "UnpauseRequested" in said and "RequestNotSupported" not in said

    out = node.cli("vm", "migrate", "vmi/moved", "--wait", "--timeout", "120").stdout
    target = node.vmi_status("moved")["nodeName"]
    assert "migrated moved from" in out and target != source
    (attachment,) = node.attachments("moved")
    assert attachment["spec"]["nodeName"] == target
    count = len(ticks(node.all_serial_logs("moved")))
    node.wait(lambda: len(ticks(node.all_serial_logs("moved"))) > count, 15, "ticks on the target")
    assert node.all_serial_logs("moved").count(MARKER) == 1  # moved, not rebooted
    node.cli("delete", "vmi", "moved")
    node.wait(lambda: node.get("VirtualMachineInstance", "moved") is None, 30, "the VMI gone")
    assert node.attachments("moved") == []


def test_a_vmi_with_cloud_init_waits_for_its_claim_then_runs_with_its_seed(node, tick_image):
    cloud = """      - disk:
          bus: virtio
        name: cloudinitdisk
"""
    seed = """  - cloudInitNoCloud:
      userData: |
        #!/bin/sh

        echo 'printed from cloud-init userdata'
    name: cloudinitdisk
"""
    node.apply(vmi_pvc("seeded", "disk-later", extra_disks=cloud, extra_volumes=seed))
    waiting = node.wait(lambda: next((c for c in node.vmi_status("seeded").get("conditions") or []
                                      if c["type"] == "Synchronized" and c["status"] == "False"), None),
                        15, "Synchronized False")
    assert phase(node, "seeded") == "Pending" and "disk-later" in waiting["message"]
    disk(node, "disk-later", tick_image)  # the claim appears: the VMI starts
    status = running(node, "seeded")
    with open(os.path.join(node.data_dir, "vms", "default", "seeded", status["nodeName"],
                           "cloudinitdisk.cidata.iso"), "rb") as f:
        assert b"printed from cloud-init userdata" in f.read()
    node.cli("delete", "vmi", "seeded")
    node.wait(lambda: node.get("VirtualMachineInstance", "seeded") is None, 30, "the VMI gone")


@pytest.mark.parametrize("how", ["stop", "kill-9"])
def test_a_daemon_restart_does_not_lose_a_running_vmi_alone(daemons, tick_image, tmp_path, how):
    """A clean stop powers its guest off, a kill -9 leaves it to the next start, which stops
    it; either way the next start runs it again (no VM would)."""
    start_instance, stop_instance = daemons
    data_dir = str(tmp_path / "restart")
    os.makedirs(data_dir)
    first = start_instance(data_dir, "--accel", "tcg")  # not the serve fixture's: its teardown
    try:  # unmounts the pool of the data dir, which is the second daemon's by then
        disk(first, "disk-kept", tick_image)
        first.apply(vmi_pvc("kept", "disk-kept"))
        pid = running(first, "kept")["launcher"]["pid"]
    finally:
        if how == "stop":
            stop_instance(first)
        else:  # the pool stays mounted and QEMU runs on, as after a crash
            first.proc.send_signal(signal.SIGKILL)
            first.proc.wait()
    assert alive(pid) == (how == "kill-9")
    second = start_instance(data_dir, "--accel", "tcg")
    try:
        second.wait(lambda: phase(second, "kept") == "Running" and second.qemu_pid("kept") != pid, 60,
                    "the VMI Running again, in a new QEMU")
        assert not alive(pid)
        second.wait(lambda: second.all_serial_logs("kept").count(MARKER) == 2, 30, "its second boot")
        assert "Restarted" in second.cli("describe", "vmi", "kept").stdout
    finally:
        stop_instance(second)
        if alive(pid):  # the second start failed to stop the first's QEMU: the test fails, leaving none
            os.kill(pid, signal.SIGKILL)
