"""A VirtualMachine sized by an instancetype and shaped by a preference, end to end: the shipped
common instance types applied with `pvlun apply`, the tick guest booted with
`instancetype: {name: u1.nano}`, its QEMU given the instancetype's vCPUs and memory and the
preference's disk bus; a VM naming a missing instancetype refused with the field and name."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from guest_output import MARKER

COMMON = Path(__file__).resolve().parents[2] / "deploy" / "instancetypes" / "common.yaml"
PREFERENCE = """apiVersion: instancetype.kubevirt.io/v1beta1
kind: VirtualMachinePreference
metadata:
  name: sata-disks
spec:
  cpu:
    preferredCPUTopology: cores
  devices:
    preferredDiskBus: sata
  preferredTerminationGracePeriodSeconds: 2
"""


@pytest.fixture(scope="module")
def node(serve):
    return serve("--nodes", "1", "--accel", "tcg")


def sized(manifest: str, instancetype: str, preference: str | None) -> str:
    """The tick VM with its own cpu, memory and disk bus left to the instancetype and preference."""
    manifest = re.sub(r"\n        cpu:\n          cores: 1\n        memory:\n          guest: \S+", "", manifest)
    manifest = manifest.replace("            disk:\n              bus: virtio\n", "            disk: {}\n")
    manifest = re.sub(r"\n      terminationGracePeriodSeconds: \d+", "", manifest)
    matchers = f"  instancetype:\n    name: {instancetype}\n"
    if preference:
        matchers += f"  preference:\n    kind: VirtualMachinePreference\n    name: {preference}\n"
    return manifest.replace("spec:\n  runStrategy:", f"spec:\n{matchers}  runStrategy:", 1)


def test_vm_with_instancetype_and_preference_boots_with_their_cpu_memory_and_bus(node, tick_image, tick_vm_yaml):
    applied = node.apply(COMMON.read_text())
    assert "virtualmachineclusterinstancetype/u1.nano created" in applied.stdout
    assert "virtualmachineclusterpreference/windows.2k22 created" in applied.stdout
    assert re.search(r"^u1\.nano\s", node.cli("get", "vmcf").stdout, re.M)
    assert "512Mi" in node.cli("describe", "virtualmachineclusterinstancetype", "u1.nano").stdout
    node.cli("delete", "vmcp", "windows.10")
    assert node.get("VirtualMachineClusterPreference", "windows.10", "") is None
    node.apply(PREFERENCE)
    manifest = sized(tick_vm_yaml("sized", tick_image), "u1.nano", "sata-disks")
    assert "memory" not in manifest and "bus:" not in manifest and "terminationGracePeriodSeconds" not in manifest
    out = node.apply(manifest, "--wait")
    assert "virtualmachine/sized Running" in out.stdout, out.stdout + out.stderr
    node.wait(lambda: MARKER in node.all_serial_logs("sized"), 30, "the guest's marker")

    vmi = node.get("VirtualMachineInstance", "sized")
    domain = vmi["spec"]["domain"]
    assert domain["cpu"] == {"sockets": 1, "cores": 1, "threads": 1} and domain["memory"] == {"guest": "512Mi"}
    assert domain["devices"]["disks"][0]["disk"] == {"bus": "sata"}
    assert vmi["spec"]["terminationGracePeriodSeconds"] == 2
    with open(f"/proc/{vmi['status']['launcher']['pid']}/cmdline", "rb") as f:
        argv = f.read().decode().split("\0")
    assert argv[argv.index("-m") + 1] == "512M"
    assert argv[argv.index("-smp") + 1].startswith("1,")
    assert any(a.startswith("ide-hd,") for a in argv)  # the preference's sata bus

    status = node.get("VirtualMachine", "sized")["status"]
    assert (status["instancetypeRef"]["kind"], status["instancetypeRef"]["name"]) == \
        ("VirtualMachineClusterInstancetype", "u1.nano")
    revision = node.get("ControllerRevision", status["instancetypeRef"]["controllerRevisionRef"]["name"])
    assert revision["data"]["spec"]["memory"]["guest"] == "512Mi"
    assert status["preferenceRef"]["name"] == "sata-disks"
    node.cli("delete", "vm", "sized")  # its copies go with it (ownerReferences)
    node.wait(lambda: node.get("VirtualMachine", "sized") is None, 15, "the VM to go (within its preference's 2 s)")
    node.wait(lambda: node.store.list("ControllerRevision", "default") == [], 15, "the VM's ControllerRevisions to go")


def test_vm_naming_a_missing_instancetype_is_refused_with_the_field_and_name(node, tick_image, tick_vm_yaml):
    refused = node.apply(sized(tick_vm_yaml("unsized", tick_image), "u1.enormous", None), check=False)
    assert refused.returncode != 0
    assert "spec.instancetype.name: VirtualMachineClusterInstancetype 'u1.enormous' does not exist" in refused.stderr
    assert node.get("VirtualMachine", "unsized") is None


def test_a_vm_too_small_for_its_preference_is_refused_at_apply(node, tick_image, tick_vm_yaml):
    node.apply(COMMON.read_text())
    refused = node.apply(sized(tick_vm_yaml("small", tick_image), "u1.nano", None).replace(
        "  instancetype:\n", "  preference:\n    name: windows.2k22\n  instancetype:\n"), check=False)
    assert refused.returncode != 0
    assert "spec.template.spec.domain.memory.guest: 512Mi is less than the 4Gi the preference requires " \
           "(VirtualMachineClusterPreference windows.2k22 spec.requirements.memory.guest)" in refused.stderr
    assert node.get("VirtualMachine", "small") is None


def test_a_vm_reapplied_after_its_instancetype_is_gone_keeps_its_copy(node, tick_image, tick_vm_yaml):
    node.apply("""apiVersion: instancetype.kubevirt.io/v1beta1
kind: VirtualMachineInstancetype
metadata:
  name: mine
spec:
  cpu:
    guest: 2
  memory:
    guest: 256Mi
""")
    manifest = sized(tick_vm_yaml("kept", tick_image, strategy="Halted"), "mine", None).replace(
        "    name: mine\n", "    kind: VirtualMachineInstancetype\n    name: mine\n")
    node.apply(manifest)
    node.wait(lambda: ((node.get("VirtualMachine", "kept") or {}).get("status") or {}).get("instancetypeRef"), 15,
              "the VM's copy of its instancetype")
    node.cli("delete", "vminstancetype", "mine")
    again = node.apply(manifest)  # it runs with its copy: nothing to refuse
    assert "virtualmachine/kept unchanged" in again.stdout
    other = node.apply(manifest.replace("name: mine", "name: yours"), check=False)
    assert "spec.instancetype.name: VirtualMachineInstancetype 'yours' does not exist in namespace default" in \
        other.stderr
