"""VmSpec + attached volumes → QEMU argv, as a pure function (tested by comparing argv).

Like KubeVirt's converter: nothing here runs or stats anything — the caller says where each
volume is and whether it is a block device; `DiskAttachment.for_path` is the one impure
helper that finds that out for a path.

Per volume the block graph is: protocol node (`host_device` for a published block device,
`file` for a regular file) → `raw` format node → optional `throttle` node bound to a
throttle group `tg-<volume>` whose limits can be changed live over QMP.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass
from typing import Mapping, Sequence

from virt.spec import Disk, VmSpec

QEMU_BINARY = "qemu-system-x86_64"
MIB = 1 << 20


@dataclass(frozen=True)
class Throttle:
    """Volume QoS (the CSI mutable parameters maxIOPS, maxMBps). 0 or None = unlimited."""

    max_iops: int | None = None
    max_mbps: int | None = None  # MiB/s

    @property
    def iops_total(self) -> int:
        return int(self.max_iops or 0)

    @property
    def bps_total(self) -> int:
        return int(self.max_mbps or 0) * MIB

    @classmethod
    def from_volume_context(cls, context: Mapping[str, str]) -> "Throttle":
        """From a CSI volume_context / mutable parameters dict."""
        def num(key: str) -> int | None:
            value = context.get(key)
            return int(value) if value not in (None, "") else None
        return cls(num("maxIOPS"), num("maxMBps"))


@dataclass(frozen=True)
class DiskAttachment:
    """Where a volume's bytes are on this host, and how QEMU should open them."""

    path: str
    readonly: bool = False
    block: bool = True  # a block device (host_device) rather than a regular file
    direct_io: bool = True  # cache.direct=on, aio=native
    throttle: Throttle | None = None  # None = no throttle layer (limits then cannot be set live)

    @classmethod
    def for_path(cls, path: str, *, readonly: bool = False, throttle: Throttle | None = None) -> "DiskAttachment":
        """Inspect `path`: block device or file, and whether O_DIRECT works on it."""
        mode = os.stat(path).st_mode
        direct = True
        try:
            os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
        except OSError:
            direct = False
        return cls(str(path), readonly, stat.S_ISBLK(mode), direct, throttle)


def _esc(value: str) -> str:
    """QEMU keyval option values double their commas."""
    return str(value).replace(",", ",,")


def _blockdev(opts: dict) -> list[str]:
    return ["-blockdev", json.dumps(opts, separators=(",", ":"))]


def mac_address(vm: VmSpec, interface: str) -> str:
    """A stable locally administered MAC, so a migration target gets the same one."""
    digest = hashlib.sha256(f"{vm.namespace}/{vm.name}/{interface}".encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in digest[:3])


def _volume_nodes(vm: VmSpec, disk: Disk, att: DiskAttachment) -> tuple[list[str], str]:
    """Arguments for one volume's block graph; returns (argv, top node name)."""
    readonly = att.readonly or disk.readonly
    proto: dict = {
        "driver": "host_device" if att.block else "file",
        "filename": att.path,
        "node-name": f"file-{disk.name}",
        "read-only": readonly,
        "discard": "unmap",
        "cache": {"direct": att.direct_io, "no-flush": False},
    }
    if att.direct_io:
        proto["aio"] = "native"
    args = _blockdev(proto)
    args += _blockdev({"driver": "raw", "node-name": f"fmt-{disk.name}", "file": f"file-{disk.name}",
                       "read-only": readonly, "discard": "unmap"})
    top = f"fmt-{disk.name}"
    if att.throttle is not None:
        t = att.throttle
        args += ["-object", f"throttle-group,id=tg-{disk.name},x-iops-total={t.iops_total},x-bps-total={t.bps_total}"]
        args += _blockdev({"driver": "throttle", "node-name": f"drive-{disk.name}", "throttle-group": f"tg-{disk.name}",
                           "file": top, "read-only": readonly})
        top = f"drive-{disk.name}"
    return args, top


