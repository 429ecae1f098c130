"""QEMU as a sandboxed process: what its sandbox holds, which pid is QEMU, how it ends.

The launcher runs `bwrap … setpriv … qemu-system-x86_64 …` (host/sandbox.py). Three
processes then stand for one QEMU: bwrap, the sandbox's init and QEMU itself. The VMI status
names QEMU's own pid (what a person or a test kills, what start-up repair looks for), a kill
ends the whole tree, and the exit status bwrap reports is turned back into QEMU's.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
from dataclasses import dataclass, field
from typing import Mapping

from host.sandbox import Sandbox, UnsafeFile, open_no_follow, processes_below
from virt.iscsi_direct import secret_fd
from virt.qemu_args import DiskAttachment
from controlplane.vm_spec import VmSpec


def qemu_sandbox(disks: Mapping[str, DiskAttachment], binary: str, firmware: list[str],
                 devices: list[str]) -> Sandbox:
    """What one QEMU may reach by path: /usr (its binary and firmware code; either elsewhere is
    bound read-only), its published block devices as private nodes, and `devices` (/dev/kvm).
    No run directory, no volume file: those it inherits open (`open_file_volumes`,
    virt/run_dir.py). No network either, unless a volume is an iSCSI LUN QEMU logs in to
    itself (virt/iscsi_direct.py): then it keeps the host's network namespace."""
    read_only = [p for p in [binary, *firmware] if not os.path.realpath(p).startswith("/usr/")]
    devices = list(devices) + [att.path for att in disks.values() if att.block]
    network = any(att.iscsi is not None for att in disks.values())
    return Sandbox(read_only=read_only, devices=devices, network=network, die_with_parent=False)


@dataclass
class Inherited:
    """The descriptors one QEMU inherits, and the host file each stands for (for `ps`)."""

    fds: list[int] = field(default_factory=list)
    labels: dict[int, str] = field(default_factory=dict)

    def keep(self, fd: int, label: str | None = None) -> int:
        self.fds.append(fd)
        if label:
            self.labels[fd] = label
        return fd

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()


def open_file_volumes(vm: VmSpec, disks: Mapping[str, DiskAttachment], inherited: Inherited,
                      secrets_dir: str | os.PathLike = "/run") -> dict[str, DiskAttachment]:
    """The attachments with every file volume opened here, for QEMU to inherit (-add-fd): a
    volume's disk.img (its owner may have made it a link to a host file: never followed, only
    a regular file is used), a cloud-init seed, an emptyDisk. Opened read-only when the volume
    or the disk is, so QEMU can never write it; root's 0600 files need no handing over. A
    direct iSCSI volume's CHAP password becomes an unlinked file in `secrets_dir` (root's)."""
    readonly = {d.name for d in vm.disks if d.readonly}
    out = dict(disks)
    for name, att in disks.items():
        if att.iscsi is not None:
            if att.iscsi.chap is not None:  # its password, as a file QEMU inherits
                fd = inherited.keep(secret_fd(att.iscsi.chap.password, str(secrets_dir)))
                out[name] = dataclasses.replace(att, iscsi=dataclasses.replace(att.iscsi, secret_fd=fd))
            continue
        if att.block:
            continue
        flags = os.O_RDONLY if att.readonly or name in readonly else os.O_RDWR
        try:
            fd = open_no_follow(att.path, flags | (os.O_DIRECT if att.direct_io else 0))
        except UnsafeFile as exc:
            raise UnsafeFile(exc.errno, f"volume {name}: {exc}") from None
        out[name] = dataclasses.replace(att, fd=inherited.keep(fd))
        if att.overlay_of is not None:  # the image below a containerDisk's overlay: never written
            base = inherited.keep(open_no_follow(att.overlay_of.path, os.O_RDONLY), att.overlay_of.path)
            out[name] = dataclasses.replace(out[name], overlay_of=dataclasses.replace(att.overlay_of, fd=base))
    return out


def qemu_pid(proc: subprocess.Popen, argv0: str) -> int | None:
    """QEMU's own pid below the sandbox process `proc` (found by its argv[0])."""
    for pid in processes_below(proc.pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read().split(b"\0", 1)[0].decode(errors="replace") == argv0:
                    return pid
        except OSError:
            continue
    return None


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the sandbox's init and QEMU. bwrap itself is left to report it: the kernel lets
    a pid namespace's init finish only once every process in it is gone, so bwrap's exit (what
    the launcher waits for) means QEMU is dead and holds no volume. Before the sandbox has an
    init, bwrap itself is killed."""
    if proc.poll() is not None:
        return
    inside = processes_below(proc.pid)
    for pid in inside:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if not inside:
        proc.kill()


def exit_code(rc: int | None) -> int | None:
    """QEMU's exit as Popen would report it without the sandbox: bwrap reports a death by
    signal N as 128+N (QEMU itself exits 0 or 1)."""
    return -(rc - 128) if rc is not None and 128 < rc <= 128 + 64 else rc
