"""VirtualMachine / VMI / migration parsing: KubeVirt defaults, and errors that name the field."""

from __future__ import annotations

import base64
import copy

import pytest

from controlplane.quantity import parse_quantity
from controlplane.vm_spec import (SpecError, parse_migration, parse_object, parse_virtual_machine,
                       parse_virtual_machine_instance)

FULL = {
    "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
    "metadata": {"name": "fedora", "namespace": "apps"},
    "spec": {
        "running": True,
        "dataVolumeTemplates": [{"metadata": {"name": "fedora-root"},
                                 "spec": {"source": {"blank": {}}, "storage": {"resources": {"requests": {"storage": "1Gi"}}}}}],
        "template": {"metadata": {"labels": {"app": "f"}}, "spec": {
            "domain": {
                "cpu": {"cores": 2, "sockets": 1, "threads": 2},
                "resources": {"requests": {"memory": "1Gi"}},
                "firmware": {"bootloader": {"efi": {"secureBoot": False}}},
                "devices": {
                    "disks": [
                        {"name": "root", "disk": {"bus": "virtio"}, "bootOrder": 1},
                        {"name": "data", "disk": {"bus": "scsi"}, "serial": "DATA1"},
                        {"name": "iso", "cdrom": {}, "bootOrder": 2},
                        {"name": "cloudinit", "disk": {"bus": "sata"}},
                    ],
                    "interfaces": [{"name": "default", "masquerade": {},
                                    "ports": [{"name": "ssh", "port": 22}, {"port": 53, "protocol": "UDP"}]}],
                },
            },
            "networks": [{"name": "default", "pod": {}}],
            "volumes": [
                {"name": "root", "dataVolume": {"name": "fedora-root"}},
                {"name": "data", "persistentVolumeClaim": {"claimName": "data-pvc", "readOnly": True}},
                {"name": "iso", "persistentVolumeClaim": {"claimName": "install-iso"}},
                {"name": "cloudinit", "cloudInitNoCloud": {
                    "userDataBase64": base64.b64encode(b"#cloud-config\n").decode(), "networkData": "version: 2\n"}},
                {"name": "scratch", "emptyDisk": {"capacity": "2Gi"}},
            ],
        }},
    },
}


def with_change(path: str, value, obj=None):
    """A copy of FULL (or obj) with the dotted path (list indexes as [n]) set to value; None deletes."""
    obj = copy.deepcopy(obj or FULL)
    keys = path.replace("[", ".").replace("]", "").split(".")
    node = obj
    for k in keys[:-1]:
        node = node[int(k)] if k.isdigit() else node[k]
    last = int(keys[-1]) if keys[-1].isdigit() else keys[-1]
    if value is None:
        del node[last]
    else:
        node[last] = value
    return obj


def test_full_virtual_machine_parses_with_kubevirt_defaults():
    vm = parse_virtual_machine(FULL)
    assert (vm.name, vm.namespace, vm.run_strategy) == ("fedora", "apps", "Always")
    spec = vm.template
    assert (spec.cores, spec.sockets, spec.threads, spec.vcpus) == (2, 1, 2, 4)
    assert spec.memory == 1 << 30
    assert (spec.firmware, spec.secure_boot, spec.machine) == ("efi", False, "q35")
    disks = {d.name: d for d in spec.disks}
    assert disks["iso"].device == "cdrom" and disks["iso"].bus == "sata" and disks["iso"].readonly
    assert disks["data"].readonly and disks["data"].serial == "DATA1"
    assert disks["scratch"].bus == "virtio"  # volume without a disk gets KubeVirt's default disk
    assert spec.volume("cloudinit").user_data == "#cloud-config\n"
    assert spec.volume("scratch").capacity == 2 << 30
    assert [(p.port, p.protocol) for p in spec.interfaces[0].ports] == [(22, "TCP"), (53, "UDP")]
    assert vm.data_volume_names == ["fedora-root"]
    assert spec.labels == {"app": "f"}
    assert spec.hostname == "fedora"


@pytest.mark.parametrize("running,strategy", [(True, "Always"), (False, "Halted"), (None, "Halted")])
def test_running_maps_to_run_strategy(running, strategy):
    assert parse_virtual_machine(with_change("spec.running", running)).run_strategy == strategy


@pytest.mark.parametrize("strategy", ["Always", "RerunOnFailure", "Manual", "Halted"])
def test_run_strategies_accepted(strategy):
    obj = with_change("spec.running", None)
    obj["spec"]["runStrategy"] = strategy
    assert parse_virtual_machine(obj).run_strategy == strategy


def test_memory_guest_wins_over_requests_and_bios_is_default():
    obj = with_change("spec.template.spec.domain.memory", {"guest": "512M"})
    obj = with_change("spec.template.spec.domain.firmware", None, obj)
    spec = parse_virtual_machine(obj).template
    assert spec.memory == 512_000_000 and spec.firmware == "bios"


