"""VmSpec + attached volumes → QEMU argv, as a pure function (tested by comparing argv).

Like KubeVirt's converter: nothing here runs or stats anything — the caller says where each
volume is and whether it is a block device; `DiskAttachment.for_path` is the one impure
helper that finds that out for a path.

Per volume the block graph is: protocol node (`host_device` for a published block device,
`file` for a regular file, `iscsi` for a LUN QEMU logs in to itself, virt/iscsi_direct.py)
→ `raw` format node → optional `throttle` node bound to a
throttle group `tg-<volume>` whose limits can be changed live over QMP.

Safe by construction: block nodes are JSON (`-blockdev`), every other option is built by
`_keyval`, which escapes every value (QEMU doubles commas), and every value that came from a
spec already matched a strict pattern (controlplane/vm_spec_fields.py). QEMU also runs with `-sandbox`
(seccomp): no exec, no privilege changes, no obsolete or resource-control syscalls.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import stat
from dataclasses import dataclass
from typing import Mapping, Sequence

from host.sandbox import open_no_follow
from controlplane.vm_spec import Disk, VmSpec
from virt.iscsi_direct import BLOCK_DEVICE, FILE, ISCSI_DIRECT, IscsiDisk

QEMU_BINARY = "qemu-system-x86_64"
MIB = 1 << 20
SECCOMP = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
AGENT_CHANNEL = "org.qemu.guest_agent.0"  # the virtio-serial port name qemu-ga opens, as KubeVirt names it
AGENT_PORT_ID = "channel0"  # its device id: QMP's VSERPORT_CHANGE names the port by it
_MAX_LIMIT = 1 << 40  # IOPS or MiB/s: more than any device, less than QEMU's own bounds
_NODE_NAME_MAX = 31  # QEMU refuses longer block node names


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
            if value in (None, ""):
                return None
            if not isinstance(value, str) or not value.isascii() or not value.isdigit() or int(value) > _MAX_LIMIT:
                raise ValueError(f"{key} must be a whole number up to {_MAX_LIMIT}")
            return int(value)
        return cls(num("maxIOPS"), num("maxMBps"))


@dataclass(frozen=True)
class BaseImage:
    """The read-only image a volume's qcow2 overlay lies on (a containerDisk's cached disk):
    named on the argv as its own node, never found through the overlay's header."""

    path: str
    fmt: str  # qcow2 or raw
    fd: int | None = None  # QEMU inherits it open read-only as this descriptor

    def __post_init__(self) -> None:
        if self.fmt not in ("qcow2", "raw"):
            raise ValueError(f"a base image is qcow2 or raw, not {self.fmt!r}")


@dataclass(frozen=True)
class KernelFiles:
    """`firmware.kernelBoot`: the kernel and initrd QEMU loads (inherited open, read through
    /proc/self/fd) and the command line, one argv element whatever it holds."""

    kernel_fd: int
    initrd_fd: int | None = None
    args: str = ""

    def __post_init__(self) -> None:
        if len(self.args) > 2048 or any(not " " <= c <= "~" for c in self.args):
            raise ValueError("kernel arguments are printable ASCII, at most 2048 characters")


@dataclass(frozen=True)
class DiskAttachment:
    """Where a volume's bytes are on this host, and how QEMU should open them."""

    path: str
    readonly: bool = False
    block: bool = True  # a block device (host_device) rather than a regular file
    direct_io: bool = True  # cache.direct=on, aio=native
    throttle: Throttle | None = None  # None = no throttle layer (limits then cannot be set live)
    fd: int | None = None  # QEMU inherits the file open as this descriptor (-add-fd) instead of opening `path`
    iscsi: IscsiDisk | None = None  # QEMU logs in to this LUN itself (`path` is its iscsi:// URL)
    overlay_of: BaseImage | None = None  # `path` is a qcow2 overlay of this image

    @classmethod
    def for_iscsi(cls, disk: IscsiDisk, *, readonly: bool = False, throttle: Throttle | None = None) -> "DiskAttachment":
        return cls(disk.url, readonly, block=False, direct_io=True, throttle=throttle, iscsi=disk)

    @property
    def access(self) -> str:
        """How QEMU reaches the volume, as the VMI's volumeStatus[].access shows it."""
        return ISCSI_DIRECT if self.iscsi else BLOCK_DEVICE if self.block else FILE

    @classmethod
    def for_path(cls, path: str, *, readonly: bool = False, throttle: Throttle | None = None) -> "DiskAttachment":
        """Inspect `path` — a block device or a regular file, never through a link (a disk.img
        in a volume is the volume owner's to replace) — and whether O_DIRECT works on it."""
        fd = open_no_follow(path, devices=True)
        try:
            block = stat.S_ISBLK(os.fstat(fd).st_mode)
            try:
                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_DIRECT)
                direct = True
            except OSError:
                direct = False
        finally:
            os.close(fd)
        return cls(str(path), readonly, block, direct, throttle)


