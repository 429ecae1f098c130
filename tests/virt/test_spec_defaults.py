"""KubeVirt's defaults and the domain fields its examples use: each one translated into QEMU's
argv, noted as ignored (a FieldIgnored Warning event names it), or refused naming the field.
The manifests are ours, shaped like KubeVirt's examples (vm-alpine-datavolume, vmi-fedora,
vmi-windows, vmi-secureboot, vmi-masquerade)."""

from __future__ import annotations

import copy

import pytest

from controlplane.context import Context
from controlplane.store import SQLiteStore
from controlplane.vm_ignored import MAX_WARNINGS, REASON, Ignored, event_messages
from controlplane.vm_spec import SpecError, parse_virtual_machine, parse_virtual_machine_instance
from virt.qemu_args import DiskAttachment, build_qemu_argv
from virt.spec_warnings import announce_ignored

T = "spec.template.spec"

# vm-alpine-datavolume's shape: empty machine type, no disk bus, rng, pod network + masquerade without model
ALPINE = {
    "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
    "metadata": {"name": "alpine", "labels": {"kubevirt.io/vm": "alpine"}},
    "spec": {
        "running": False,
        "dataVolumeTemplates": [{"metadata": {"name": "alpine-dv", "creationTimestamp": None},
                                 "spec": {"pvc": {"accessModes": ["ReadWriteOnce"],
                                                  "resources": {"requests": {"storage": "2Gi"}}},
                                          "source": {"http": {"url": "http://127.0.0.1/alpine.img"}}}}],
        "template": {"metadata": {"labels": {"kubevirt.io/vm": "alpine"}}, "spec": {
            "domain": {
                "machine": {"type": ""},
                "devices": {"disks": [{"name": "root", "disk": {}}, {"name": "iso", "cdrom": {}}],
                            "interfaces": [{"name": "default", "masquerade": {}}], "rng": {}},
                "resources": {"requests": {"memory": "128Mi"}},
            },
            "networks": [{"name": "default", "pod": {}}],
            "terminationGracePeriodSeconds": 0,
            "volumes": [{"name": "root", "dataVolume": {"name": "alpine-dv"}},
                        {"name": "iso", "persistentVolumeClaim": {"claimName": "iso"}}],
        }},
    },
}


def vm_with(**changes) -> dict:
    """ALPINE with template-spec fields changed: domain=..., devices=..., spec-level keys as given."""
    obj = copy.deepcopy(ALPINE)
    spec = obj["spec"]["template"]["spec"]
    for key, value in changes.items():
        if key == "devices":
            spec["domain"]["devices"].update(value)
        elif key == "domain":
            spec["domain"].update(value)
        else:
            spec[key] = value
    return obj


def argv_of(obj: dict, **kw) -> list[str]:
    spec = parse_virtual_machine(obj).template
    return build_qemu_argv(spec, {d.name: DiskAttachment(f"/pub/{d.name}") for d in spec.disks}, accel="tcg",
                           qmp_fd=3, serial_fd=4, net_fds={i.name: 5 for i in spec.interfaces}, **kw)