def build_qemu_argv(
    vm: VmSpec,
    disks: Mapping[str, DiskAttachment],
    *,
    accel: str,
    qmp_path: str,
    serial_log: str,
    incoming: str | None = None,
    console_socket: str | None = None,
    host_ports: Mapping[tuple[str, int], int] | None = None,
    ovmf_code: str | None = None,
    ovmf_vars: str | None = None,
    qemu_binary: str = QEMU_BINARY,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The full QEMU command line for `vm` with `disks` (volume name → attachment).

    `host_ports` maps (protocol, guest port) of masquerade interface ports to host ports on
    127.0.0.1. `incoming` is "defer" for a migration target. With `console_socket` the serial
    console is an interactive unix socket that also logs to `serial_log`.
    """
    if accel not in ("kvm", "tcg"):
        raise ValueError(f"accel must be kvm or tcg, not {accel!r}")
    missing = [d.name for d in vm.disks if d.name not in disks]
    if missing:
        raise ValueError(f"no attachment for volume(s) {', '.join(missing)}")
    machine = f"{vm.machine}"
    argv = [qemu_binary, "-name", f"guest={_esc(vm.namespace)}/{_esc(vm.name)},debug-threads=on",
            "-nodefaults", "-no-user-config", "-display", "none", "-accel", accel]
    if vm.firmware == "efi":
        if not ovmf_code or not ovmf_vars:
            raise ValueError("efi firmware needs ovmf_code and ovmf_vars")
        argv += _blockdev({"driver": "file", "filename": ovmf_code, "node-name": "pflash0", "read-only": True})
        argv += _blockdev({"driver": "file", "filename": ovmf_vars, "node-name": "pflash1", "read-only": False})
        machine += ",pflash0=pflash0,pflash1=pflash1"
        if vm.secure_boot:
            machine += ",smm=on"
            argv += ["-global", "driver=cfi.pflash01,property=secure,value=on"]
    argv += ["-machine", machine]
    if accel == "kvm":
        argv += ["-cpu", "host"]
    argv += ["-smp", f"{vm.vcpus},sockets={vm.sockets},cores={vm.cores},threads={vm.threads}",
             "-m", f"{-(-vm.memory // MIB)}M",
             "-rtc", "base=utc",
             "-qmp", f"unix:{_esc(qmp_path)},server=on,wait=off"]
    if console_socket:
        argv += ["-chardev", f"socket,id=serial0,path={_esc(console_socket)},server=on,wait=off,"
                             f"logfile={_esc(serial_log)},logappend=on"]
    else:
        argv += ["-chardev", f"file,id=serial0,path={_esc(serial_log)},append=on"]
    argv += ["-serial", "chardev:serial0"]

    buses = {d.bus for d in vm.disks}
    if "sata" in buses:
        argv += ["-device", "ich9-ahci,id=sata0"]
    if "scsi" in buses:
        argv += ["-device", "virtio-scsi-pci,id=scsi0"]
    sata_port = scsi_lun = 0
    for disk in vm.disks:
        nodes, top = _volume_nodes(vm, disk, disks[disk.name])
        argv += nodes
        dev = f"drive={top},id=ua-{disk.name}"
        if disk.bus == "virtio":
            dev = f"virtio-blk-pci,{dev}"
        elif disk.bus == "sata":
            kind = "ide-cd" if disk.device == "cdrom" else "ide-hd"
            dev = f"{kind},bus=sata0.{sata_port},{dev}"
            sata_port += 1
        else:
            kind = "scsi-cd" if disk.device == "cdrom" else "scsi-hd"
            dev = f"{kind},bus=scsi0.0,channel=0,scsi-id=0,lun={scsi_lun},{dev}"
            scsi_lun += 1
        if disk.serial:
            dev += f",serial={disk.serial}"
        if disk.boot_order:
            dev += f",bootindex={disk.boot_order}"
        argv += ["-device", dev]

    for iface in vm.interfaces:
        net = f"user,id=net-{iface.name},net=10.0.2.0/24,host=10.0.2.1,dhcpstart=10.0.2.2"
        if vm.hostname:
            net += f",hostname={vm.hostname}"
        for port in iface.ports:
            host = (host_ports or {}).get((port.protocol, port.port))
            if host is None:
                raise ValueError(f"no host port for {port.protocol} {port.port} of interface {iface.name}")
            net += f",hostfwd={port.protocol.lower()}:127.0.0.1:{host}-:{port.port}"
        model = {"virtio": "virtio-net-pci"}.get(iface.model, iface.model)
        dev = f"{model},netdev=net-{iface.name},id=ua-{iface.name},mac={iface.mac or mac_address(vm, iface.name)}"
        dev += f",bootindex={iface.boot_order}" if iface.boot_order else ",romfile="
        argv += ["-netdev", net, "-device", dev]

    if any(d.boot_order for d in vm.disks) or any(i.boot_order for i in vm.interfaces):
        argv += ["-boot", "strict=on"]
    if incoming:
        argv += ["-incoming", incoming]
    return argv + list(extra_args)
