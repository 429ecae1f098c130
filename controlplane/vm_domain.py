"""The domain fields KubeVirt's examples use beyond disks, volumes and interfaces: devices
(`rng`, `watchdog`, the `autoattach*` switches), `features`, `clock`, `chassis`, `cpu.model`
and the VMI spec's scheduling fields — each parsed into what QEMU runs
(virt/qemu_args.py) or noted as ignored (controlplane/vm_ignored.py), with KubeVirt's
defaults where a field is left out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from controlplane.vm_ignored import SCHEDULING, Notes
from controlplane.vm_spec_fields import SpecError, shown
from controlplane.vm_spec_fields import boolean as _bool
from controlplane.vm_spec_fields import mapping as _map
from controlplane.vm_spec_fields import name as _name
from controlplane.vm_spec_fields import one_of

WATCHDOG_ACTIONS = ("poweroff", "reset", "shutdown")  # KubeVirt's; QEMU's -action watchdog= of the same names
CPU_MODELS_RUN = ("host-passthrough", "host-model")  # KVM runs `-cpu host`
SMBIOS_VALUE = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ,_.+/:-]{0,63}")  # commas: _keyval doubles them
CHASSIS_FIELDS = ("manufacturer", "version", "serial", "asset", "sku")
HOOK_SIDECARS = "hooks.kubevirt.io/hookSidecars"
RESOURCE_NAME = re.compile(r"[A-Za-z0-9][-A-Za-z0-9_./]{0,252}")
PC_MACHINES = re.compile(r"pc|q35|pc-(q35|i440fx)-.*")  # the machines with SMM and HPET switches

DEVICE_KEYS = ("disks", "interfaces", "autoattachPodInterface", "rng", "watchdog", "autoattachSerialConsole",
               "logSerialConsole", "disableHotplug", "autoattachGraphicsDevice", "autoattachMemBalloon",
               "autoattachInputDevice", "autoattachVSOCK", "networkInterfaceMultiqueue", "blockMultiQueue",
               "useVirtioTransitional")
# a device switch → (the value pvlun runs anyway, what the guest gets instead)
DEVICE_FLAGS = {
    "autoattachSerialConsole": (True, "the serial console is always attached (its output is the VM's log)"),
    "logSerialConsole": (True, "the serial console is always logged"),
    "autoattachGraphicsDevice": (False, "no graphics device (no VNC: use the serial console)"),
    "autoattachMemBalloon": (False, "no memory balloon"),
    "autoattachInputDevice": (False, "no input device"),
    "autoattachVSOCK": (False, "no vsock device"),
    "networkInterfaceMultiqueue": (False, "one queue per interface"),
    "blockMultiQueue": (False, "one queue per disk"),
    "useVirtioTransitional": (False, "modern virtio devices only"),
}


@dataclass(frozen=True)
class Watchdog:
    name: str
    action: str  # one of WATCHDOG_ACTIONS


@dataclass(frozen=True)
class Platform:
    """What the VmSpec gets from this module; the defaults are KubeVirt's (and QEMU's)."""

    acpi: bool = True
    smm: bool | None = None  # None: QEMU's default (on for pc and q35)
    hpet: bool = True
    rtc_catchup: bool = False  # clock.timer.rtc.tickPolicy catchup: QEMU's driftfix=slew
    rng: bool = False
    watchdog: Watchdog | None = None
    chassis: tuple[tuple[str, str], ...] = ()  # SMBIOS type 3 (field, value)


def _enabled(raw: Any, path: str) -> bool:
    """KubeVirt's FeatureState: `{}` or `{enabled: true}` is on."""
    return _bool(_map(raw, path).get("enabled"), f"{path}.enabled", True)


