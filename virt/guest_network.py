"""The guest's network: one passt per interface, QEMU's end of it an inherited socket.

QEMU itself has no network at all (its sandbox has a network namespace of its own, holding
only a loopback device). Each masquerade interface is a `-netdev stream` over one end of a
socket pair whose other end passt holds (Debian package `passt`, "Plug A Simple Socket
Transport"): passt turns the guest's frames into ordinary sockets of the host. So the guest
reaches by address what a process of the host could, except the host itself through its
gateway: `--no-map-gw` keeps passt from mapping the gateway address to the host's loopback,
which QEMU's user-mode network did (a guest then read services listening only on 127.0.0.1:
metrics, the upload endpoint, other VMs' forwarded ports, migration streams). Forwarded
ports (a masquerade interface's `ports`) are passt's too, on 127.0.0.1 of the host.

The guest sees KubeVirt's masquerade addresses: 10.0.2.2/24 by DHCP, gateway 10.0.2.1, the
host's DNS servers. IPv4 only. passt drops to `nobody` and sandboxes itself (namespaces,
seccomp) once its sockets are open, and exits when QEMU closes its end. It needs a host
interface with a default route: on a host without one a VM with an interface does not start
(passt says so; `autoattachPodInterface: false` gives a VM no interface).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
from pathlib import Path
from typing import Mapping

from host.sandbox import open_no_follow, sandbox_ids
from controlplane.vm_spec import Interface, VmSpec

PASST = "passt"
GUEST_ADDRESS = "10.0.2.2"
GATEWAY = "10.0.2.1"
PREFIX_LENGTH = 24
LOG_FILE = "passt.log"


def choose_host_ports(vm: VmSpec) -> dict[tuple[str, int], int]:
    """A currently free port of the host's 127.0.0.1 for each forwarded (protocol, guest port)."""
    out = {}
    for port in (p for iface in vm.interfaces for p in iface.ports):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            out[(port.protocol, port.port)] = s.getsockname()[1]
    return out


def build_passt_argv(iface: Interface, fd: int, host_ports: Mapping[tuple[str, int], int], log: str) -> list[str]:
    """passt for one interface (pure): the guest's end of `fd`, its forwarded ports, its log."""
    uid, gid = sandbox_ids()
    argv = [PASST, "--foreground", "--quiet", "--log-file", log, "--fd", str(int(fd)), "--runas", f"{uid}:{gid}",
            "--no-map-gw", "--ipv4-only", "--address", GUEST_ADDRESS, "--netmask", str(PREFIX_LENGTH),
            "--gateway", GATEWAY]
    for port in iface.ports:
        host = host_ports.get((port.protocol, port.port))
        if host is None:
            raise ValueError(f"no host port for {port.protocol} {port.port} of interface {iface.name}")
        flag = "--tcp-ports" if port.protocol == "TCP" else "--udp-ports"
        argv += [flag, f"127.0.0.1/{int(host)}:{int(port.port)}"]
    return argv


class GuestNetwork:
    """The passt processes of one QEMU: started before it, checked once it runs, ended after it."""

    def __init__(self, vm: VmSpec, run_dir: Path, host_ports: Mapping[tuple[str, int], int]):
        self.vm = vm
        self.log = str(run_dir / LOG_FILE)
        self.host_ports = host_ports
        self.processes: list[subprocess.Popen] = []

    def start(self) -> dict[str, int]:
        """Start passt for every interface; QEMU's socket per interface (the caller hands them
        to QEMU and closes them)."""
        ends: dict[str, int] = {}
        try:
            if self.vm.interfaces:  # a fresh log in root's run dir, which passt appends to
                os.close(open_no_follow(self.log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC))
            for iface in self.vm.interfaces:
                theirs, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                with theirs:
                    ends[iface.name] = ours.detach()
                    argv = build_passt_argv(iface, theirs.fileno(), self.host_ports, self.log)
                    self.processes.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                                           stderr=subprocess.DEVNULL, pass_fds=[theirs.fileno()],
                                                           start_new_session=True))
        except BaseException:
            for fd in ends.values():
                os.close(fd)
            self.stop()
            raise
        return ends

    def failure(self) -> str | None:
        """What passt said if one of them has exited (a forwarded port in use, no usable host
        interface): the guest would have no network."""
        if not any(p.poll() is not None for p in self.processes):
            return None
        try:
            text = Path(self.log).read_text(errors="replace")
        except OSError:
            text = ""
        said = [re.sub(r"^[\d.]+:\s*(ERROR:\s*)?", "", line).strip() for line in text.splitlines()[1:]]
        return "guest network (passt): " + ("; ".join(s for s in said if s) or "exited")

    def stop(self) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        self.processes = []
