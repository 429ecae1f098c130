"""Nothing from a VM spec is parsed by QEMU as an option: every string field refuses hostile
values (built here, per field class) with an error naming the field; what passes reaches argv
only in allowed shapes, and QEMU's option strings stay one option whatever a value holds."""

from __future__ import annotations

import copy
import dataclasses
import json
import random
import re
import string
import uuid

import pytest

from controlplane.admission import Refused, load_documents
from virt.qemu_args import DiskAttachment, Throttle, build_qemu_argv
from controlplane.vm_spec import SpecError, parse_virtual_machine

DOMAIN = "spec.template.spec.domain"
TEMPLATE = "spec.template.spec"


def base_vm() -> dict:
    """A VirtualMachine with every string field pvlun reads set to a valid value."""
    return {
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
        "metadata": {"name": "web", "namespace": "apps"},
        "spec": {"runStrategy": "Always", "template": {"spec": {
            "hostname": "web",
            "domain": {
                "machine": {"type": "q35"},
                "memory": {"guest": "64Mi"},
                "firmware": {"uuid": str(uuid.uuid4()), "serial": "SN-1"},
                "devices": {
                    "disks": [{"name": "root", "disk": {"bus": "virtio"}, "serial": "ROOT1", "bootOrder": 1},
                              {"name": "iso", "cdrom": {"bus": "sata"}}],
                    "interfaces": [{"name": "default", "masquerade": {}, "model": "virtio",
                                    "macAddress": "02:00:00:00:00:01",
                                    "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}]}},
            "networks": [{"name": "default", "pod": {}}],
            "volumes": [{"name": "root", "persistentVolumeClaim": {"claimName": "root-pvc"}},
                        {"name": "iso", "dataVolume": {"name": "iso-dv"}},
                        {"name": "cidata", "cloudInitNoCloud": {"userData": "#cloud-config\n",
                                                                "networkData": "version: 2\n"}}]}}},
    }


def with_value(path: str, value) -> dict:
    obj = copy.deepcopy(base_vm())
    keys = re.sub(r"\[(\d+)\]", r".\1", path).split(".")
    node = obj
    for k in keys[:-1]:
        node = node[int(k)] if k.isdigit() else node[k]
    node[int(keys[-1]) if keys[-1].isdigit() else keys[-1]] = value
    return obj


def hostile(valid: str) -> list:
    """What a hostile manifest puts in a string field, built from a valid value of that field."""
    return [valid + ",kernel=/etc/shadow", valid + ",file=/etc/shadow", f"{valid}=on", f"{valid}\n-append x",
            f"{valid}\r", f"{valid}\0", f"{valid} x", f"{valid}\t", "/etc/shadow", "../../etc/shadow",
            'json:{"driver":"file","filename":"/etc/shadow"}', f"{valid};id", f"{valid}'\"", "help", "?",
            valid + "x" * 300, (valid * 300)[:300], "", 7, True, [valid], {"a": valid}]


# field class -> (dotted path of one field of that class, a valid value); every hostile value
# built from the valid one must be refused with that path
FIELDS = {
    "machine type": (f"{DOMAIN}.machine.type", "pc-q35-7.2"),
    "metadata name": ("metadata.name", "web"),
    "disk name": (f"{DOMAIN}.devices.disks[0].name", "root"),
    "volume name": (f"{TEMPLATE}.volumes[1].name", "iso"),
    "interface name": (f"{DOMAIN}.devices.interfaces[0].name", "default"),
    "network name": (f"{TEMPLATE}.networks[0].name", "default"),
    "hostname": (f"{TEMPLATE}.hostname", "web"),
    "claim name": (f"{TEMPLATE}.volumes[0].persistentVolumeClaim.claimName", "root-pvc"),
    "datavolume name": (f"{TEMPLATE}.volumes[1].dataVolume.name", "iso-dv"),
    "port name": (f"{DOMAIN}.devices.interfaces[0].ports[0].name", "http"),
    "disk serial": (f"{DOMAIN}.devices.disks[0].serial", "ROOT1"),
    "firmware serial": (f"{DOMAIN}.firmware.serial", "SN-1"),
    "firmware uuid": (f"{DOMAIN}.firmware.uuid", "6f1c1a52-3c2d-4b7e-9a51-0d7f3c2b9e10"),
    "mac address": (f"{DOMAIN}.devices.interfaces[0].macAddress", "02:00:00:00:00:01"),
    "disk bus": (f"{DOMAIN}.devices.disks[0].disk.bus", "virtio"),
    "cdrom bus": (f"{DOMAIN}.devices.disks[1].cdrom.bus", "sata"),
    "nic model": (f"{DOMAIN}.devices.interfaces[0].model", "e1000"),
    "port protocol": (f"{DOMAIN}.devices.interfaces[0].ports[0].protocol", "UDP"),
}
# fields where the empty string means "not set" (KubeVirt's defaults), not an error
EMPTY_IS_DEFAULT = {"machine type"}
# "help" is a fine name or serial: those only ever follow a key (`serial=help`, `file-help`);
# a machine type stands alone as an option's head, where QEMU would print its help
WORDS_ALLOWED = {c for c in FIELDS if "name" in c or "serial" in c}


def test_the_base_manifest_is_valid_and_parses_every_field():
    spec = parse_virtual_machine(base_vm()).template
    assert spec.machine == "q35" and spec.serial == "SN-1" and spec.interfaces[0].ports[0].name == "http"


@pytest.mark.parametrize("field_class", sorted(FIELDS))
def test_hostile_values_are_refused_naming_the_field(field_class):
    path, valid = FIELDS[field_class]
    parse_virtual_machine(with_value(path, valid))  # the valid value itself passes
    for value in hostile(valid):
        if (value == "" and field_class in EMPTY_IS_DEFAULT) or (value == "help" and field_class in WORDS_ALLOWED):
            continue
        with pytest.raises(SpecError) as err:
            parse_virtual_machine(with_value(path, value))
            pytest.fail(f"{field_class} accepted {value!r}")
        assert err.value.path == path, (field_class, value, str(err.value))
        assert len(str(err.value)) < 400  # never the whole hostile input echoed back


@pytest.mark.parametrize("field_class", ["machine type", "mac address", "disk serial"])
def test_pvlun_apply_refuses_them_with_one_line_naming_the_field(field_class):
    import yaml

    path, valid = FIELDS[field_class]
    document = yaml.safe_dump(with_value(path, valid + ",kernel=/etc/shadow"))
    with pytest.raises(Refused) as err:
        load_documents(document)
    assert path in str(err.value) and "\n" not in str(err.value)


def test_multicast_mac_and_unknown_firmware_boot_are_refused():
    with pytest.raises(SpecError, match="multicast"):
        parse_virtual_machine(with_value(f"{DOMAIN}.devices.interfaces[0].macAddress", "01:00:5e:00:00:01"))
    with pytest.raises(SpecError) as err:
        parse_virtual_machine(with_value(f"{DOMAIN}.firmware.kernelBoot", {"kernelPath": "/etc/shadow"}))
    assert err.value.path == f"{DOMAIN}.firmware.kernelBoot.container"  # KubeVirt's kernelBoot takes a container


@pytest.mark.parametrize("machine", [None, "", "q35", "pc", "pc-q35-7.2", "pc-i440fx-2.12", "pc-q35-4.0.1",
                                     "microvm"])
def test_machine_types_this_qemu_offers_are_accepted_and_empty_means_q35(machine):
    obj = base_vm()
    if machine is None:
        del obj["spec"]["template"]["spec"]["domain"]["machine"]
    else:
        obj["spec"]["template"]["spec"]["domain"]["machine"]["type"] = machine
    assert parse_virtual_machine(obj).template.machine == (machine or "q35")


def test_cloud_init_data_over_kubevirts_limit_is_refused():
    big = "#cloud-config\n" + "#" * 2100
    for key in ("userData", "networkData"):
        path = f"{TEMPLATE}.volumes[2].cloudInitNoCloud.{key}"
        with pytest.raises(SpecError) as err:
            parse_virtual_machine(with_value(path, big))
        assert err.value.path == path and "2048 byte limit" in str(err.value)


@pytest.mark.parametrize("value", ["-1", "1e9", "12,x=1", " 5", "5\n", "0x10", "٣", str(1 << 60), 7])
def test_hostile_volume_qos_values_never_reach_a_throttle_group(value):
    with pytest.raises(ValueError, match="maxIOPS"):
        Throttle.from_volume_context({"maxIOPS": value})


# ---------------------------------------------------------------- what reaches argv

FLAGS = {"-name", "-nodefaults", "-no-user-config", "-display", "-sandbox", "-accel", "-machine", "-cpu", "-smp",
         "-m", "-rtc", "-qmp", "-uuid", "-smbios", "-chardev", "-serial", "-device", "-blockdev", "-object",
         "-netdev", "-boot", "-incoming", "-global", "-S", "-add-fd", "-mon"}
# one keyval part: a key and a value of harmless characters (a spec value never needs escaping)
PART = re.compile(r"[a-z][a-z0-9.-]*(=[A-Za-z0-9_.:/+-]*)?|[A-Za-z0-9_.:/+-]+")


def random_name(rng: random.Random, limit: int) -> str:
    """A valid DNS label of random length, up to `limit` (63 for disk names: longer than QEMU's node names)."""
    size = rng.randint(1, limit)
    middle = "".join(rng.choice(string.ascii_lowercase + string.digits + "-") for _ in range(max(0, size - 2)))
    return (rng.choice(string.ascii_lowercase) + middle + rng.choice(string.digits))[:size]


def random_vm(rng: random.Random) -> dict:
    """A valid VirtualMachine whose names, serials and MACs are random (and often as long as allowed)."""
    obj = base_vm()
    tmpl = obj["spec"]["template"]["spec"]
    dev = tmpl["domain"]["devices"]
    names = [random_name(rng, 63) for _ in range(3)]
    while len(set(names)) < 3:
        names = [random_name(rng, 63) for _ in range(3)]
    obj["metadata"]["name"] = ".".join(random_name(rng, 40) for _ in range(3))
    tmpl["hostname"] = random_name(rng, 63)
    tmpl["domain"]["machine"]["type"] = rng.choice(["q35", "pc", f"pc-q35-{rng.randint(2, 7)}.{rng.randint(0, 12)}"])
    tmpl["domain"]["firmware"]["serial"] = rng.choice(string.ascii_letters) + "".join(
        rng.choice(string.ascii_letters + string.digits + "_.+-") for _ in range(rng.randint(0, 63)))
    dev["disks"][0].update(name=names[0], serial="".join(rng.choice(string.ascii_letters + "_.+-")
                                                          for _ in range(rng.randint(1, 20))))
    dev["disks"][1]["name"] = names[1]
    dev["interfaces"][0].update(name=names[2], model=rng.choice(["virtio", "e1000", "e1000e", "rtl8139"]),
                                macAddress="02:" + ":".join(f"{rng.randint(0, 255):02x}" for _ in range(5)))
    tmpl["networks"][0]["name"] = names[2]
    tmpl["volumes"][0]["name"], tmpl["volumes"][1]["name"] = names[0], names[1]
    tmpl["volumes"][2]["cloudInitNoCloud"]["userData"] = "#cloud-config\nruncmd: [\"-kernel\", \"/etc/shadow,x=y\"]\n"
    return obj


def keyval_parts(element: str) -> list[str]:
    """An option string split where QEMU splits it (single commas; doubled ones are escapes)."""
    return re.split(r"(?<!,),(?!,)", element)


def argv_for(spec, paths: dict[str, str]) -> list[str]:
    disks = {d.name: DiskAttachment(paths[d.name], throttle=Throttle(7, 1)) for d in spec.disks}
    return build_qemu_argv(spec, disks, accel="tcg", qmp_fd=3, serial_fd=4, console_fd=5, agent_fd=9,
                           net_fds={i.name: 6 + n for n, i in enumerate(spec.interfaces)})


@pytest.mark.parametrize("seed", range(20))  # fixed seeds: the same ids on every xdist worker, reproducible failures
def test_every_argv_element_from_a_valid_spec_is_in_the_allow_list(seed):
    rng = random.Random(seed)
    spec = parse_virtual_machine(random_vm(rng)).template
    paths = {d.name: f"/run/vm/volumes/{i}" for i, d in enumerate(spec.disks)}
    argv = argv_for(spec, paths)
    assert argv[0] == "qemu-system-x86_64" and "-sandbox" in argv
    user_data = spec.volume("cidata").user_data
    flag = None
    for element in argv[1:]:
        assert user_data.strip() not in element  # cloud-init data goes into the seed image, never argv
        if flag is None:
            assert element in FLAGS, (seed, element)
            flag = element if element not in ("-nodefaults", "-no-user-config", "-S") else None
            continue
        if flag == "-blockdev":
            node = json.loads(element)
            assert set(node) <= {"driver", "filename", "node-name", "read-only", "discard", "cache", "aio", "file",
                                 "throttle-group"}, (seed, node)
            assert node.get("filename", paths[spec.disks[0].name]) in paths.values()
            assert all(len(node[k]) <= 31 for k in ("node-name", "file") if k in node)  # QEMU's node-name limit
        else:
            for part in keyval_parts(element.removeprefix("unix:")):
                assert PART.fullmatch(part), (seed, flag, element, part)
        flag = None


def test_option_strings_stay_one_option_even_if_a_hostile_value_got_past_the_parser():
    """Defence in depth: a VmSpec made without the parser, with hostile text in every string."""
    spec = parse_virtual_machine(base_vm()).template
    evil = ",kernel=/etc/shadow,id=x"
    disks = tuple(dataclasses.replace(d, name=d.name + evil, serial=(d.serial or "s") + evil) for d in spec.disks)
    volumes = tuple(dataclasses.replace(v, name=v.name + evil) for v in spec.volumes)
    ifaces = tuple(dataclasses.replace(i, name=i.name + evil, mac="02:00:00:00:00:01" + evil) for i in spec.interfaces)
    hostile_spec = dataclasses.replace(spec, name="web" + evil, namespace="apps" + evil, machine="q35" + evil,
                                       hostname="web" + evil, serial="SN" + evil, disks=disks, volumes=volumes,
                                       interfaces=ifaces)
    paths = {d.name: f"/run/vm,x=y/{i}" for i, d in enumerate(hostile_spec.disks)}
    argv = argv_for(hostile_spec, paths)
    for flag, element in zip(argv, argv[1:]):
        if flag in ("-blockdev", "-sandbox", "-uuid", "-m"):
            continue
        keys = [p.split("=", 1)[0] for p in keyval_parts(element.removeprefix("unix:"))]
        assert "kernel" not in keys and keys.count("id") <= 1, (flag, element)
    machine = argv[argv.index("-machine") + 1]
    assert machine == "q35,,kernel=/etc/shadow,,id=x"  # one (unknown) machine type: QEMU refuses it