def values(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def ignored_paths(obj: dict) -> list[str]:
    return [i.path for i in parse_virtual_machine(obj).template.ignored]


def refused(obj: dict) -> SpecError:
    with pytest.raises(SpecError) as err:
        parse_virtual_machine(obj)
    return err.value


def test_kubevirt_defaults_of_the_alpine_example_shape():
    vm = parse_virtual_machine(ALPINE)
    spec = vm.template
    assert spec.machine == "q35" and spec.memory == 128 << 20 and spec.termination_grace_period == 0
    assert [(d.name, d.device, d.bus) for d in spec.disks] == [("root", "disk", "virtio"), ("iso", "cdrom", "sata")]
    assert [(i.name, i.binding, i.model) for i in spec.interfaces] == [("default", "masquerade", "virtio")]
    assert spec.ignored == ()  # everything in it runs
    argv = argv_of(ALPINE)
    assert values(argv, "-machine") == ["q35"] and values(argv, "-rtc") == ["base=utc"]
    assert "virtio-rng-pci,rng=rng0,id=ua-rng" in values(argv, "-device")
    assert values(argv, "-object") == ["rng-builtin,id=rng0"]  # QEMU opens no host path for it
    assert "virtio-net-pci" in " ".join(values(argv, "-device"))


def test_without_rng_there_is_no_rng_device():
    obj = copy.deepcopy(ALPINE)
    del obj["spec"]["template"]["spec"]["domain"]["devices"]["rng"]
    assert "rng" not in " ".join(argv_of(obj))


@pytest.mark.parametrize("binding", ["bridge", "slirp", "passt"])
def test_bridge_slirp_and_passt_on_the_pod_network_run_as_masquerade_with_a_note(binding):
    obj = vm_with(devices={"interfaces": [{"name": "default", binding: {}, "ports": [{"port": 80}]}]})
    spec = parse_virtual_machine(obj).template
    assert [(i.binding, i.model, [p.port for p in i.ports]) for i in spec.interfaces] == [("masquerade", "virtio", [80])]
    (note,) = spec.ignored
    assert str(note).startswith(f"{T}.domain.devices.interfaces[0].{binding}: ignored, the pod network runs as masquerade")


def test_interface_and_network_names_may_have_capitals_as_in_vmi_slirp():
    obj = vm_with(devices={"interfaces": [{"name": "testSlirp", "slirp": {}, "ports": [{"name": "http", "port": 80}]}]},
                  networks=[{"name": "testSlirp", "pod": {}}])
    assert [i.name for i in parse_virtual_machine(obj).template.interfaces] == ["testSlirp"]
    assert "virtio-net-pci,netdev=net-testSlirp,id=ua-testSlirp," in " ".join(values(argv_of(obj), "-device"))
    err = refused(vm_with(devices={"interfaces": [{"name": "a,b", "masquerade": {}}]}))
    assert err.path == f"{T}.domain.devices.interfaces[0].name"


@pytest.mark.parametrize("interface, network, where, words", [
    ({"name": "default", "sriov": {}}, {"name": "default", "pod": {}}, "interfaces[0].sriov", "unsupported interface"),
    ({"name": "default", "macvtap": {}}, {"name": "default", "pod": {}}, "interfaces[0].macvtap", "unsupported"),
    ({"name": "default", "bridge": {}, "masquerade": {}}, {"name": "default", "pod": {}}, "interfaces[0]", "only one"),
    ({"name": "ptp", "bridge": {}}, {"name": "ptp", "multus": {"networkName": "ptp-conf"}}, None, "network type 'multus' is not supported"),
])
def test_other_bindings_and_networks_are_refused_naming_the_field(interface, network, where, words):
    err = refused(vm_with(devices={"interfaces": [interface]}, networks=[network]))
    assert words in err.message
    assert err.path == (f"{T}.domain.devices.{where}" if where else f"{T}.networks[0]")


@pytest.mark.parametrize("action", ["poweroff", "reset", "shutdown"])
def test_watchdog_is_an_i6300esb_with_its_action(action):
    argv = argv_of(vm_with(devices={"watchdog": {"name": "wd", "i6300esb": {"action": action}}}))
    assert "i6300esb,id=ua-watchdog-wd" in values(argv, "-device")
    assert values(argv, "-action") == [f"watchdog={action}"]


def test_watchdog_defaults_to_reset_and_bad_ones_are_refused():
    argv = argv_of(vm_with(devices={"watchdog": {"name": "wd", "i6300esb": {}}}))
    assert values(argv, "-action") == ["watchdog=reset"]
    err = refused(vm_with(devices={"watchdog": {"name": "wd", "i6300esb": {"action": "explode"}}}))
    assert err.path == f"{T}.domain.devices.watchdog.i6300esb.action" and "poweroff, reset, shutdown" in err.message
    err = refused(vm_with(devices={"watchdog": {"name": "wd", "diag288": {"action": "reset"}}}))
    assert err.path == f"{T}.domain.devices.watchdog" and "i6300esb" in err.message


def test_features_acpi_apic_smm_translate_and_hyperv_is_noted():
    obj = vm_with(domain={"features": {"acpi": {"enabled": False}, "apic": {}, "smm": {"enabled": True},
                                       "hyperv": {"relaxed": {}, "spinlocks": {"spinlocks": 8191}}}})
    assert values(argv_of(obj), "-machine") == ["q35,acpi=off,smm=on"]
    assert ignored_paths(obj) == [f"{T}.domain.features.hyperv"]
    obj = vm_with(domain={"features": {"acpi": {}, "smm": {"enabled": False}}})
    assert values(argv_of(obj), "-machine") == ["q35,smm=off"]
    obj = vm_with(domain={"features": {"apic": {"enabled": False}}})
    assert ignored_paths(obj) == [f"{T}.domain.features.apic.enabled"]


def test_smm_needs_a_pc_machine_and_secure_boot_needs_smm():
    err = refused(vm_with(domain={"machine": {"type": "microvm"}, "features": {"smm": {}}}))
    assert err.path == f"{T}.domain.features.smm" and "q35" in err.message
    err = refused(vm_with(domain={"features": {"smm": {"enabled": False}},
                                  "firmware": {"bootloader": {"efi": {"secureBoot": True}}}}))
    assert err.path == f"{T}.domain.features.smm.enabled" and "secure boot" in err.message
    # as vmi-secureboot: smm on, efi secure boot
    spec = parse_virtual_machine(vm_with(domain={"features": {"acpi": {}, "smm": {"enabled": True}},
                                                 "firmware": {"bootloader": {"efi": {"secureBoot": True}}}})).template
    argv = build_qemu_argv(spec, {d.name: DiskAttachment("/pub/x") for d in spec.disks}, accel="tcg", qmp_fd=3,
                           serial_fd=4, net_fds={"default": 5}, ovmf_code="/usr/ovmf.fd", ovmf_vars_fd=6)
    assert values(argv, "-machine") == ["q35,pflash0=pflash0,pflash1=pflash1,smm=on"]


def test_clock_timers_of_the_windows_example():
    obj = vm_with(domain={"clock": {"utc": {}, "timer": {"hpet": {"present": False}, "hyperv": {},
                                                          "pit": {"tickPolicy": "delay"},
                                                          "rtc": {"tickPolicy": "catchup"}}}})
    argv = argv_of(obj)
    assert values(argv, "-machine") == ["q35,hpet=off"] and values(argv, "-rtc") == ["base=utc,driftfix=slew"]
    assert ignored_paths(obj) == [f"{T}.domain.clock.timer.hyperv", f"{T}.domain.clock.timer.pit"]


def test_clock_timezone_and_offset_are_noted_and_both_kinds_refused():
    assert ignored_paths(vm_with(domain={"clock": {"timezone": "Europe/Berlin"}})) == [f"{T}.domain.clock.timezone"]
    assert ignored_paths(vm_with(domain={"clock": {"utc": {"offsetSeconds": 3600}}})) == \
        [f"{T}.domain.clock.utc.offsetSeconds"]
    err = refused(vm_with(domain={"clock": {"utc": {}, "timezone": "UTC"}}))
    assert err.path == f"{T}.domain.clock" and "only one" in err.message
    err = refused(vm_with(domain={"clock": {"timer": {"rtc": {"tickPolicy": "sometimes"}}}}))
    assert err.path == f"{T}.domain.clock.timer.rtc.tickPolicy"


def test_chassis_firmware_uuid_and_serial_become_smbios():
    obj = vm_with(domain={"chassis": {"asset": 123456, "manufacturer": "Acme, Inc"},
                          "firmware": {"uuid": "5d307ca9-b3ef-428c-8861-06e72d69f223", "serial": "S-1"}})
    argv = argv_of(obj)
    assert values(argv, "-smbios") == ["type=1,serial=S-1", "type=3,asset=123456,manufacturer=Acme,, Inc"]
    assert values(argv, "-uuid") == ["5d307ca9-b3ef-428c-8861-06e72d69f223"]
    err = refused(vm_with(domain={"chassis": {"asset": "a\nb"}}))
    assert err.path == f"{T}.domain.chassis.asset"


def test_memory_from_requests_and_cpu_topology():
    obj = vm_with(domain={"cpu": {"sockets": 2, "cores": 2, "threads": 1, "model": "host-passthrough"}})
    assert values(argv_of(obj), "-smp") == ["4,sockets=2,cores=2,threads=1"]
    assert values(argv_of(obj), "-m") == ["128M"] and ignored_paths(obj) == []
    obj = vm_with(domain={"cpu": {"cores": 1, "model": "Haswell", "dedicatedCpuPlacement": True}})
    assert ignored_paths(obj) == [f"{T}.domain.cpu.dedicatedCpuPlacement", f"{T}.domain.cpu.model"]


def test_cpu_and_limits_size_only_a_clusters_launcher_pod():
    obj = vm_with(domain={"resources": {"requests": {"memory": "128Mi", "cpu": "500m"},
                                        "limits": {"memory": "1Gi", "nvidia.com/gpu": 1},
                                        "overcommitGuestOverhead": True}})
    ignored = parse_virtual_machine(obj).template.ignored
    assert [(i.path.removeprefix(f"{T}.domain.resources."), i.scheduling) for i in ignored] == [
        ("overcommitGuestOverhead", False), ("requests.cpu", True), ("limits.memory", True),
        ("limits.nvidia.com/gpu", False)]
    assert len(event_messages(ignored, cluster=True)) == 2
    err = refused(vm_with(domain={"resources": {"requests": {"memory": "128Mi", "a b": 1}}}))
    assert err.path == f"{T}.domain.resources.requests"


def test_spec_fields_kubevirt_users_set_are_noted_scheduling_only_off_a_cluster():
    obj = vm_with(nodeSelector={"disk": "ssd"}, tolerations=[{"key": "k", "operator": "Exists"}],
                  affinity={"nodeAffinity": {}}, evictionStrategy="LiveMigrate", priorityClassName="high",
                  readinessProbe={"tcpSocket": {"port": 22}}, livenessProbe={"tcpSocket": {"port": 22}},
                  hostname="web", subdomain="svc")
    ignored = parse_virtual_machine(obj).template.ignored
    assert sorted(i.path for i in ignored) == sorted(f"{T}.{k}" for k in (
        "nodeSelector", "tolerations", "affinity", "evictionStrategy", "priorityClassName", "readinessProbe",
        "livenessProbe", "subdomain"))
    embedded, cluster = event_messages(ignored, cluster=False), event_messages(ignored, cluster=True)
    assert len(embedded) == 8 and len(cluster) == 4
    assert not any("nodeSelector" in m or "subdomain" in m for m in cluster)
    assert f"{T}.evictionStrategy: ignored, a node drain" in " ".join(cluster)


@pytest.mark.parametrize("key, value, where, words", [
    ("devices", {"gpus": [{"name": "gpu1", "deviceName": "nvidia.com/GP102GL_Tesla_P40"}]}, "domain.devices.gpus",
     "GPUs"),
    ("devices", {"hostDevices": [{"name": "usb", "deviceName": "kubevirt.io/storage"}]}, "domain.devices.hostDevices",
     "host devices"),
    ("domain", {"launchSecurity": {"sev": {}}}, "domain.launchSecurity", "SEV"),
    ("resourceClaims", [{"name": "c"}], "resourceClaims", "DRA"),
    ("architecture", "arm64", "architecture", "amd64"),
    ("devices", {"bad key": 1}, "domain.devices", "unknown field"),
])
def test_fields_that_would_mislead_are_refused_naming_them(key, value, where, words):
    err = refused(vm_with(**{key: value}))
    assert err.path == f"{T}.{where}" and words in err.message


def test_device_switches_and_unknown_fields_are_noted():
    obj = vm_with(devices={"autoattachSerialConsole": True, "autoattachGraphicsDevice": False,
                           "networkInterfaceMultiqueue": True, "vsock": {}, "disableHotplug": True})
    assert ignored_paths(obj) == [f"{T}.domain.devices.vsock", f"{T}.domain.devices.networkInterfaceMultiqueue"]
    obj = vm_with(devices={"autoattachSerialConsole": False})
    (note,) = parse_virtual_machine(obj).template.ignored
    assert str(note) == (f"{T}.domain.devices.autoattachSerialConsole: ignored, the serial console is always "
                         "attached (its output is the VM's log)")
    err = refused(vm_with(devices={"autoattachSerialConsole": "yes"}))
    assert err.path == f"{T}.domain.devices.autoattachSerialConsole"
    obj = vm_with(devices={"disks": [{"name": "root", "disk": {"bus": "scsi", "pciAddress": "0000:81:01.0"},
                                      "cache": "none"}]})
    assert ignored_paths(obj) == [f"{T}.domain.devices.disks[0].cache", f"{T}.domain.devices.disks[0].disk.pciAddress"]


def test_rotation_rate_of_the_ssd_emulation_example():
    obj = vm_with(devices={"disks": [{"name": "root", "disk": {"bus": "scsi", "rotationRate": 1}},
                                     {"name": "iso", "disk": {"bus": "sata", "rotationRate": 7200}}]})
    devices = values(argv_of(obj), "-device")
    assert "scsi-hd,bus=scsi0.0,channel=0,scsi-id=0,lun=0,drive=fmt-root,id=ua-root,rotation_rate=1" in devices
    assert "ide-hd,bus=sata0.0,drive=fmt-iso,id=ua-iso,rotation_rate=7200" in devices
    for disk in ({"bus": "virtio", "rotationRate": 1}, {"bus": "scsi", "rotationRate": 2}):
        err = refused(vm_with(devices={"disks": [{"name": "root", "disk": disk}]}))
        assert err.path == f"{T}.domain.devices.disks[0].disk.rotationRate"


def test_a_vmi_names_its_own_paths_and_a_vm_its_top_level_fields():
    vmi = {"apiVersion": "kubevirt.io/v1alpha3", "kind": "VirtualMachineInstance", "metadata": {"name": "f"},
           "spec": copy.deepcopy(ALPINE["spec"]["template"]["spec"])}
    vmi["spec"]["domain"]["devices"]["blockMultiQueue"] = True
    (note,) = parse_virtual_machine_instance(vmi).ignored
    assert note.path == "spec.domain.devices.blockMultiQueue"
    obj = copy.deepcopy(ALPINE)
    obj["spec"]["flavor"] = {"name": "small"}
    assert ignored_paths(obj) == ["spec.flavor"]


def test_hook_sidecar_annotations_are_noted():
    hooks = {"hooks.kubevirt.io/hookSidecars": '[{"args": ["--version", "v1alpha2"], "image": "hook:devel"}]'}
    vmi = {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
           "metadata": {"name": "f", "annotations": hooks}, "spec": copy.deepcopy(ALPINE["spec"]["template"]["spec"])}
    (note,) = parse_virtual_machine_instance(vmi).ignored
    assert note.path == "metadata.annotations[hooks.kubevirt.io/hookSidecars]"
    obj = copy.deepcopy(ALPINE)
    obj["spec"]["template"]["metadata"]["annotations"] = hooks
    assert ignored_paths(obj) == ["spec.template.metadata.annotations[hooks.kubevirt.io/hookSidecars]"]


def test_event_messages_are_capped():
    many = tuple(Ignored(f"spec.x{i}", "nothing") for i in range(MAX_WARNINGS + 5))
    out = event_messages(many, cluster=False)
    assert len(out) == MAX_WARNINGS and out[-1] == "and 6 more fields ignored"


def test_announce_writes_each_warning_event_once_per_object(tmp_path):
    store = SQLiteStore(str(tmp_path / "objects.db"))
    ctx = Context(store, None, str(tmp_path), ["node-1"])
    obj = vm_with(devices={"watchdog": {"name": "wd", "i6300esb": {}}, "autoattachGraphicsDevice": True},
                  evictionStrategy="LiveMigrate")
    vm = store.apply(obj)
    for _ in range(3):
        announce_ignored(ctx, vm)
    ctx.services.clear()  # a restarted daemon: its memo is gone, the store still has the events
    announce_ignored(ctx, vm)
    events = [(e["type"], e["reason"], e["message"], e["count"]) for e in store.events(vm)]
    assert events == [
        ("Warning", REASON, f"{T}.evictionStrategy: ignored, a node drain neither live-migrates nor evicts the VM; "
                            "migrate it with a VirtualMachineInstanceMigration", 1),
        ("Warning", REASON, f"{T}.domain.devices.autoattachGraphicsDevice: ignored, no graphics device (no VNC: use "
                            "the serial console)", 1)]
    announce_ignored(ctx, store.apply(ALPINE))  # nothing ignored: no events
    assert [e["reason"] for e in store.events(store.get("VirtualMachine", "alpine"))] == [REASON, REASON]
