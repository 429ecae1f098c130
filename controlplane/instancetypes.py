"""KubeVirt's instance types and preferences (`instancetype.kubevirt.io/v1beta1`) applied to a
VirtualMachine: a pure function from the VM, its instancetype and its preference to the VMI
spec the VM runs, as KubeVirt's virt-controller expands them.

The instancetype decides (cpu.guest, memory.guest, ...): a VM that also sets one of those
fields is refused, naming the field, as KubeVirt refuses it. The preference only fills in
what the VM leaves out (disk bus, interface model, machine type, firmware, ...). Fields of
either that pvlun cannot run (vCPU pinning, hugepages, GPUs, TPM, ...) are not applied: each
comes back as a warning naming the field, never dropped silently.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from controlplane.quantity import parse_quantity
from controlplane.vm_spec_fields import SUBDOMAIN, SpecError, items, mapping, name, shown

API_VERSION = "instancetype.kubevirt.io/v1beta1"
OLDER_API_VERSIONS = ("instancetype.kubevirt.io/v1alpha2", "instancetype.kubevirt.io/v1alpha1")  # still served
INSTANCETYPE_KINDS = ("VirtualMachineClusterInstancetype", "VirtualMachineInstancetype")  # the default first
PREFERENCE_KINDS = ("VirtualMachineClusterPreference", "VirtualMachinePreference")
CLUSTER_KINDS = ("VirtualMachineClusterInstancetype", "VirtualMachineClusterPreference")
KINDS = INSTANCETYPE_KINDS + PREFERENCE_KINDS
TOPOLOGIES = {"sockets": "sockets", "preferSockets": "sockets", "cores": "cores", "preferCores": "cores",
              "threads": "threads", "preferThreads": "threads", "spread": "spread", "preferSpread": "spread",
              "any": "sockets", "preferAny": "sockets"}
TEMPLATE = "spec.template.spec"
# The objects and lists expansion walks, checked to be what they should be before it does (a list
# holds one shape, for each item); their leaves are the VM parser's and the admission's to check.
VMI_SHAPE = {"domain": {"cpu": {}, "memory": {}, "resources": {"requests": {}, "limits": {}}, "machine": {},
                        "firmware": {}, "features": {}, "clock": {},
                        "devices": {"disks": [{"disk": {}, "cdrom": {}}], "interfaces": [{}]}}}
INSTANCETYPE_SHAPE = {"cpu": {}, "memory": {}}
PREFERENCE_SHAPE = {"cpu": {"spreadOptions": {}}, "devices": {}, "features": {}, "firmware": {"preferredEfi": {}},
                    "machine": {}, "clock": {"preferredClockOffset": {}, "preferredTimer": {}},
                    "requirements": {"cpu": {}, "memory": {}}}


def _child(tree: dict, key: str) -> dict:
    """tree[key], made an empty object when absent or null (a shape checked before)."""
    if tree.get(key) is None:
        tree[key] = {}
    return tree[key]


def _fill(tree: dict, key: str, value: Any) -> None:
    """tree[key] = value where the VM leaves it out (absent or null): a preference's way."""
    if tree.get(key) is None:
        tree[key] = value


def _check_shapes(tree: dict, shape: dict, path: str) -> None:
    """SpecError names the first field of `shape` in `tree` that is not an object (or a list of them)."""
    for key, sub in shape.items():
        if tree.get(key) is None:
            continue
        where = f"{path}.{key}" if path else key
        if isinstance(sub, list):
            for i, item in enumerate(items(tree[key], where)):
                _check_shapes(mapping(item, f"{where}[{i}]", required=True), sub[0], f"{where}[{i}]")
        else:
            _check_shapes(mapping(tree[key], where), sub, where)


@dataclass(frozen=True)
class Matcher:
    """A VM's spec.instancetype or spec.preference: which object, where."""

    field: str  # "spec.instancetype" or "spec.preference"
    kind: str
    name: str

    def namespace(self, vm_namespace: str) -> str:
        """Where the object lives: "" for the cluster-scoped kinds, else the VM's namespace."""
        return "" if self.kind in CLUSTER_KINDS else vm_namespace