@pytest.mark.parametrize("path,value,field,words", [
    ("spec.template.spec.domain.devices.disks[1].disk.bus", "ide",
     "spec.template.spec.domain.devices.disks[1].disk.bus", 'unsupported bus "ide" (virtio, sata, scsi)'),
    ("spec.template.spec.domain.devices.disks[2].cdrom", {"bus": "virtio"},
     "spec.template.spec.domain.devices.disks[2].cdrom.bus", 'unsupported bus "virtio"'),
    ("spec.template.spec.domain.devices.disks[0].name", "nosuch",
     "spec.template.spec.domain.devices.disks[0].name", "no volume named 'nosuch'"),
    ("spec.template.spec.domain.resources.requests.memory", "lots",
     "spec.template.spec.domain.resources.requests.memory", "not a quantity"),
    ("spec.template.spec.domain.resources", None, "spec.template.spec.domain.memory.guest", "required"),
    ("spec.template.spec.domain.devices.disks[1].disk.bus", "sata",
     "spec.template.spec.domain.devices.disks[1].disk.bus", "a read-only disk needs bus virtio or scsi"),
    ("spec.template.spec.domain.cpu.cores", 0, "spec.template.spec.domain.cpu.cores", "integer"),
    ("spec.template.spec.domain.devices.disks[1].bootOrder", 1,
     "spec.template.spec.domain.devices.disks", "bootOrder values must be unique"),
    ("spec.template.spec.volumes[4].emptyDisk", {}, "spec.template.spec.volumes[4].emptyDisk.capacity", "required"),
    ("spec.template.spec.volumes[4]", {"name": "scratch", "containerDisk": {"image": "x"}},
     "spec.template.spec.volumes[4].containerDisk.image", "names no registry host"),
    ("spec.template.spec.volumes[0].dataVolume", {}, "spec.template.spec.volumes[0].dataVolume.name", "required"),
    ("spec.template.spec.volumes[3].cloudInitNoCloud", {"userData": "a", "userDataBase64": "YQ=="},
     "spec.template.spec.volumes[3].cloudInitNoCloud", "exactly one of userData, userDataBase64"),
    ("spec.template.spec.volumes[3].cloudInitNoCloud", {"userDataBase64": "!!"},
     "spec.template.spec.volumes[3].cloudInitNoCloud.userDataBase64", "base64"),
    ("spec.template.spec.volumes[1].name", "root", "spec.template.spec.volumes[1].name", "duplicate"),
    ("spec.template.spec.domain.devices.interfaces[0]", {"name": "default", "sriov": {}},
     "spec.template.spec.domain.devices.interfaces[0].sriov", "unsupported interface binding"),
    ("spec.template.spec.domain.devices.interfaces[0].ports[0].port", 70000,
     "spec.template.spec.domain.devices.interfaces[0].ports[0].port", "integer"),
    ("spec.template.spec.networks[0].name", "other",
     "spec.template.spec.domain.devices.interfaces[0].name", "no network named"),
    ("spec.runStrategy", "Always", "spec.running", "mutually exclusive"),
    ("spec.dataVolumeTemplates[0].metadata", {}, "spec.dataVolumeTemplates[0].metadata.name", "required"),
    ("metadata.name", "Bad_Name", "metadata.name", "not a valid name"),
    ("apiVersion", "v1", "apiVersion", "kubevirt.io/v1"),
])
def test_bad_specs_name_the_field(path, value, field, words):
    with pytest.raises(SpecError) as err:
        parse_virtual_machine(with_change(path, value))
    assert err.value.path == field
    assert str(err.value).startswith(f"{field}: ")
    assert words in str(err.value)


def test_unknown_run_strategy_is_refused():
    obj = with_change("spec.running", None)
    obj["spec"]["runStrategy"] = "Sometimes"
    with pytest.raises(SpecError, match=r"^spec.runStrategy: unsupported run strategy 'Sometimes'"):
        parse_virtual_machine(obj)


def test_vmi_and_migration_parse():
    vmi = {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance", "metadata": {"name": "v"},
           "spec": {"domain": {"memory": {"guest": "64Mi"}, "devices": {}},
                    "volumes": [{"name": "root", "persistentVolumeClaim": {"claimName": "pvc"}}]}}
    spec = parse_virtual_machine_instance(vmi)
    assert spec.namespace == "default" and spec.disks[0].name == "root"
    assert [i.name for i in spec.interfaces] == ["default"]  # pod network attached by default
    mig = parse_object({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstanceMigration",
                        "metadata": {"name": "m1"}, "spec": {"vmiName": "v"}})
    assert mig.vmi_name == "v"
    with pytest.raises(SpecError, match="^spec.vmiName: required"):
        parse_migration({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstanceMigration",
                         "metadata": {"name": "m1"}, "spec": {}})
    with pytest.raises(SpecError, match="^spec.domain.memory.guest: must be at least 16Mi"):
        parse_virtual_machine_instance(with_change("spec.domain.memory.guest", "1Mi", vmi))


@pytest.mark.parametrize("text,value", [("256Mi", 256 << 20), ("1Gi", 1 << 30), ("512M", 512_000_000),
                                        ("1G", 10**9), ("1.5Gi", 3 << 29), ("100k", 100_000), ("1e3", 1000),
                                        (4096, 4096), ("0.5Ki", 512)])
def test_quantities(text, value):
    assert parse_quantity(text) == value


@pytest.mark.parametrize("text", ["", "Mi", "12XB", "-1Gi", "1.2.3", True, None, "1e3Mi"])
def test_bad_quantities(text):
    with pytest.raises(ValueError):
        parse_quantity(text)