def _features(domain: dict, dpath: str, machine: str, secure_boot: bool, notes: Notes) -> dict:
    path = f"{dpath}.features"
    raw = _map(domain.get("features"), path)
    notes.check(raw, path, "features", ("acpi", "apic", "smm"))
    out: dict = {}
    if "acpi" in raw:
        out["acpi"] = _enabled(raw["acpi"], f"{path}.acpi")
    if "apic" in raw:
        apic = _map(raw["apic"], f"{path}.apic")
        notes.check(apic, f"{path}.apic", "apic", ("enabled",))
        if not _enabled(apic, f"{path}.apic"):
            notes.ignore(f"{path}.apic.enabled", "the guest keeps its APIC")
    if "smm" in raw:
        smm = _enabled(raw["smm"], f"{path}.smm")
        if smm and not PC_MACHINES.fullmatch(machine):
            raise SpecError(f"{path}.smm", f"needs machine type q35 or pc, not {machine!r}")
        if not smm and secure_boot:
            raise SpecError(f"{path}.smm.enabled", "EFI secure boot needs SMM")
        out["smm"] = smm
    return out


def _clock(domain: dict, dpath: str, machine: str, notes: Notes) -> dict:
    path = f"{dpath}.clock"
    raw = _map(domain.get("clock"), path)
    notes.check(raw, path, "clock", ("utc", "timezone", "timer"))
    if "utc" in raw and "timezone" in raw:
        raise SpecError(path, "only one of utc, timezone may be set")
    utc = _map(raw.get("utc"), f"{path}.utc")
    notes.check(utc, f"{path}.utc", "clock.utc", ("offsetSeconds",))
    if utc.get("offsetSeconds") not in (None, 0):
        notes.ignore(f"{path}.utc.offsetSeconds", "the guest's clock is UTC")
    if raw.get("timezone") is not None:
        if not isinstance(raw["timezone"], str):
            raise SpecError(f"{path}.timezone", f"must be a string, not {shown(raw['timezone'])}")
        notes.ignore(f"{path}.timezone", "the guest's clock is UTC")
    timer_path = f"{path}.timer"
    timer = _map(raw.get("timer"), timer_path)
    notes.check(timer, timer_path, "clock.timer", ("hpet", "rtc"))
    out: dict = {}
    for name in ("hpet", "rtc"):
        entry = _map(timer.get(name), f"{timer_path}.{name}")
        notes.check(entry, f"{timer_path}.{name}", "clock.timer", ("present", "tickPolicy"))
        present = _bool(entry.get("present"), f"{timer_path}.{name}.present", True)
        policy = entry.get("tickPolicy")
        if policy is not None:
            one_of(policy, f"{timer_path}.{name}.tickPolicy", ("delay", "catchup", "merge", "discard"), "tickPolicy")
        if name == "hpet":
            if not present and PC_MACHINES.fullmatch(machine):
                out["hpet"] = False
            if policy is not None:
                notes.ignore(f"{timer_path}.hpet.tickPolicy", "QEMU's default tick policy")
        else:
            if not present:
                notes.ignore(f"{timer_path}.rtc.present", "the guest always has its RTC")
            if policy == "catchup":
                out["rtc_catchup"] = True
            elif policy not in (None, "delay"):
                notes.ignore(f"{timer_path}.rtc.tickPolicy", "QEMU's default tick policy (delay)")
    return out


def _devices(devices: dict, dpath: str, notes: Notes) -> dict:
    path = f"{dpath}.devices"
    notes.check(devices, path, "devices", DEVICE_KEYS)
    for key, (fine, message) in DEVICE_FLAGS.items():
        notes.flag(devices, key, path, fine, message)
    _bool(devices.get("disableHotplug"), f"{path}.disableHotplug", False)  # pvlun hotplugs nothing anyway
    out: dict = {}
    if devices.get("rng") is not None:
        notes.check(_map(devices["rng"], f"{path}.rng"), f"{path}.rng", "rng", ())
        out["rng"] = True
    if devices.get("watchdog") is not None:
        raw = _map(devices["watchdog"], f"{path}.watchdog")
        notes.check(raw, f"{path}.watchdog", "watchdog", ("name", "i6300esb"))
        name = _name(raw.get("name"), f"{path}.watchdog.name")
        if "i6300esb" not in raw:
            raise SpecError(f"{path}.watchdog", "i6300esb is required (the watchdog x86 guests have)")
        body = _map(raw["i6300esb"], f"{path}.watchdog.i6300esb")
        notes.check(body, f"{path}.watchdog.i6300esb", "watchdog", ("action",))
        out["watchdog"] = Watchdog(name, one_of(body.get("action", "reset"), f"{path}.watchdog.i6300esb.action",
                                                WATCHDOG_ACTIONS, "action"))
    return out