def _esc(value: str) -> str:
    """QEMU keyval option values double their commas."""
    return str(value).replace(",", ",,")


def _keyval(head: str | None, options: Mapping[str, object]) -> str:
    """`head,key=value,...` with the head and every value escaped: the one way an option
    string is built. Keys are this module's own constants; booleans become on/off."""
    parts = [_esc(head)] if head else []
    for key, value in options.items():
        if isinstance(value, bool):
            value = "on" if value else "off"
        parts.append(f"{key}={_esc(str(value))}")
    return ",".join(parts)


def node_name(kind: str, volume: str) -> str:
    """The block node (kind file, fmt or drive) of a volume: `kind-volume`, shortened with a
    digest where QEMU's 31-character limit needs it (volume names may have 63)."""
    plain = f"{kind}-{volume}"
    if len(plain) <= _NODE_NAME_MAX:
        return plain
    digest = hashlib.sha256(volume.encode()).hexdigest()[:8]
    return f"{kind}-{volume[:_NODE_NAME_MAX - len(kind) - 10]}-{digest}"


def _blockdev(opts: dict) -> list[str]:
    return ["-blockdev", json.dumps(opts, separators=(",", ":"))]


def mac_address(vm: VmSpec, interface: str) -> str:
    """A stable locally administered MAC, so a migration target gets the same one."""
    digest = hashlib.sha256(f"{vm.namespace}/{vm.name}/{interface}".encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in digest[:3])


def _fdset(fd: int, label: str | None) -> list[str]:
    """Hand QEMU an inherited descriptor as fd set `fd` (QEMU opens it as /dev/fdset/FD);
    `label` (the host path it stands for) shows in `ps` and lets start-up repair know the QEMU."""
    return ["-add-fd", _keyval(None, {"fd": int(fd), "set": int(fd), **({"opaque": label} if label else {})})]


def _volume_nodes(vm: VmSpec, disk: Disk, att: DiskAttachment) -> tuple[list[str], str]:
    """Arguments for one volume's block graph; returns (argv, top node name)."""
    readonly = att.readonly or disk.readonly
    file, fmt = node_name("file", disk.name), node_name("fmt", disk.name)
    if att.iscsi is not None:
        args, proto = _iscsi_node(disk, att.iscsi)
        proto.update({"node-name": file, "read-only": readonly, "discard": "unmap",
                      "cache": {"direct": True, "no-flush": False}})
        return _format_nodes(disk, att, args + _blockdev(proto), file, fmt, readonly)
    proto: dict = {
        "driver": "host_device" if att.block else "file",
        "filename": att.path if att.fd is None else f"/dev/fdset/{att.fd}",
        "node-name": file,
        "read-only": readonly,
        "discard": "unmap",
        "cache": {"direct": att.direct_io, "no-flush": False},
    }
    if att.direct_io:
        proto["aio"] = "native"
    args = [] if att.fd is None else _fdset(att.fd, att.path)
    return _format_nodes(disk, att, args + _blockdev(proto), file, fmt, readonly)