def _matcher(spec: dict, field: str, kinds: tuple[str, ...]) -> Matcher | None:
    raw = mapping(spec.get(field), f"spec.{field}")
    if not raw:
        return None
    for unsupported in ("inferFromVolume", "inferFromVolumeFailurePolicy"):
        if raw.get(unsupported) is not None:
            raise SpecError(f"spec.{field}.{unsupported}", "unsupported (name the object with "
                                                            f"spec.{field}.name)")
    kind = raw.get("kind") or kinds[0]
    by_lower = {k.lower(): k for k in kinds} | {k.lower() + "s": k for k in kinds}
    if not isinstance(kind, str) or kind.lower() not in by_lower:
        raise SpecError(f"spec.{field}.kind", f"{shown(kind)} is not one of {', '.join(kinds)}")
    return Matcher(f"spec.{field}", by_lower[kind.lower()],
                   name(raw.get("name"), f"spec.{field}.name", SUBDOMAIN, 253))


def matchers_of(vm: dict) -> tuple[Matcher | None, Matcher | None]:
    """The VM's instancetype and preference matchers (kind defaulted as KubeVirt does)."""
    spec = mapping(mapping(vm, "VirtualMachine").get("spec"), "spec")
    return _matcher(spec, "instancetype", INSTANCETYPE_KINDS), _matcher(spec, "preference", PREFERENCE_KINDS)


# ------------------------------------------------------------------ the instancetype

# instancetype fields pvlun's QEMU cannot honour: warned about, not applied
NOT_RUN = {
    "cpu.model": "the guest gets QEMU's host-passthrough (or TCG's max) CPU model",
    "cpu.dedicatedCPUPlacement": "pvlun does not pin vCPUs to host CPUs",
    "cpu.isolateEmulatorThread": "pvlun does not pin QEMU's emulator thread",
    "cpu.numa": "pvlun gives the guest no NUMA topology",
    "cpu.realtime": "pvlun does not run real-time vCPUs",
    "cpu.maxSockets": "pvlun does not hot-plug vCPUs",
    "memory.hugepages": "pvlun backs guest memory with ordinary pages",
    "memory.maxGuest": "pvlun does not hot-plug memory",
    "ioThreadsPolicy": "pvlun's QEMU runs its disks in the main loop",
    "gpus": "pvlun passes no GPUs through",
    "hostDevices": "pvlun passes no host devices through",
    "launchSecurity": "pvlun does not run confidential (SEV) guests",
    "annotations": "pvlun copies no annotations onto the VMI",
    "schedulerName": "pvlun's VMIs are placed by pvlun (embedded) or the default scheduler",
}


def _at(where: str, field: str) -> str:
    """A field of the instancetype or preference `where` names ("" when checking the object itself)."""
    return f"{where} {field}" if where else field


