"""KubeVirt `kubevirt.io/v1` objects parsed into typed, validated specs.

VirtualMachine, VirtualMachineInstance and VirtualMachineInstanceMigration dicts (the same
YAML a KubeVirt user applies) become frozen dataclasses with KubeVirt's defaults filled in.
Anything we cannot run is refused with a SpecError naming the field path, so `pvlun apply`
can tell the user exactly which line to fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from controlplane.quantity import parse_quantity
from controlplane.vm_domain import Platform, cpu_model, hook_annotations, platform, scheduling
from controlplane.vm_ignored import Ignored, Notes
from controlplane.vm_images import ContainerImage, KernelBoot, parse_container_disk, parse_kernel_boot
from controlplane.vm_spec_fields import CLOUD_INIT_MAX_BYTES, DEFAULT_MACHINE, DISK_SERIAL, FIRMWARE_SERIAL, NETWORK_NAME, UUID, SpecError
from controlplane.vm_spec_fields import SUBDOMAIN as _SUBDOMAIN
from controlplane.vm_spec_fields import base64_text as _b64
from controlplane.vm_spec_fields import boolean as _bool
from controlplane.vm_spec_fields import integer as _int
from controlplane.vm_spec_fields import items as _list
from controlplane.vm_spec_fields import mac_address, machine_type, matching, one_of
from controlplane.vm_spec_fields import mapping as _map
from controlplane.vm_spec_fields import name as _name
from controlplane.vm_spec_fields import shown
from controlplane.vm_spec_fields import text as _text

API_VERSIONS = ("kubevirt.io/v1", "kubevirt.io/v1alpha3")
RUN_STRATEGIES = ("Always", "RerunOnFailure", "Manual", "Halted")
BUSES = ("virtio", "sata", "scsi")
CDROM_BUSES = ("sata", "scsi")
VOLUME_SOURCES = ("dataVolume", "persistentVolumeClaim", "cloudInitNoCloud", "emptyDisk", "containerDisk")
MODELS = ("virtio", "e1000", "e1000e", "rtl8139")
PROTOCOLS = ("TCP", "UDP")
BINDINGS = ("masquerade", "bridge", "slirp", "passt")  # bridge, slirp, passt: as masquerade
REFUSED_BINDINGS = ("sriov", "macvtap", "binding")
SPEC_KEYS = ("domain", "volumes", "networks", "terminationGracePeriodSeconds", "hostname", "nodeSelector",
             "affinity", "tolerations", "subdomain", "architecture")
VM_KEYS = ("running", "runStrategy", "template", "dataVolumeTemplates")
DOMAIN_KEYS = ("cpu", "memory", "machine", "firmware", "devices", "resources", "features", "clock", "chassis")
DEFAULT_GRACE_SECONDS = 180
EMPTY_DISK_MAX = 256 << 30  # an emptyDisk is a file in the data dir, outside the pool's accounting
__all__ = ["SpecError"]  # re-exported: callers catch it from here


@dataclass(frozen=True)
class Disk:
    name: str
    device: str  # "disk" or "cdrom"
    bus: str
    boot_order: int | None = None
    readonly: bool = False
    serial: str | None = None
    rotation_rate: int | None = None  # 1: a solid-state disk (scsi and sata only)


@dataclass(frozen=True)
class Volume:
    name: str
    source: str  # one of VOLUME_SOURCES
    claim_name: str | None = None  # DataVolume name or PVC claimName
    readonly: bool = False
    capacity: int | None = None  # emptyDisk bytes
    user_data: str | None = None  # cloudInitNoCloud, decoded
    network_data: str | None = None
    container: ContainerImage | None = None  # containerDisk


@dataclass(frozen=True)
class Port:
    port: int
    protocol: str = "TCP"
    name: str | None = None


@dataclass(frozen=True)
class Interface:
    name: str
    binding: str = "masquerade"
    model: str = "virtio"
    mac: str | None = None
    ports: tuple[Port, ...] = ()
    boot_order: int | None = None


@dataclass(frozen=True)
class VmSpec:
    """A VirtualMachineInstance spec: what one QEMU process runs."""

    name: str
    namespace: str = "default"
    cores: int = 1
    sockets: int = 1
    threads: int = 1
    memory: int = 128 << 20
    firmware: str = "bios"  # or "efi"
    secure_boot: bool = False
    machine: str = DEFAULT_MACHINE
    uuid: str | None = None  # firmware.uuid: the guest's SMBIOS system UUID
    serial: str | None = None  # firmware.serial: the guest's SMBIOS system serial
    hostname: str | None = None
    disks: tuple[Disk, ...] = ()
    volumes: tuple[Volume, ...] = ()
    interfaces: tuple[Interface, ...] = ()
    termination_grace_period: int = DEFAULT_GRACE_SECONDS
    platform: Platform = Platform()  # rng, watchdog, features, clock, chassis
    labels: dict[str, str] = field(default_factory=dict, compare=False)
    ignored: tuple[Ignored, ...] = field(default=(), compare=False)  # fields kept but not run: Warning events
    kernel_boot: KernelBoot | None = None  # firmware.kernelBoot

    @property
    def vcpus(self) -> int:
        return self.cores * self.sockets * self.threads

    def volume(self, name: str) -> Volume:
        return next(v for v in self.volumes if v.name == name)


@dataclass(frozen=True)
class VirtualMachine:
    name: str
    namespace: str
    run_strategy: str
    template: VmSpec
    data_volume_templates: tuple[dict, ...] = ()

    @property
    def data_volume_names(self) -> list[str]:
        return [v.claim_name for v in self.template.volumes if v.source == "dataVolume" and v.claim_name]


@dataclass(frozen=True)
class Migration:
    name: str
    namespace: str
    vmi_name: str


# ---------------------------------------------------------------- helpers

def _check_header(obj: Any, kind: str) -> tuple[str, str]:
    if not isinstance(obj, dict):
        raise SpecError("", f"a {kind} must be an object")
    if obj.get("apiVersion") not in API_VERSIONS:
        raise SpecError("apiVersion", f"{shown(obj.get('apiVersion'))} is not {API_VERSIONS[0]}")
    if obj.get("kind") != kind:
        raise SpecError("kind", f"{shown(obj.get('kind'))} is not {kind}")
    meta = _map(obj.get("metadata"), "metadata", required=True)
    name = _name(meta.get("name"), "metadata.name", _SUBDOMAIN, 253)
    namespace = _name(meta.get("namespace") or "default", "metadata.namespace")
    return name, namespace


# ---------------------------------------------------------------- domain pieces

def _parse_disk(raw: Any, path: str, notes: Notes) -> Disk:
    raw = _map(raw, path, required=True)
    notes.check(raw, path, "disk", ("name", "disk", "cdrom", "lun", "floppy", "bootOrder", "serial"))
    name = _name(raw.get("name"), f"{path}.name")
    kinds = [k for k in ("disk", "cdrom", "lun", "floppy") if k in raw]
    if len(kinds) > 1:
        raise SpecError(path, f"only one of disk, cdrom may be set (got {', '.join(kinds)})")
    device = kinds[0] if kinds else "disk"
    if device not in ("disk", "cdrom"):
        raise SpecError(f"{path}.{device}", "unsupported disk type (disk, cdrom)")
    body = _map(raw.get(device), f"{path}.{device}")
    notes.check(body, f"{path}.{device}", "disk.disk", ("bus", "readonly", "rotationRate"))
    allowed = BUSES if device == "disk" else CDROM_BUSES
    bus = one_of(body.get("bus", "virtio" if device == "disk" else "sata"), f"{path}.{device}.bus", allowed, "bus")
    readonly = _bool(body.get("readonly"), f"{path}.{device}.readonly", device == "cdrom")
    boot_order = None if raw.get("bootOrder") is None else _int(raw["bootOrder"], f"{path}.bootOrder", 0)
    serial = raw.get("serial")
    if serial is not None:
        matching(serial, f"{path}.serial", DISK_SERIAL, "1-20 characters of letters, digits, '_', '.', '+' or '-'")
    rotation = body.get("rotationRate")
    if rotation is not None:
        rotation = _int(rotation, f"{path}.{device}.rotationRate", 1, maximum=65534)
        if bus == "virtio" or not (rotation == 1 or rotation >= 1025):
            raise SpecError(f"{path}.{device}.rotationRate", "needs bus scsi or sata, and 1 (a solid-state disk) "
                            "or 1025-65534 revolutions per minute")
    return Disk(name, device, bus, boot_order, readonly, serial, rotation)


def _parse_volume(raw: Any, path: str) -> Volume:
    raw = _map(raw, path, required=True)
    name = _name(raw.get("name"), f"{path}.name")
    sources = [k for k in raw if k != "name"]
    if not sources:
        raise SpecError(path, f"a volume source is required ({', '.join(VOLUME_SOURCES)})")
    if len(sources) > 1:
        raise SpecError(path, f"only one volume source may be set (got {shown(sources, 80)})")
    source = sources[0]
    if source not in VOLUME_SOURCES:
        where = f"{path}.{source}" if isinstance(source, str) and source.isalnum() and len(source) < 40 else path
        raise SpecError(where, f"unsupported volume source {shown(source)} ({', '.join(VOLUME_SOURCES)})")
    body = _map(raw[source], f"{path}.{source}", required=True)
    where = f"{path}.{source}"
    if source == "dataVolume":
        return Volume(name, source, claim_name=_name(body.get("name"), f"{where}.name", _SUBDOMAIN, 253))
    if source == "persistentVolumeClaim":
        return Volume(name, source, claim_name=_name(body.get("claimName"), f"{where}.claimName", _SUBDOMAIN, 253),
                      readonly=_bool(body.get("readOnly"), f"{where}.readOnly", False))
    if source == "emptyDisk":
        if body.get("capacity") is None:
            raise SpecError(f"{where}.capacity", "required")
        try:
            capacity = parse_quantity(body["capacity"])
        except ValueError as exc:
            raise SpecError(f"{where}.capacity", str(exc)) from None
        if not 512 <= capacity <= EMPTY_DISK_MAX:
            raise SpecError(f"{where}.capacity", f"must be from 512 bytes to {EMPTY_DISK_MAX >> 30}Gi "
                            "(a larger local disk belongs in a DataVolume)")
        return Volume(name, source, capacity=capacity)
    if source == "containerDisk":
        return Volume(name, source, readonly=False, container=parse_container_disk(body, where))
    # cloudInitNoCloud
    if "secretRef" in body or "networkDataSecretRef" in body:
        raise SpecError(where, "secretRef is not supported; use userData or userDataBase64")
    if ("userData" in body) == ("userDataBase64" in body):
        raise SpecError(where, "exactly one of userData, userDataBase64 is required")
    user = _text(body["userData"], f"{where}.userData", CLOUD_INIT_MAX_BYTES) if "userData" in body \
        else _b64(body["userDataBase64"], f"{where}.userDataBase64", CLOUD_INIT_MAX_BYTES)
    network = None
    if "networkData" in body and "networkDataBase64" in body:
        raise SpecError(where, "only one of networkData, networkDataBase64 may be set")
    if "networkData" in body:
        network = _text(body["networkData"], f"{where}.networkData", CLOUD_INIT_MAX_BYTES)
    elif "networkDataBase64" in body:
        network = _b64(body["networkDataBase64"], f"{where}.networkDataBase64", CLOUD_INIT_MAX_BYTES)
    return Volume(name, source, user_data=user, network_data=network)


def _parse_interface(raw: Any, path: str, notes: Notes) -> Interface:
    raw = _map(raw, path, required=True)
    name = _name(raw.get("name"), f"{path}.name", NETWORK_NAME)
    bindings = [k for k in BINDINGS + REFUSED_BINDINGS if k in raw]
    if len(bindings) > 1:
        raise SpecError(path, f"only one interface binding may be set (got {', '.join(bindings)})")
    if bindings and bindings[0] in REFUSED_BINDINGS:
        raise SpecError(f"{path}.{bindings[0]}", "unsupported interface binding (masquerade; bridge, slirp and "
                        "passt on the pod network run as masquerade)")
    notes.check(raw, path, "interface", ("name", "model", "macAddress", "ports", "bootOrder") + BINDINGS)
    if bindings and bindings[0] != "masquerade":  # KubeVirt allows these on the pod network
        notes.ignore(f"{path}.{bindings[0]}", "the pod network runs as masquerade (the guest has 10.0.2.2 "
                     "behind the host's address, not an address of its own)")
    model = one_of(raw.get("model", "virtio"), f"{path}.model", MODELS, "model")
    mac = None if raw.get("macAddress") is None else mac_address(raw["macAddress"], f"{path}.macAddress")
    ports = []
    for j, p in enumerate(_list(raw.get("ports"), f"{path}.ports")):
        p = _map(p, f"{path}.ports[{j}]", required=True)
        proto = one_of(p.get("protocol", "TCP"), f"{path}.ports[{j}].protocol", PROTOCOLS, "protocol")
        port_name = None if p.get("name") is None else _name(p["name"], f"{path}.ports[{j}].name", limit=15)
        ports.append(Port(_int(p.get("port"), f"{path}.ports[{j}].port", 0, maximum=65535), proto, port_name))
        if ports[-1].port == 0:
            raise SpecError(f"{path}.ports[{j}].port", "required")
    boot = None if raw.get("bootOrder") is None else _int(raw["bootOrder"], f"{path}.bootOrder", 0)
    return Interface(name, "masquerade", model, mac, tuple(ports), boot)


def _parse_memory(domain: dict, path: str, notes: Notes) -> int:
    mem = _map(domain.get("memory"), f"{path}.memory")
    notes.check(mem, f"{path}.memory", "memory", ("guest",))
    requests = _map(_map(domain.get("resources"), f"{path}.resources").get("requests"), f"{path}.resources.requests")
    if mem.get("guest") is not None:
        where, value = f"{path}.memory.guest", mem["guest"]
    elif requests.get("memory") is not None:
        where, value = f"{path}.resources.requests.memory", requests["memory"]
    else:
        raise SpecError(f"{path}.memory.guest", "required (or resources.requests.memory)")
    try:
        size = parse_quantity(value)
    except ValueError as exc:
        raise SpecError(where, str(exc)) from None
    if size < 16 << 20:
        raise SpecError(where, "must be at least 16Mi")
    return size


def parse_vmi_spec(spec: Any, path: str, name: str, namespace: str, labels: dict | None = None) -> VmSpec:
    """Parse a VirtualMachineInstance spec found at `path` (used for VMIs and VM templates)."""
    spec = _map(spec, path, required=True)
    notes = Notes()
    notes.check(spec, path, "spec", SPEC_KEYS)
    scheduling(spec, path, notes)
    dpath = f"{path}.domain"
    domain = _map(spec.get("domain"), dpath, required=True)
    notes.check(domain, dpath, "domain", DOMAIN_KEYS)
    cpu = _map(domain.get("cpu"), f"{dpath}.cpu")
    notes.check(cpu, f"{dpath}.cpu", "cpu", ("cores", "sockets", "threads", "model"))
    cpu_model(cpu, f"{dpath}.cpu", notes)
    cores = _int(cpu.get("cores"), f"{dpath}.cpu.cores", 1, maximum=64)
    sockets = _int(cpu.get("sockets"), f"{dpath}.cpu.sockets", 1, maximum=16)
    threads = _int(cpu.get("threads"), f"{dpath}.cpu.threads", 1, maximum=8)
    memory = _parse_memory(domain, dpath, notes)

    fw = _map(domain.get("firmware"), f"{dpath}.firmware")
    notes.check(fw, f"{dpath}.firmware", "firmware", ("uuid", "serial", "bootloader", "kernelBoot"))
    kernel_boot = None if fw.get("kernelBoot") is None else parse_kernel_boot(fw["kernelBoot"],
                                                                               f"{dpath}.firmware.kernelBoot")
    uuid = None if fw.get("uuid") is None else matching(fw["uuid"], f"{dpath}.firmware.uuid", UUID, "a UUID")
    serial = None if fw.get("serial") is None else matching(
        fw["serial"], f"{dpath}.firmware.serial", FIRMWARE_SERIAL, "1-64 letters, digits, '_', '.', '+' or '-'")
    boot = _map(fw.get("bootloader"), f"{dpath}.firmware.bootloader")
    notes.check(boot, f"{dpath}.firmware.bootloader", "bootloader", ("bios", "efi"))
    firmware, secure = "bios", False
    if "efi" in boot and "bios" in boot:
        raise SpecError(f"{dpath}.firmware.bootloader", "only one of bios, efi may be set")
    if "bios" in boot:
        notes.check(_map(boot["bios"], f"{dpath}.firmware.bootloader.bios"), f"{dpath}.firmware.bootloader.bios",
                    "bios", ())
    if "efi" in boot:
        efi = _map(boot["efi"], f"{dpath}.firmware.bootloader.efi")
        notes.check(efi, f"{dpath}.firmware.bootloader.efi", "efi", ("secureBoot",))
        firmware, secure = "efi", _bool(efi.get("secureBoot"), f"{dpath}.firmware.bootloader.efi.secureBoot", True)
    machine_raw = _map(domain.get("machine"), f"{dpath}.machine")
    notes.check(machine_raw, f"{dpath}.machine", "machine", ("type",))
    machine = machine_type(machine_raw.get("type"), f"{dpath}.machine.type")

    devices = _map(domain.get("devices"), f"{dpath}.devices")
    extras = platform(domain, devices, dpath, machine, secure, notes)
    volumes = [_parse_volume(v, f"{path}.volumes[{i}]") for i, v in enumerate(_list(spec.get("volumes"), f"{path}.volumes"))]
    disks = [_parse_disk(d, f"{dpath}.devices.disks[{i}]", notes)
             for i, d in enumerate(_list(devices.get("disks"), f"{dpath}.devices.disks"))]
    _unique([v.name for v in volumes], f"{path}.volumes", "name")
    _unique([d.name for d in disks], f"{dpath}.devices.disks", "name")
    by_name = {v.name: v for v in volumes}
    for i, d in enumerate(disks):
        if d.name not in by_name:
            raise SpecError(f"{dpath}.devices.disks[{i}].name", f"no volume named {d.name!r} in {path}.volumes")
    named = {d.name for d in disks}
    disks += [Disk(v.name, "disk", "virtio") for v in volumes if v.name not in named]  # KubeVirt's default disk
    disks = [replace(d, readonly=d.readonly or by_name[d.name].readonly) for d in disks]
    for i, d in enumerate(disks):
        if d.device == "disk" and d.bus == "sata" and d.readonly:
            raise SpecError(f"{dpath}.devices.disks[{i}].disk.bus", "a read-only disk needs bus virtio or scsi")

    ifaces_raw = _list(devices.get("interfaces"), f"{dpath}.devices.interfaces")
    interfaces = [_parse_interface(x, f"{dpath}.devices.interfaces[{i}]", notes) for i, x in enumerate(ifaces_raw)]
    _unique([x.name for x in interfaces], f"{dpath}.devices.interfaces", "name")
    networks = _list(spec.get("networks"), f"{path}.networks")
    net_names = set()
    for i, n in enumerate(networks):
        n = _map(n, f"{path}.networks[{i}]", required=True)
        if "pod" not in n:
            other = next((k for k in n if k != "name"), "none given")
            raise SpecError(f"{path}.networks[{i}]", f"network type {shown(other)} is not supported: pvlun gives a VM "
                            "only the pod network (networks: [{name: default, pod: {}}])")
        notes.check(n, f"{path}.networks[{i}]", "network", ("name", "pod"))
        pod = _map(n["pod"], f"{path}.networks[{i}].pod")
        notes.check(pod, f"{path}.networks[{i}].pod", "network.pod", ())
        net_names.add(_name(n.get("name"), f"{path}.networks[{i}].name", NETWORK_NAME))
    for i, x in enumerate(interfaces):
        if networks and x.name not in net_names:
            raise SpecError(f"{dpath}.devices.interfaces[{i}].name", f"no network named {x.name!r} in {path}.networks")
    if not ifaces_raw and not networks and _bool(devices.get("autoattachPodInterface"),
                                                 f"{dpath}.devices.autoattachPodInterface", True):
        interfaces = [Interface("default")]

    orders = [d.boot_order for d in disks if d.boot_order] + [x.boot_order for x in interfaces if x.boot_order]
    if len(orders) != len(set(orders)):
        raise SpecError(f"{dpath}.devices.disks", "bootOrder values must be unique")

    grace = _int(spec.get("terminationGracePeriodSeconds"), f"{path}.terminationGracePeriodSeconds",
                 DEFAULT_GRACE_SECONDS, minimum=0)
    hostname = spec.get("hostname")
    if hostname is not None:
        hostname = _name(hostname, f"{path}.hostname")
    return VmSpec(name=name, namespace=namespace, cores=cores, sockets=sockets, threads=threads, memory=memory,
                  firmware=firmware, secure_boot=secure, machine=machine, uuid=uuid, serial=serial,
                  hostname=hostname or name,
                  disks=tuple(disks), volumes=tuple(volumes), interfaces=tuple(interfaces),
                  termination_grace_period=grace, platform=extras, labels=dict(labels or {}),
                  ignored=tuple(notes.items), kernel_boot=kernel_boot)


def _unique(names: list[str], path: str, what: str) -> None:
    seen: set[str] = set()
    for i, n in enumerate(names):
        if n in seen:
            raise SpecError(f"{path}[{i}].{what}", f"duplicate {what} {n!r}")
        seen.add(n)


# ---------------------------------------------------------------- top-level objects

def parse_virtual_machine(obj: Any) -> VirtualMachine:
    """Validate a VirtualMachine; SpecError names the offending field."""
    name, namespace = _check_header(obj, "VirtualMachine")
    spec = _map(obj.get("spec"), "spec", required=True)
    notes = Notes()
    notes.check(spec, "spec", "vm", VM_KEYS)
    if "running" in spec and "runStrategy" in spec:
        raise SpecError("spec.running", "running and runStrategy are mutually exclusive")
    if "runStrategy" in spec:
        strategy = spec["runStrategy"]
        if strategy not in RUN_STRATEGIES:
            raise SpecError("spec.runStrategy",
                            f"unsupported run strategy {shown(strategy)} ({', '.join(RUN_STRATEGIES)})")
    else:
        strategy = "Always" if _bool(spec.get("running"), "spec.running", False) else "Halted"
    template = _map(spec.get("template"), "spec.template", required=True)
    labels = _map(_map(template.get("metadata"), "spec.template.metadata").get("labels"), "spec.template.metadata.labels")
    vmi = parse_vmi_spec(template.get("spec"), "spec.template.spec", name, namespace, labels)
    hook_annotations(_map(template.get("metadata"), "spec.template.metadata"), "spec.template.metadata", notes)
    templates = []
    for i, t in enumerate(_list(spec.get("dataVolumeTemplates"), "spec.dataVolumeTemplates")):
        t = _map(t, f"spec.dataVolumeTemplates[{i}]", required=True)
        meta = _map(t.get("metadata"), f"spec.dataVolumeTemplates[{i}].metadata", required=True)
        _name(meta.get("name"), f"spec.dataVolumeTemplates[{i}].metadata.name", _SUBDOMAIN, 253)
        _map(t.get("spec"), f"spec.dataVolumeTemplates[{i}].spec", required=True)
        templates.append(t)
    _unique([t["metadata"]["name"] for t in templates], "spec.dataVolumeTemplates", "metadata.name")
    vmi = replace(vmi, ignored=tuple(notes.items) + vmi.ignored)
    return VirtualMachine(name, namespace, strategy, vmi, tuple(templates))


def parse_virtual_machine_instance(obj: Any) -> VmSpec:
    name, namespace = _check_header(obj, "VirtualMachineInstance")
    labels = _map(_map(obj.get("metadata"), "metadata").get("labels"), "metadata.labels")
    spec = parse_vmi_spec(obj.get("spec"), "spec", name, namespace, labels)
    notes = Notes()
    hook_annotations(obj["metadata"], "metadata", notes)
    return replace(spec, ignored=tuple(notes.items) + spec.ignored) if notes.items else spec


def parse_migration(obj: Any) -> Migration:
    name, namespace = _check_header(obj, "VirtualMachineInstanceMigration")
    spec = _map(obj.get("spec"), "spec", required=True)
    return Migration(name, namespace, _name(spec.get("vmiName"), "spec.vmiName", _SUBDOMAIN, 253))


def parse_object(obj: Any) -> VirtualMachine | VmSpec | Migration:
    """Parse any of the three kinds by its `kind`."""
    kind = obj.get("kind") if isinstance(obj, dict) else None
    parsers = {"VirtualMachine": parse_virtual_machine, "VirtualMachineInstance": parse_virtual_machine_instance,
               "VirtualMachineInstanceMigration": parse_migration}
    if kind not in parsers:
        raise SpecError("kind", f"{shown(kind)} is not one of {', '.join(parsers)}")
    return parsers[kind](obj)