def _iscsi_node(disk: Disk, lun: IscsiDisk) -> tuple[list[str], dict]:
    """QEMU's own iSCSI initiator for a LUN (libiscsi). A CHAP password is a `secret` object
    read from the inherited file `secret_fd`, never a value on the argv."""
    proto: dict = {"driver": "iscsi", "transport": "tcp", "portal": lun.lun.portal, "target": lun.lun.target,
                   "lun": lun.lun.lun, "initiator-name": lun.initiator}
    if lun.chap is None:
        return [], proto
    if lun.secret_fd is None:
        raise ValueError(f"volume {disk.name}: CHAP needs the password file's descriptor")
    secret = f"sec-{disk.name}"
    proto.update({"user": lun.chap.user, "password-secret": secret})
    return ["-object", _keyval("secret", {"id": secret, "format": "raw",
                                          "file": f"/proc/self/fd/{int(lun.secret_fd)}"})], proto


def _format_nodes(disk: Disk, att: DiskAttachment, args: list[str], file: str, fmt: str,
                  readonly: bool) -> tuple[list[str], str]:
    """The raw format node above a volume's protocol node, and its throttle node if any."""
    if att.overlay_of is None:
        args += _blockdev({"driver": "raw", "node-name": fmt, "file": file, "read-only": readonly, "discard": "unmap"})
    else:
        args += _base_nodes(disk, att.overlay_of)
        args += _blockdev({"driver": "qcow2", "node-name": fmt, "file": file, "backing": node_name("bfmt", disk.name),
                           "read-only": readonly, "discard": "unmap"})
    top = fmt
    if att.throttle is not None:
        t = att.throttle
        args += ["-object", _keyval("throttle-group", {"id": f"tg-{disk.name}", "x-iops-total": t.iops_total,
                                                       "x-bps-total": t.bps_total})]
        top = node_name("drive", disk.name)
        args += _blockdev({"driver": "throttle", "node-name": top, "throttle-group": f"tg-{disk.name}",
                           "file": fmt, "read-only": readonly})
    return args, top


def _base_nodes(disk: Disk, base: BaseImage) -> list[str]:
    """The base image of an overlay: a read-only file node and its format node (its own
    backing chain, if its header named one, cut off)."""
    if base.fd is None:
        raise ValueError(f"volume {disk.name}: the base image needs its descriptor")
    bfile, bfmt = node_name("bfile", disk.name), node_name("bfmt", disk.name)
    args = _fdset(base.fd, base.path)
    args += _blockdev({"driver": "file", "filename": f"/dev/fdset/{base.fd}", "node-name": bfile, "read-only": True})
    fmt_node: dict = {"driver": base.fmt, "node-name": bfmt, "file": bfile, "read-only": True}
    if base.fmt == "qcow2":
        fmt_node["backing"] = None
    return args + _blockdev(fmt_node)


def guest_device_names(vm: VmSpec) -> dict[str, str]:
    """Each disk's name in the guest as KubeVirt's volumeStatus.target gives it: virtio disks
    vda, vdb, …; sata and scsi ones sda, sdb, … (one sequence for both), in spec order."""
    counters = {"vd": 0, "sd": 0}
    out = {}
    for disk in vm.disks:
        prefix = "vd" if disk.bus == "virtio" else "sd"
        n, suffix = counters[prefix], ""
        counters[prefix] += 1
        while True:  # vda … vdz, vdaa …, as Linux names them
            suffix = chr(ord("a") + n % 26) + suffix
            n = n // 26 - 1
            if n < 0:
                break
        out[disk.name] = prefix + suffix
    return out


def _platform_devices(vm: VmSpec) -> list[str]:
    """virtio-rng fed by QEMU's built-in source (getrandom(), the kernel's CSPRNG that KubeVirt's
    /dev/urandom reads too, without QEMU opening a host path) and the i6300esb watchdog."""
    p, argv = vm.platform, []
    if p.rng:
        argv += ["-object", "rng-builtin,id=rng0", "-device", "virtio-rng-pci,rng=rng0,id=ua-rng"]
    if p.watchdog is not None:
        argv += ["-device", _keyval("i6300esb", {"id": f"ua-watchdog-{p.watchdog.name}"}),
                 "-action", _keyval(None, {"watchdog": p.watchdog.action})]
    return argv