def _get(tree: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(tree, dict):
            return None
        tree = tree.get(part)
    return tree


# the VM's cpu fields that conflict only when the instancetype sets them too (sockets, cores and threads always do)
CPU_SET_BY_BOTH = {"model": "model", "dedicatedCpuPlacement": "dedicatedCPUPlacement",
                   "isolateEmulatorThread": "isolateEmulatorThread", "numa": "numa", "realtime": "realtime"}


def _conflicts(domain: dict, spec: dict, it: dict) -> list[str]:
    """The VM's fields the instancetype also sets (KubeVirt's conflict rules: any topology, any
    memory, CPU and memory requests or limits, and what both set)."""
    cpu, it_cpu = domain.get("cpu") or {}, it.get("cpu") or {}
    resources = domain.get("resources") or {}
    found = [f"domain.resources.{k}.cpu" for k in ("requests", "limits") if "cpu" in (resources.get(k) or {})]
    found += [f"domain.cpu.{f}" for f in ("sockets", "cores", "threads") if cpu.get(f)]
    found += [f"domain.cpu.{f}" for f, it_field in CPU_SET_BY_BOTH.items()
              if cpu.get(f) and it_cpu.get(it_field) not in (None, False)]
    if domain.get("memory") is not None:
        found.append("domain.memory")
    found += [f"domain.resources.{k}.memory" for k in ("requests", "limits") if "memory" in (resources.get(k) or {})]
    for field, vmi_field in (("ioThreadsPolicy", "domain.ioThreadsPolicy"), ("launchSecurity", "domain.launchSecurity"),
                             ("gpus", "domain.devices.gpus"), ("hostDevices", "domain.devices.hostDevices"),
                             ("nodeSelector", "nodeSelector"), ("schedulerName", "schedulerName")):
        if it.get(field) and _get(spec, vmi_field):
            found.append(vmi_field)
    return [f"{TEMPLATE}.{f}" for f in found]


def _topology(guest: int, preference: dict, where: str) -> dict[str, int]:
    """cpu.guest vCPUs as sockets, cores or threads, as the preference's preferredCPUTopology says."""
    pcpu = preference.get("cpu") or {}
    wanted = pcpu.get("preferredCPUTopology") or "sockets"
    topology = TOPOLOGIES.get(wanted) if isinstance(wanted, str) else None
    if topology is None:
        raise SpecError(_at(where, "spec.cpu.preferredCPUTopology"),
                        f"{shown(pcpu.get('preferredCPUTopology'))} is not one of {', '.join(TOPOLOGIES)}")
    one = {"sockets": 1, "cores": 1, "threads": 1}
    if topology != "spread":
        return one | {topology: guest}
    spread = pcpu.get("spreadOptions") or {}
    ratio = spread.get("ratio") or preference.get("preferSpreadSocketToCoreRatio") or 2
    across = spread.get("across") or "SocketsCores"
    shapes = {"SocketsCores": ("cores", ratio, "sockets", guest / ratio if isinstance(ratio, int) else 0),
              "CoresThreads": ("threads", ratio, "cores", guest / ratio if isinstance(ratio, int) else 0),
              "SocketsCoresThreads": ("cores", ratio, "sockets", guest / 2 / ratio if isinstance(ratio, int) else 0)}
    if across not in shapes:
        raise SpecError(_at(where, "spec.cpu.spreadOptions.across"),
                        f"{shown(across)} is not one of {', '.join(shapes)}")
    if guest == 1:
        return one
    inner, inner_count, outer, outer_count = shapes[across]
    if not isinstance(ratio, int) or ratio < 1 or outer_count < 1 or outer_count != int(outer_count):
        raise SpecError(_at(where, "spec.cpu.spreadOptions.ratio"),
                        f"{guest} vCPUs cannot be spread across {across} with ratio {shown(ratio)}")
    return one | {inner: inner_count, outer: int(outer_count)} | (
        {"threads": 2} if across == "SocketsCoresThreads" else {})


def _apply_instancetype(spec: dict, it: dict, preference: dict, where: str, pref_where: str,
                        warnings: list[str]) -> None:
    domain = _child(spec, "domain")
    conflicts = _conflicts(domain, spec, it)
    if conflicts:
        raise SpecError(conflicts[0], f"VM field(s) {', '.join(conflicts)} conflicts with selected instance type "
                                      f"({where}): leave them out, or drop spec.instancetype")
    cpu, memory = mapping(it.get("cpu"), _at(where, "spec.cpu")), mapping(it.get("memory"), _at(where, "spec.memory"))
    guest = cpu.get("guest")
    if not isinstance(guest, int) or isinstance(guest, bool) or guest < 1:
        raise SpecError(_at(where, "spec.cpu.guest"), f"must be a positive integer, not {shown(guest)}")
    if memory.get("guest") is None:
        raise SpecError(_at(where, "spec.memory.guest"), "required")
    try:
        size = parse_quantity(memory["guest"])
    except ValueError as exc:
        raise SpecError(_at(where, "spec.memory.guest"), str(exc)) from None
    _child(domain, "cpu").update(_topology(guest, preference, pref_where))
    _child(domain, "memory")["guest"] = memory["guest"]
    percent = memory.get("overcommitPercent")
    if percent:  # KubeVirt asks the scheduler for less than the guest has
        if not isinstance(percent, int) or not 0 < percent <= 100:
            raise SpecError(_at(where, "spec.memory.overcommitPercent"), f"must be 0-100, not {shown(percent)}")
        _child(_child(domain, "resources"), "requests")["memory"] = str(size * (100 - percent) // 100)
    if it.get("nodeSelector"):
        spec["nodeSelector"] = copy.deepcopy(it["nodeSelector"])
    warnings += [f"{_at(where, 'spec.' + field)} is ignored: {why}" for field, why in NOT_RUN.items()
                 if _get(it, field) not in (None, False, "")]


def _requirements(spec: dict, preference: dict, where: str) -> None:
    """A preference's requirements: the VM (or its instancetype) must give at least this much."""
    required = preference.get("requirements") or {}
    domain = spec.get("domain") or {}
    cpu = domain.get("cpu") or {}
    counts = [cpu.get(f) if isinstance(cpu.get(f), int) and cpu.get(f) > 0 else 1
              for f in ("sockets", "cores", "threads")]
    vcpus = counts[0] * counts[1] * counts[2]
    need_cpu = (required.get("cpu") or {}).get("guest")
    if isinstance(need_cpu, int) and vcpus < need_cpu:
        raise SpecError(f"{TEMPLATE}.domain.cpu", f"{vcpus} vCPUs are fewer than the {need_cpu} the preference "
                                                  f"requires ({_at(where, 'spec.requirements.cpu.guest')})")
    need_memory = (required.get("memory") or {}).get("guest")
    have = (domain.get("memory") or {}).get("guest") or ((domain.get("resources") or {}).get("requests") or {}).get(
        "memory")
    try:
        short = need_memory is not None and have is not None and parse_quantity(have) < parse_quantity(need_memory)
    except ValueError:
        short = False  # a malformed size is the VM parser's to name
    if short:
        raise SpecError(f"{TEMPLATE}.domain.memory.guest", f"{have} is less than the {need_memory} the preference "
                                                           f"requires ({_at(where, 'spec.requirements.memory.guest')})")


# ------------------------------------------------------------------ the preference

DEVICE_DEFAULTS = {  # preferredX -> the devices field it fills in when the VM leaves it out
    "preferredAutoattachGraphicsDevice": "autoattachGraphicsDevice",
    "preferredAutoattachMemBalloon": "autoattachMemBalloon",
    "preferredAutoattachPodInterface": "autoattachPodInterface",
    "preferredAutoattachSerialConsole": "autoattachSerialConsole",
    "preferredRng": "rng",
}
FEATURES = {"preferredAcpi": "acpi", "preferredApic": "apic", "preferredHyperv": "hyperv", "preferredKvm": "kvm",
            "preferredPvspinlock": "pvspinlock", "preferredSmm": "smm"}
PREFERENCE_NOT_RUN = {  # preference fields pvlun's QEMU cannot honour
    "devices.preferredAutoattachInputDevice": "pvlun attaches no input devices",
    "devices.preferredDisableHotplug": "pvlun does not hot-plug volumes",
    "devices.preferredVirtualGPUOptions": "pvlun passes no vGPUs through",
    "devices.preferredSoundModel": "pvlun attaches no sound device",
    "devices.preferredUseVirtioTransitional": "pvlun attaches modern virtio devices",
    "devices.preferredInputBus": "pvlun attaches no input devices",
    "devices.preferredInputType": "pvlun attaches no input devices",
    "devices.preferredLunBus": "pvlun has no lun disks",
    "devices.preferredDiskDedicatedIoThread": "pvlun's QEMU runs its disks in the main loop",
    "devices.preferredDiskCache": "pvlun chooses the cache mode itself (none on direct I/O)",
    "devices.preferredDiskIO": "pvlun chooses the I/O mode itself",
    "devices.preferredDiskBlockSize": "pvlun keeps the volume's block size",
    "devices.preferredBlockMultiQueue": "pvlun gives virtio-blk its default queues",
    "devices.preferredNetworkInterfaceMultiQueue": "pvlun gives virtio-net one queue",
    "devices.preferredTPM": "pvlun attaches no TPM",
    "devices.preferredInterfaceMasquerade": "pvlun's pod network is always masquerade",
    "preferredSubdomain": "pvlun sets no guest DNS subdomain",
    "preferredArchitecture": "pvlun runs the host's architecture",
    "volumes.preferredStorageClassName": "pvlun does not rewrite dataVolumeTemplates",
    "annotations": "pvlun copies no annotations onto the VMI",
    "cpu.preferredCPUFeatures": "the guest gets QEMU's host-passthrough (or TCG's max) CPU model",
}


def _efi(firmware: dict) -> dict | None:
    """The bootloader the firmware preferences ask for (None: no preference)."""
    if firmware.get("preferredEfi") is not None:
        return {"efi": copy.deepcopy(firmware["preferredEfi"])}
    if firmware.get("preferredUseEfi"):
        return {"efi": {"secureBoot": bool(firmware.get("preferredUseSecureBoot", False))}}
    if firmware.get("preferredUseBios"):
        return {"bios": {"useSerial": True} if firmware.get("preferredUseBiosSerial") else {}}
    return None


def _apply_preference(spec: dict, preference: dict, where: str, warnings: list[str]) -> None:
    domain = _child(spec, "domain")
    devices = _child(domain, "devices")
    pdev = preference.get("devices") or {}
    for disk in devices.get("disks") or []:  # shapes checked: objects
        if disk.get("cdrom") is not None:
            if pdev.get("preferredCdromBus"):
                _fill(disk["cdrom"], "bus", pdev["preferredCdromBus"])
        elif pdev.get("preferredDiskBus") and "lun" not in disk:
            _fill(_child(disk, "disk"), "bus", pdev["preferredDiskBus"])
    if pdev.get("preferredInterfaceModel"):
        for interface in devices.get("interfaces") or []:
            _fill(interface, "model", pdev["preferredInterfaceModel"])
    for preferred, field in DEVICE_DEFAULTS.items():
        if pdev.get(preferred) is not None:
            _fill(devices, field, copy.deepcopy(pdev[preferred]))
    machine = (preference.get("machine") or {}).get("preferredMachineType")
    if machine and not (domain.get("machine") or {}).get("type"):
        _child(domain, "machine")["type"] = machine
    bootloader = _efi(preference.get("firmware") or {})
    if bootloader is not None and not (domain.get("firmware") or {}).get("bootloader"):
        _child(domain, "firmware")["bootloader"] = bootloader
    pfeatures = preference.get("features") or {}
    for preferred, field in FEATURES.items():
        if pfeatures.get(preferred) is not None:
            _fill(_child(domain, "features"), field, copy.deepcopy(pfeatures[preferred]))
    pclock = preference.get("clock") or {}
    if pclock and not domain.get("clock"):
        clock = copy.deepcopy(pclock.get("preferredClockOffset") or {})
        if pclock.get("preferredTimer"):
            clock["timer"] = copy.deepcopy(pclock["preferredTimer"])
        domain["clock"] = clock
    grace = preference.get("preferredTerminationGracePeriodSeconds")
    if grace is not None:
        _fill(spec, "terminationGracePeriodSeconds", grace)
    warnings += [f"{_at(where, 'spec.' + field)} is ignored: {why}" for field, why in PREFERENCE_NOT_RUN.items()
                 if _get(preference, field) not in (None, False, "")]


# ------------------------------------------------------------------ together

def expand(vm: dict, instancetype: dict | None, preference: dict | None) -> tuple[dict, list[str]]:
    """The VM with its instancetype and preference applied to spec.template.spec (and the
    matchers removed, so expanding again changes nothing), and the warnings about fields
    not applied. `instancetype`/`preference` are the whole objects the matchers name (None
    when the VM names none); SpecError names a conflicting field."""
    it_matcher, pref_matcher = matchers_of(vm)
    out = copy.deepcopy(vm)
    spec = out["spec"] = mapping(out.get("spec"), "spec")
    template = spec["template"] = mapping(spec.get("template"), "spec.template")
    vmi = template.get("spec")
    if vmi is None:
        vmi = template["spec"] = {}
    elif not isinstance(vmi, dict):
        raise SpecError(TEMPLATE, f"must be an object, not {type(vmi).__name__}")
    _check_shapes(vmi, VMI_SHAPE, TEMPLATE)
    warnings: list[str] = []
    pref_where = f"{pref_matcher.kind} {pref_matcher.name}" if pref_matcher else ""
    pref_spec = mapping((preference or {}).get("spec"), _at(pref_where, "spec")) if pref_matcher else {}
    _check_shapes(pref_spec, PREFERENCE_SHAPE, _at(pref_where, "spec"))
    if it_matcher is not None:
        it_where = f"{it_matcher.kind} {it_matcher.name}"
        it_spec = mapping((instancetype or {}).get("spec"), _at(it_where, "spec"), required=True)
        _check_shapes(it_spec, INSTANCETYPE_SHAPE, _at(it_where, "spec"))
        _apply_instancetype(vmi, it_spec, pref_spec, it_where, pref_where, warnings)
    if pref_matcher is not None:
        _apply_preference(vmi, pref_spec, pref_where, warnings)
        _requirements(vmi, pref_spec, pref_where)
    spec.pop("instancetype", None)
    spec.pop("preference", None)
    return out, warnings


def check_object(obj: dict) -> None:
    """An instancetype or preference as `apply` takes it: what every VM naming it needs
    (an instancetype's cpu.guest and memory.guest, a preference's known CPU topology)."""
    spec = mapping(obj.get("spec"), "spec", required=obj.get("kind") in INSTANCETYPE_KINDS)
    instancetype = obj.get("kind") in INSTANCETYPE_KINDS
    _check_shapes(spec, INSTANCETYPE_SHAPE if instancetype else PREFERENCE_SHAPE, "spec")
    if instancetype:
        _apply_instancetype({}, spec, {}, "", "", [])
    else:
        _topology(1, spec, "")


def placeholder(kind: str) -> dict:
    """An instancetype or preference that sets only what every one of its kind must (cpu and
    memory), to check at apply what a VM's own fields may be before the real object is read."""
    if kind in PREFERENCE_KINDS:
        return {"spec": {}}
    return {"spec": {"cpu": {"guest": 1}, "memory": {"guest": "1Gi"}}}