def _chassis(domain: dict, dpath: str) -> tuple[tuple[str, str], ...]:
    path = f"{dpath}.chassis"
    raw = _map(domain.get("chassis"), path)
    out = []
    for key, value in raw.items():
        if key not in CHASSIS_FIELDS:
            raise SpecError(path, f"unknown field {shown(key)} ({', '.join(CHASSIS_FIELDS)})")
        text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
        if not isinstance(text, str) or not SMBIOS_VALUE.fullmatch(text):
            raise SpecError(f"{path}.{key}", f"{shown(value)} is not 1-64 letters, digits, spaces or ,_.+/:-")
        out.append((key, text))
    return tuple(out)


def cpu_model(cpu: dict, path: str, notes: Notes) -> None:
    """`cpu.model`: KVM guests get the host's CPU (host-passthrough); another model is noted."""
    model = cpu.get("model")
    if model is None or model in CPU_MODELS_RUN:
        return
    if not isinstance(model, str):
        raise SpecError(f"{path}.model", f"must be a string, not {shown(model)}")
    notes.ignore(f"{path}.model", "the guest gets the host's CPU (KVM) or QEMU's default CPU (TCG)")


def scheduling(spec: dict, path: str, notes: Notes) -> None:
    """nodeSelector, affinity, tolerations, subdomain: a cluster's launcher Pod carries them
    (virt/pods.py); `pvlun serve` places VMs itself."""
    for key in ("nodeSelector", "affinity", "tolerations", "subdomain"):
        if spec.get(key) not in (None, {}, []):
            notes.ignore(f"{path}.{key}", SCHEDULING, scheduling=True)
    arch = spec.get("architecture")
    if arch not in (None, "", "amd64"):
        raise SpecError(f"{path}.architecture", f"{shown(arch)} is not supported (amd64)")


def hook_annotations(meta: dict, path: str, notes: Notes) -> None:
    """KubeVirt's hook sidecars rewrite the domain (its examples add SMBIOS fields or QEMU
    arguments so): pvlun runs none, so their annotation is noted."""
    annotations = _map(meta.get("annotations"), f"{path}.annotations")
    if HOOK_SIDECARS in annotations:
        notes.ignore(f"{path}.annotations[{HOOK_SIDECARS}]", "no hook sidecars run (pvlun builds QEMU's command "
                     "line itself)")


def resources(domain: dict, dpath: str, notes: Notes) -> None:
    """`resources`: requests.memory is the guest's memory (vm_spec.py); CPU and limits size a
    cluster's launcher Pod (virt/pods.py), which `pvlun serve` has none of."""
    path = f"{dpath}.resources"
    raw = _map(domain.get("resources"), path)
    notes.check(raw, path, "resources", ("requests", "limits"))
    for part in ("requests", "limits"):
        for key in _map(raw.get(part), f"{path}.{part}"):
            if not isinstance(key, str) or not RESOURCE_NAME.fullmatch(key):
                raise SpecError(f"{path}.{part}", f"{shown(key)} is not a resource name")
            if key == "memory" and part == "requests":
                continue
            if key in ("cpu", "memory"):
                notes.ignore(f"{path}.{part}.{key}", "pvlun serve does not limit a VM's QEMU (a cluster's "
                             "launcher Pod carries it)", scheduling=True)
            else:
                notes.ignore(f"{path}.{part}.{key}", "no such resource is given to the VM")


def platform(domain: dict, devices: dict, dpath: str, machine: str, secure_boot: bool, notes: Notes) -> Platform:
    """The Platform of a domain (its `machine` already parsed)."""
    resources(domain, dpath, notes)
    return Platform(**_features(domain, dpath, machine, secure_boot, notes), **_clock(domain, dpath, machine, notes),
                    **_devices(devices, dpath, notes), chassis=_chassis(domain, dpath))
