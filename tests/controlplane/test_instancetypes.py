"""Instance types and preferences (instancetype.kubevirt.io/v1beta1) applied to a VM: the pure
expansion, its conflicts and warnings, the recorded revisions, and the shipped common manifest."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from controlplane.admission import Refused, load_documents
from controlplane.instancetype_revisions import resolved, vm_as_run
from controlplane.instancetypes import expand, matchers_of
from controlplane.store import SQLiteStore
from controlplane.vm_spec import SpecError, parse_virtual_machine

COMMON = Path(__file__).resolve().parents[2] / "deploy" / "instancetypes" / "common.yaml"


def vm(**spec) -> dict:
    domain = spec.pop("domain", {"devices": {"disks": [{"name": "root", "disk": {}}],
                                             "interfaces": [{"name": "default", "masquerade": {}}]}})
    return {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
            "metadata": {"name": "web", "namespace": "default", "uid": "u-1"},
            "spec": {"runStrategy": "Halted", **spec,
                     "template": {"spec": {"domain": domain, "networks": [{"name": "default", "pod": {}}],
                                           "volumes": [{"name": "root", "dataVolume": {"name": "root"}}]}}}}


def instancetype(name="u1.medium", guest_cpus=1, guest_memory="4Gi", kind="VirtualMachineClusterInstancetype",
                 **extra) -> dict:
    return {"apiVersion": "instancetype.kubevirt.io/v1beta1", "kind": kind, "metadata": {"name": name},
            "spec": {"cpu": {"guest": guest_cpus}, "memory": {"guest": guest_memory}, **extra}}


def preference(name="fedora", kind="VirtualMachineClusterPreference", **spec) -> dict:
    return {"apiVersion": "instancetype.kubevirt.io/v1beta1", "kind": kind, "metadata": {"name": name}, "spec": spec}


def test_kinds_default_as_kubevirt_defaults_them():
    it, pref = matchers_of(vm(instancetype={"name": "u1.nano"}, preference={"name": "fedora"}))
    assert (it.kind, it.name, it.namespace("ns1")) == ("VirtualMachineClusterInstancetype", "u1.nano", "")
    assert (pref.kind, pref.name) == ("VirtualMachineClusterPreference", "fedora")
    it, _ = matchers_of(vm(instancetype={"name": "mine", "kind": "virtualmachineinstancetype"}))
    assert (it.kind, it.namespace("ns1")) == ("VirtualMachineInstancetype", "ns1")
    with pytest.raises(SpecError, match=r"spec.instancetype.kind: 'Flavor' is not one of"):
        matchers_of(vm(instancetype={"name": "x", "kind": "Flavor"}))
    with pytest.raises(SpecError, match=r"spec.preference.name"):
        matchers_of(vm(preference={"kind": "VirtualMachinePreference"}))


def test_instancetype_gives_cpu_as_sockets_and_memory():
    out, warnings = expand(vm(instancetype={"name": "u1.large"}), instancetype("u1.large", 2, "8Gi"), None)
    assert "instancetype" not in out["spec"]
    domain = out["spec"]["template"]["spec"]["domain"]
    assert domain["cpu"] == {"sockets": 2, "cores": 1, "threads": 1}
    assert domain["memory"] == {"guest": "8Gi"}
    parsed = parse_virtual_machine(out).template
    assert (parsed.vcpus, parsed.sockets, parsed.memory) == (2, 2, 8 << 30)
    assert warnings == []
    again, _ = expand(out, None, None)
    assert again == out  # the matchers are gone: expanding again changes nothing


@pytest.mark.parametrize("vcpus, cpu, expected", [
    (4, {"preferredCPUTopology": "cores"}, (1, 4, 1)), (4, {"preferredCPUTopology": "preferThreads"}, (1, 1, 4)),
    (4, {"preferredCPUTopology": "spread"}, (2, 2, 1)), (4, {"preferredCPUTopology": "any"}, (4, 1, 1)),
    (8, {"preferredCPUTopology": "spread", "spreadOptions": {"across": "CoresThreads"}}, (1, 4, 2)),
    (16, {"preferredCPUTopology": "preferSpread", "spreadOptions": {"across": "SocketsCoresThreads", "ratio": 4}},
     (2, 4, 2)),
    (1, {"preferredCPUTopology": "spread", "spreadOptions": {"ratio": 4}}, (1, 1, 1))])
def test_preferred_cpu_topology_shapes_the_guest_cpus(vcpus, cpu, expected):
    out, _ = expand(vm(instancetype={"name": "t"}, preference={"name": "p"}),
                    instancetype("t", vcpus, "1Gi"), preference("p", cpu=cpu))
    got = out["spec"]["template"]["spec"]["domain"]["cpu"]
    assert (got["sockets"], got["cores"], got["threads"]) == expected


def test_a_spread_that_does_not_divide_the_vcpus_is_refused():
    with pytest.raises(SpecError, match=r"spec.cpu.spreadOptions.ratio: 6 vCPUs cannot be spread"):
        expand(vm(instancetype={"name": "t"}, preference={"name": "p"}), instancetype("t", 6, "1Gi"),
               preference("p", cpu={"preferredCPUTopology": "spread", "spreadOptions": {"ratio": 4}}))


def test_a_vm_may_set_a_cpu_model_when_the_instancetype_does_not():
    out, _ = expand(vm(instancetype={"name": "t"}, domain={"cpu": {"model": "host-passthrough"}}),
                    instancetype("t", 2, "1Gi"), None)
    assert out["spec"]["template"]["spec"]["domain"]["cpu"]["model"] == "host-passthrough"
    with pytest.raises(SpecError, match=r"domain.cpu.model"):
        expand(vm(instancetype={"name": "t"}, domain={"cpu": {"model": "host-passthrough"}}),
               instancetype("t", 2, "1Gi", cpu={"guest": 2, "model": "Haswell"}), None)


@pytest.mark.parametrize("domain, field", [
    ({"cpu": {"sockets": 2}}, "spec.template.spec.domain.cpu.sockets"),
    ({"cpu": {"cores": 2}}, "spec.template.spec.domain.cpu.cores"),
    ({"memory": {"guest": "1Gi"}}, "spec.template.spec.domain.memory"),
    ({"cpu": {"model": "host-passthrough"}, "memory": {}}, "spec.template.spec.domain.memory"),
    ({"resources": {"requests": {"memory": "1Gi"}}}, "spec.template.spec.domain.resources.requests.memory"),
])
def test_a_vm_setting_what_its_instancetype_sets_is_refused_naming_the_field(domain, field):
    with pytest.raises(SpecError) as err:
        expand(vm(instancetype={"name": "u1.nano"}, domain=domain), instancetype("u1.nano", 1, "512Mi"), None)
    assert err.value.path == field and "conflicts with selected instance type" in str(err.value)


def test_preference_fills_only_what_the_vm_leaves_out():
    domain = {"devices": {"disks": [{"name": "root", "disk": {}}, {"name": "cd", "cdrom": {}},
                                    {"name": "data", "disk": {"bus": "virtio"}}],
                          "interfaces": [{"name": "default", "masquerade": {}}]},
              "machine": {"type": ""}}
    pref = preference("windows", devices={"preferredDiskBus": "sata", "preferredCdromBus": "scsi",
                                          "preferredInterfaceModel": "e1000e", "preferredTPM": {}},
                      machine={"preferredMachineType": "pc-q35-8.2"},
                      firmware={"preferredUseEfi": True, "preferredUseSecureBoot": True},
                      features={"preferredAcpi": {}, "preferredSmm": {}},
                      clock={"preferredClockOffset": {"utc": {}}, "preferredTimer": {"hpet": {"present": False}}},
                      preferredTerminationGracePeriodSeconds=3600)
    out, warnings = expand(vm(instancetype={"name": "u1.medium"}, preference={"name": "windows"}, domain=domain),
                           instancetype(), pref)
    spec = out["spec"]["template"]["spec"]
    disks = {d["name"]: d for d in spec["domain"]["devices"]["disks"]}
    assert disks["root"]["disk"] == {"bus": "sata"} and disks["cd"]["cdrom"] == {"bus": "scsi"}
    assert disks["data"]["disk"] == {"bus": "virtio"}  # the VM's own choice stands
    assert spec["domain"]["devices"]["interfaces"][0]["model"] == "e1000e"
    assert spec["domain"]["machine"] == {"type": "pc-q35-8.2"}
    assert spec["domain"]["firmware"]["bootloader"] == {"efi": {"secureBoot": True}}
    assert spec["domain"]["features"] == {"acpi": {}, "smm": {}}
    assert spec["domain"]["clock"] == {"utc": {}, "timer": {"hpet": {"present": False}}}
    assert spec["terminationGracePeriodSeconds"] == 3600
    assert warnings == ["VirtualMachineClusterPreference windows spec.devices.preferredTPM is ignored: "
                        "pvlun attaches no TPM"]
    own = vm(preference={"name": "windows"}, domain={**copy.deepcopy(domain), "memory": {"guest": "1Gi"},
                                                   "machine": {"type": "q35"}})
    own["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = 5
    out, _ = expand(own, None, pref)
    assert out["spec"]["template"]["spec"]["domain"]["machine"] == {"type": "q35"}
    assert out["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 5


def test_fields_pvlun_cannot_run_are_warned_about_by_path():
    it = instancetype("cx1.large", 2, "4Gi", ioThreadsPolicy="auto", cpu={"guest": 2, "dedicatedCPUPlacement": True},
                      memory={"guest": "4Gi", "hugepages": {"pageSize": "2Mi"}})
    out, warnings = expand(vm(instancetype={"name": "cx1.large"}), it, None)
    assert out["spec"]["template"]["spec"]["domain"]["cpu"] == {"sockets": 2, "cores": 1, "threads": 1}
    assert [w.split(" is ignored")[0] for w in warnings] == [
        "VirtualMachineClusterInstancetype cx1.large spec.cpu.dedicatedCPUPlacement",
        "VirtualMachineClusterInstancetype cx1.large spec.memory.hugepages",
        "VirtualMachineClusterInstancetype cx1.large spec.ioThreadsPolicy"]


def test_overcommit_asks_for_less_memory_than_the_guest_gets():
    it = instancetype("o1.medium", 1, "4Gi", memory={"guest": "4Gi", "overcommitPercent": 50})
    out, _ = expand(vm(instancetype={"name": "o1.medium"}), it, None)
    domain = out["spec"]["template"]["spec"]["domain"]
    assert domain["memory"] == {"guest": "4Gi"} and domain["resources"]["requests"]["memory"] == str(2 << 30)
    assert parse_virtual_machine(out).template.memory == 4 << 30


def test_preference_requirements_refuse_a_too_small_instancetype():
    pref = preference("windows.2k22", requirements={"cpu": {"guest": 2}, "memory": {"guest": "4Gi"}})
    with pytest.raises(SpecError, match=r"1 vCPUs are fewer than the 2 the preference requires"):
        expand(vm(instancetype={"name": "u1.medium"}, preference={"name": "windows.2k22"}), instancetype(), pref)
    with pytest.raises(SpecError, match=r"domain.memory.guest: 4Gi is less than the 8Gi"):
        expand(vm(instancetype={"name": "u1.large"}, preference={"name": "p"}), instancetype("u1.large", 2, "4Gi"),
               preference("p", requirements={"memory": {"guest": "8Gi"}}))


@pytest.mark.parametrize("domain, instancetype_spec, preference_spec, field", [
    ({"devices": []}, None, {}, "spec.template.spec.domain.devices"),
    ({"devices": {"disks": ["root"]}}, None, {}, "spec.template.spec.domain.devices.disks[0]"),
    ({"devices": {"disks": [{"name": "root", "disk": "virtio"}]}}, None, {},
     "spec.template.spec.domain.devices.disks[0].disk"),
    ({}, {"cpu": 2, "memory": {"guest": "1Gi"}}, None, "VirtualMachineClusterInstancetype t spec.cpu"),
    ({}, {"cpu": {"guest": "2"}, "memory": {"guest": "1Gi"}}, None,
     "VirtualMachineClusterInstancetype t spec.cpu.guest"),
    ({}, {"cpu": {"guest": 2}, "memory": {"guest": "lots"}}, None,
     "VirtualMachineClusterInstancetype t spec.memory.guest"),
    ({}, {"cpu": {"guest": 2}, "memory": {"guest": "1Gi"}}, {"cpu": {"preferredCPUTopology": {"x": 1}}},
     "VirtualMachineClusterPreference p spec.cpu.preferredCPUTopology"),
    ({}, {"cpu": {"guest": 2}, "memory": {"guest": "1Gi"}}, {"requirements": {"cpu": []}},
     "VirtualMachineClusterPreference p spec.requirements.cpu"),
])
def test_malformed_vms_instancetypes_and_preferences_are_refused_naming_the_field(domain, instancetype_spec,
                                                                               preference_spec, field):
    doc = vm(domain=domain, **({"instancetype": {"name": "t"}} if instancetype_spec is not None else {}),
             **({"preference": {"name": "p"}} if preference_spec is not None else {}))
    with pytest.raises(SpecError) as err:
        expand(doc, instancetype_spec and {"spec": instancetype_spec}, preference_spec and {"spec": preference_spec})
    assert err.value.path == field


# ---------------------------------------------------------------- apply and the store

def test_apply_refuses_conflicts_and_bad_instancetypes():
    doc = vm(instancetype={"name": "u1.nano"}, domain={"cpu": {"sockets": 2}})
    import yaml
    with pytest.raises(Refused, match=r"domain.cpu.sockets: .*conflicts with selected instance type"):
        load_documents(yaml.safe_dump(doc))
    (ok,) = load_documents(yaml.safe_dump(vm(instancetype={"name": "u1.nano"}, preference={"name": "fedora"})))
    assert ok["spec"]["instancetype"] == {"name": "u1.nano"}  # stored as written; expanded when it runs
    bad = instancetype("u1.bad", 0)
    with pytest.raises(Refused, match=r"VirtualMachineClusterInstancetype 'u1.bad' is invalid: spec.cpu.guest"):
        load_documents(yaml.safe_dump(bad))
    with pytest.raises(Refused, match=r"spec.cpu.preferredCPUTopology"):
        load_documents(yaml.safe_dump(preference("p", cpu={"preferredCPUTopology": "diagonal"})))


@pytest.fixture
def store(tmp_path):
    s = SQLiteStore(str(tmp_path / "objects.db"))
    yield s
    s.close() if hasattr(s, "close") else None


def test_a_missing_instancetype_is_refused_naming_the_field_and_the_name(store):
    store.apply(vm(instancetype={"name": "u1.gone"}))
    with pytest.raises(SpecError) as err:
        resolved(store, store.get("VirtualMachine", "web", "default"))
    assert err.value.path == "spec.instancetype.name" and "'u1.gone' not found" in str(err.value)
    store.apply(vm(preference={"name": "mine", "kind": "VirtualMachinePreference"},
                   domain={"memory": {"guest": "1Gi"}}))
    with pytest.raises(SpecError, match=r"spec.preference.name: VirtualMachinePreference 'mine' not found in "
                                        r"namespace default"):
        resolved(store, store.get("VirtualMachine", "web", "default"))


def test_a_running_vm_keeps_the_instancetype_it_started_with(store):
    store.apply(instancetype("u1.small", 1, "2Gi"))
    store.apply(preference("fedora", devices={"preferredDiskBus": "sata"}))
    store.apply(vm(instancetype={"name": "u1.small"}, preference={"name": "fedora"}))
    first, parsed = vm_as_run(store, store.get("VirtualMachine", "web", "default"))
    assert parsed.template.memory == 2 << 30 and parsed.template.disks[0].bus == "sata"
    status = store.get("VirtualMachine", "web", "default")["status"]
    ref = status["instancetypeRef"]
    assert (ref["kind"], ref["name"]) == ("VirtualMachineClusterInstancetype", "u1.small")
    revision = store.get("ControllerRevision", ref["controllerRevisionRef"]["name"], "default")
    assert revision["data"]["spec"]["memory"]["guest"] == "2Gi"
    assert revision["metadata"]["ownerReferences"][0]["kind"] == "VirtualMachine"
    assert status["preferenceRef"]["controllerRevisionRef"]["name"]
    store.apply(instancetype("u1.small", 4, "8Gi"))  # edited after the VM started
    _, parsed = vm_as_run(store, store.get("VirtualMachine", "web", "default"))
    assert (parsed.template.vcpus, parsed.template.memory) == (1, 2 << 30)
    store.delete("VirtualMachineClusterInstancetype", "u1.small", "")  # even gone, the copy runs on
    _, parsed = vm_as_run(store, store.get("VirtualMachine", "web", "default"))
    assert parsed.template.memory == 2 << 30
    store.apply(instancetype("u1.large", 2, "8Gi"))
    store.apply(vm(instancetype={"name": "u1.large"}, preference={"name": "fedora"}))  # another name: read afresh
    _, parsed = vm_as_run(store, store.get("VirtualMachine", "web", "default"))
    assert (parsed.template.vcpus, parsed.template.memory) == (2, 8 << 30)


def test_warnings_become_events_once(store):
    store.apply(instancetype("cx1.medium", 1, "2Gi", ioThreadsPolicy="auto"))
    store.apply(vm(instancetype={"name": "cx1.medium"}))
    for _ in range(3):
        vm_as_run(store, store.get("VirtualMachine", "web", "default"))
    events = [e for e in store.events(store.get("VirtualMachine", "web", "default")) if e.get("type") == "Warning"]
    assert len(events) == 1 and "spec.ioThreadsPolicy is ignored" in str(events[0])


# ---------------------------------------------------------------- the shipped manifest

def test_the_common_manifest_applies_and_holds_the_series_and_preferences():
    docs = load_documents(COMMON.read_text())
    types = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "VirtualMachineClusterInstancetype"}
    prefs = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "VirtualMachineClusterPreference"}
    for size in ("nano", "micro", "small", "medium", "2xmedium", "large", "xlarge", "2xlarge", "4xlarge", "8xlarge"):
        assert f"u1.{size}" in types
    assert types["u1.nano"] == {"cpu": {"guest": 1}, "memory": {"guest": "512Mi"}}
    assert types["u1.2xlarge"] == {"cpu": {"guest": 8}, "memory": {"guest": "32Gi"}}
    assert types["o1.large"]["memory"] == {"guest": "8Gi", "overcommitPercent": 50}
    assert types["cx1.large"]["cpu"]["guest"] == 2 and types["cx1.large"]["memory"]["guest"] == "4Gi"
    assert {"fedora", "centos.stream9", "rhel.9", "ubuntu", "debian", "windows.2k22", "cirros", "alpine"} <= set(prefs)
    assert prefs["windows.2k22"]["devices"]["preferredDiskBus"] == "sata"
    for name, pref in prefs.items():  # every preference works with the smallest instancetype it allows
        small = next(n for n in types if n.startswith("u1.") and _fits(types[n], pref))
        doc = vm(instancetype={"name": small}, preference={"name": name})
        out, _ = expand(doc, {"spec": types[small]}, {"spec": pref})
        parse_virtual_machine(out)


def _fits(it: dict, pref: dict) -> bool:
    from controlplane.quantity import parse_quantity

    need = pref.get("requirements") or {}
    return it["cpu"]["guest"] >= (need.get("cpu") or {}).get("guest", 0) and \
        parse_quantity(it["memory"]["guest"]) >= parse_quantity((need.get("memory") or {}).get("guest", "0"))
