"""QEMU as a sandboxed process: what its sandbox holds, which pid is QEMU, how it ends.

The launcher runs `bwrap … setpriv … qemu-system-x86_64 …` (pvlun/sandbox.py). Three
processes then stand for one QEMU: bwrap, the sandbox's init and QEMU itself. The VMI status
names QEMU's own pid (what a person or a test kills, what start-up repair looks for), a kill
ends the whole tree, and the exit status bwrap reports is turned back into QEMU's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Mapping

from pvlun.sandbox import Sandbox, give, lent, processes_below
from virt.qemu_args import DiskAttachment
from virt.spec import VmSpec


def qemu_sandbox(disks: Mapping[str, DiskAttachment], run_dir: Path, sockets: list[str], binary: str,
                 firmware: list[str], devices: list[str], lending: contextlib.ExitStack) -> Sandbox:
    """What one QEMU may reach: its run dir (serial log, sockets, firmware variables, local
    disks), its other socket dirs, its volumes, firmware outside /usr, and `devices` (/dev/kvm).
    Writable file volumes are bound: its own (cloud-init, emptyDisk) handed to the sandbox user,
    others (a Filesystem claim's disk.img) lent until `lending` closes, when QEMU is gone;
    read-only ones are not in it at all (QEMU inherits them open: `open_read_only`); block
    volumes become private device nodes."""
    writable = [str(run_dir)] + sorted({str(Path(s).parent) for s in sockets if not inside(s, run_dir)})
    read_only = [p for p in [binary, *firmware] if not os.path.realpath(p).startswith("/usr/")]
    devices = list(devices)
    for att in disks.values():
        if att.block:
            devices.append(att.path)
        elif att.fd is None and inside(att.path, run_dir):
            give(att.path)
        elif att.fd is None:
            lending.enter_context(lent(att.path))
            writable.append(att.path)
    return Sandbox(read_only=read_only, writable=writable, devices=devices, network=True, die_with_parent=False)


def open_read_only(vm: VmSpec, disks: Mapping[str, DiskAttachment]) -> dict[str, DiskAttachment]:
    """The attachments with every read-only file volume opened here, for QEMU to inherit: it
    then reads a file the sandbox user may not (a read-only mount's root-owned disk.img)
    and can never write it. The caller passes the descriptors on and closes them."""
    readonly = {d.name for d in vm.disks if d.readonly}
    out = dict(disks)
    for name, att in disks.items():
        if not att.block and (att.readonly or name in readonly):
            fd = os.open(att.path, os.O_RDONLY | os.O_CLOEXEC | (os.O_DIRECT if att.direct_io else 0))
            out[name] = dataclasses.replace(att, fd=fd)
    return out


def socket_path(run_dir: Path, name: str) -> str:
    """run_dir/name, or a short stand-in when that is too long for a unix socket (108 bytes):
    in a directory of this run dir's own, so a sandbox is handed its sockets and no others."""
    path = str(run_dir / name)
    if len(path.encode()) < 100:
        return path
    digest = hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), "pvlun-sockets", digest, name)


def inside(path: str, directory: Path) -> bool:
    return os.path.realpath(path).startswith(os.path.realpath(directory) + os.sep)


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
