"""KubeVirt fields pvlun accepts without running them, and those it refuses: never dropped
without a word.

A KubeVirt user copies manifests with fields pvlun has no use for (probes, eviction, Hyper-V
enlightenments, ...). Refusing them all would lose the user; dropping them silently would
mislead. So every key of the spec's objects is either parsed (controlplane/vm_spec.py,
controlplane/vm_domain.py), or named here: IGNORED ones become a Warning event `FieldIgnored`
on the VM and its VMI (virt/spec_warnings.py), whose message names the field path and says
what the guest gets instead; REFUSED ones, where running the VM would mislead (a GPU the guest
would not have), are a SpecError at apply. A key named nowhere is ignored with a warning too
(KubeVirt's API server would prune it), unless it cannot be a field name at all.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from controlplane.vm_spec_fields import SpecError, shown

REASON = "FieldIgnored"  # the Warning event's reason
MAX_WARNINGS = 20  # per object; the rest are counted in the last one
_FIELD = re.compile(r"[A-Za-z][A-Za-z0-9]{0,62}")  # what a KubeVirt API field can be called

SCHEDULING = "pvlun serve places VMs on its own nodes (a cluster's launcher Pod carries it)"
_PROBE = "the VMI is Ready while its QEMU runs"

# object → {field: what the guest gets instead}
IGNORED: dict[str, dict[str, str]] = {
    "spec": {
        "priorityClassName": "no priority or preemption",
        "schedulerName": "the default scheduler places the VM", "topologySpreadConstraints": "no spread constraints",
        "evictionStrategy": "a node drain neither live-migrates nor evicts the VM; migrate it with "
                            "a VirtualMachineInstanceMigration",
        "startStrategy": "the guest starts running", "livenessProbe": _PROBE, "readinessProbe": _PROBE,
        "dnsConfig": "the guest gets the host's DNS servers by DHCP",
        "dnsPolicy": "the guest gets the host's DNS servers by DHCP",
        "accessCredentials": "no keys are injected; put them in cloud-init userData",
    },
    "domain": {"ioThreadsPolicy": "QEMU's default I/O threads", "ioThreads": "QEMU's default I/O threads"},
    "cpu": {field: "no CPU pinning, NUMA or real-time tuning"
            for field in ("dedicatedCpuPlacement", "isolateEmulatorThread", "numa", "realtime")}
           | {"features": "the guest gets the host's CPU features (KVM) or QEMU's default CPU",
              "maxSockets": "no CPU hotplug"},
    "memory": {"hugepages": "guest memory is ordinary pages", "maxGuest": "no memory hotplug"},
    "firmware": {"acpi": "no extra ACPI tables"},
    "features": {"hyperv": "no Hyper-V enlightenments (Windows runs, slower)",
                 "hypervPassthrough": "no Hyper-V enlightenments (Windows runs, slower)",
                 "kvm": "the hypervisor is not hidden", "pvspinlock": "QEMU's default spinlocks"},
    "devices": {"inputs": "no input devices (the serial console is the console)", "sound": "no sound device",
                "tpm": "no TPM", "clientPassthrough": "no USB redirection",
                "downwardMetrics": "no downward metrics", "panicDevices": "no panic device"},
    "disk": {"dedicatedIOThread": "QEMU's main I/O thread", "cache": "host cache off (cache.direct=on)",
             "io": "native AIO where the volume allows direct I/O", "tag": "no device tag",
             "blockSize": "the volume's own block size", "shareable": "the disk is not marked shareable",
             "errorPolicy": "QEMU's default (report errors to the guest)"},
    "disk.disk": {"pciAddress": "QEMU chooses the PCI address"},
    "resources": {"overcommitGuestOverhead": "QEMU's overhead is not part of the guest's memory anyway"},
    "apic": {"endOfInterrupt": "QEMU's default end of interrupt"},
    "clock.timer": {"pit": "QEMU's default PIT", "hyperv": "no Hyper-V clock", "kvm": "QEMU's default clock source",
                    "track": "the RTC follows the host's clock"},
    "network.pod": {"vmNetworkCIDR": "the guest's network is 10.0.2.0/24",
                    "vmIPv6NetworkCIDR": "the guest's network is IPv4 only"},
    "vm": {"flavor": "flavors are gone from KubeVirt; use spec.instancetype"},
    "interface": {"pciAddress": "QEMU chooses the PCI address", "dhcpOptions": "passt's DHCP defaults",
                  "tag": "no device tag", "acpiIndex": "no ACPI index", "state": "the interface is up"},
}

# object → {field: why a VM with it cannot run as its author means}
REFUSED: dict[str, dict[str, str]] = {
    "spec": {"resourceClaims": "devices from resource claims (DRA) are not supported"},
    "domain": {"launchSecurity": "confidential computing (SEV) is not supported; the guest would run unprotected"},
    "devices": {"gpus": "GPUs are not passed through; the guest would run without them",
                "hostDevices": "host devices are not passed through; the guest would run without them",
                "qats": "QAT devices are not passed through; the guest would run without them",
                "filesystems": "virtiofs shares are not supported; the guest would run without them"},
}


@dataclass(frozen=True)
class Ignored:
    """A field the VM keeps but QEMU does not run; `scheduling` ones are honoured on a cluster."""

    path: str
    message: str
    scheduling: bool = False

    def __str__(self) -> str:
        return f"{self.path}: ignored, {self.message}"


class Notes:
    """The Ignored fields of one spec, collected while it is parsed."""

    def __init__(self) -> None:
        self.items: list[Ignored] = []

    def ignore(self, path: str, message: str, *, scheduling: bool = False) -> None:
        self.items.append(Ignored(path, message, scheduling))

    def check(self, raw: dict, path: str, table: str, known: tuple[str, ...]) -> None:
        """Every key of `raw` (the object at `path`) beyond `known`: refused or ignored by the tables."""
        for key in raw:
            if key in known:
                continue
            if not isinstance(key, str) or not _FIELD.fullmatch(key):
                raise SpecError(path, f"unknown field {shown(key)}")
            where = f"{path}.{key}"
            if key in REFUSED.get(table, {}):
                raise SpecError(where, REFUSED[table][key])
            self.ignore(where, IGNORED.get(table, {}).get(key, "pvlun does not know this field"))

    def flag(self, raw: dict, key: str, path: str, fine: bool, message: str) -> None:
        """A boolean device switch: ignored (with `message`) unless it is unset or `fine`."""
        value = raw.get(key)
        if value is None or value == fine:
            return
        if not isinstance(value, bool):
            raise SpecError(f"{path}.{key}", f"must be true or false, not {shown(value)}")
        self.ignore(f"{path}.{key}", message)


def event_messages(ignored: tuple[Ignored, ...], *, cluster: bool) -> list[str]:
    """The Warning events' messages: at most MAX_WARNINGS, the last counting the rest."""
    shown_items = [str(i) for i in ignored if not (cluster and i.scheduling)]
    if len(shown_items) > MAX_WARNINGS:
        rest = len(shown_items) - MAX_WARNINGS + 1
        shown_items = shown_items[:MAX_WARNINGS - 1] + [f"and {rest} more fields ignored"]
    return shown_items