def _agent_channel(fd: int) -> list[str]:
    """The QEMU guest agent's channel as KubeVirt gives every VM one: a virtio-serial port named
    org.qemu.guest_agent.0 whose host end is a unix socket QEMU listens on (inherited, like QMP's);
    pvlun connects to it (virt/guest_agent.py), the guest's qemu-ga opens the port."""
    return ["-chardev", _keyval("socket", {"id": "charchannel0", "fd": int(fd), "server": True, "wait": False}),
            "-device", _keyval("virtio-serial-pci", {"id": "virtio-serial0"}),
            "-device", _keyval("virtserialport", {"bus": "virtio-serial0.0", "nr": 1, "chardev": "charchannel0",
                                                  "id": AGENT_PORT_ID, "name": AGENT_CHANNEL})]


def build_qemu_argv(
    vm: VmSpec,
    disks: Mapping[str, DiskAttachment],
    *,
    accel: str,
    qmp_fd: int,
    serial_fd: int,
    incoming: str | None = None,
    console_fd: int | None = None,
    net_fds: Mapping[str, int] | None = None,
    ovmf_code: str | None = None,
    ovmf_vars_fd: int | None = None,
    labels: Mapping[int, str] | None = None,
    qemu_binary: str = QEMU_BINARY,
    extra_args: Sequence[str] = (),
    start_paused: bool = False,
    kernel: KernelFiles | None = None,
    agent_fd: int | None = None,
) -> list[str]:
    """The full QEMU command line for `vm` with `disks` (volume name → attachment).

    QEMU opens no host path but its firmware code in /usr: it inherits every other file and
    socket. `qmp_fd` (and `console_fd`, for an interactive serial console) are listening unix
    sockets; `serial_fd` the serial log, open for appending (so it can be cut short from
    outside); `ovmf_vars_fd` the firmware variables; `net_fds` a connected stream socket per
    interface, whose other end is the guest's network (virt/guest_network.py). `labels` names
    the host file behind a descriptor, for `ps`. `incoming` is "defer" for a migration target;
    `start_paused` (-S) holds the guest until QMP `cont`. `agent_fd`, a listening unix socket,
    is the host end of the guest agent's channel (`_agent_channel`).
    """
    if accel not in ("kvm", "tcg"):
        raise ValueError(f"accel must be kvm or tcg, not {accel!r}")
    if incoming not in (None, "defer"):
        raise ValueError(f"incoming must be defer, not {incoming!r}")
    missing = [d.name for d in vm.disks if d.name not in disks]
    if missing:
        raise ValueError(f"no attachment for volume(s) {', '.join(missing)}")
    machine: dict[str, object] = {}
    labels = labels or {}
    argv = [qemu_binary, "-name", _keyval(None, {"guest": f"{vm.namespace}/{vm.name}", "debug-threads": True}),
            "-nodefaults", "-no-user-config", "-display", "none", "-sandbox", SECCOMP, "-accel", accel]
    if vm.firmware == "efi":
        if not ovmf_code or ovmf_vars_fd is None:
            raise ValueError("efi firmware needs ovmf_code and ovmf_vars_fd")
        argv += _blockdev({"driver": "file", "filename": ovmf_code, "node-name": "pflash0", "read-only": True})
        argv += _fdset(ovmf_vars_fd, labels.get(ovmf_vars_fd))
        argv += _blockdev({"driver": "file", "filename": f"/dev/fdset/{ovmf_vars_fd}", "node-name": "pflash1",
                           "read-only": False})
        machine.update({"pflash0": "pflash0", "pflash1": "pflash1"})
        if vm.secure_boot:
            machine["smm"] = True
            argv += ["-global", "driver=cfi.pflash01,property=secure,value=on"]
    p = vm.platform
    if not p.acpi:
        machine["acpi"] = False
    if p.smm is not None and "smm" not in machine:
        machine["smm"] = p.smm
    if not p.hpet:
        machine["hpet"] = False
    argv += ["-machine", _keyval(vm.machine, machine)]
    if accel == "kvm":
        argv += ["-cpu", "host"]
    argv += ["-smp", _keyval(str(vm.vcpus), {"sockets": vm.sockets, "cores": vm.cores, "threads": vm.threads}),
             "-m", f"{-(-vm.memory // MIB)}M",
             "-rtc", "base=utc,driftfix=slew" if p.rtc_catchup else "base=utc",
             "-chardev", _keyval("socket", {"id": "qmp", "fd": int(qmp_fd), "server": True, "wait": False}),
             "-mon", "chardev=qmp,mode=control"]
    if kernel is not None:
        argv += ["-kernel", f"/proc/self/fd/{int(kernel.kernel_fd)}"]
        if kernel.initrd_fd is not None:
            argv += ["-initrd", f"/proc/self/fd/{int(kernel.initrd_fd)}"]
        if kernel.args:
            argv += ["-append", kernel.args]
    if vm.uuid:
        argv += ["-uuid", vm.uuid]
    if vm.serial:
        argv += ["-smbios", _keyval("type=1", {"serial": vm.serial})]
    if p.chassis:
        argv += ["-smbios", _keyval("type=3", dict(p.chassis))]
    argv += _platform_devices(vm)
    argv += _fdset(serial_fd, labels.get(serial_fd))
    serial_log = f"/dev/fdset/{serial_fd}"
    if console_fd is not None:
        argv += ["-chardev", _keyval("socket", {"id": "serial0", "fd": int(console_fd), "server": True, "wait": False,
                                                "logfile": serial_log, "logappend": True})]
    else:
        argv += ["-chardev", _keyval("file", {"id": "serial0", "path": serial_log, "append": True})]
    argv += ["-serial", "chardev:serial0"]
    if agent_fd is not None:
        argv += _agent_channel(agent_fd)

    buses = {d.bus for d in vm.disks}
    if "sata" in buses:
        argv += ["-device", "ich9-ahci,id=sata0"]
    if "scsi" in buses:
        argv += ["-device", "virtio-scsi-pci,id=scsi0"]
    sata_port = scsi_lun = 0
    for disk in vm.disks:
        nodes, top = _volume_nodes(vm, disk, disks[disk.name])
        argv += nodes
        if disk.bus == "virtio":
            head, where = "virtio-blk-pci", {}
        elif disk.bus == "sata":
            head, where = "ide-cd" if disk.device == "cdrom" else "ide-hd", {"bus": f"sata0.{sata_port}"}
            sata_port += 1
        else:
            head = "scsi-cd" if disk.device == "cdrom" else "scsi-hd"
            where = {"bus": "scsi0.0", "channel": 0, "scsi-id": 0, "lun": scsi_lun}
            scsi_lun += 1
        dev = {**where, "drive": top, "id": f"ua-{disk.name}"}
        if disk.serial:
            dev["serial"] = disk.serial
        if disk.rotation_rate:
            dev["rotation_rate"] = disk.rotation_rate
        if disk.boot_order:
            dev["bootindex"] = disk.boot_order
        argv += ["-device", _keyval(head, dev)]

    for iface in vm.interfaces:
        fd = (net_fds or {}).get(iface.name)
        if fd is None:
            raise ValueError(f"no network socket for interface {iface.name}")
        model = {"virtio": "virtio-net-pci"}.get(iface.model, iface.model)
        dev: dict[str, object] = {"netdev": f"net-{iface.name}", "id": f"ua-{iface.name}",
                                  "mac": iface.mac or mac_address(vm, iface.name)}
        if iface.boot_order:
            dev["bootindex"] = iface.boot_order
        else:
            dev["romfile"] = ""
        argv += ["-netdev", _keyval("stream", {"id": f"net-{iface.name}", "server": False, "addr.type": "fd",
                                               "addr.str": int(fd)}),
                 "-device", _keyval(model, dev)]

    if any(d.boot_order for d in vm.disks) or any(i.boot_order for i in vm.interfaces):
        argv += ["-boot", "strict=on"]
    if start_paused:
        argv += ["-S"]
    if incoming:
        argv += ["-incoming", incoming]
    return argv + list(extra_args)
