"""Run one QEMU for one VmSpec and watch it: the virt-launcher of pvlun.

The command line comes from the pure `build_qemu_argv`; this module only starts the
process, talks QMP to it (virt/qmp_session.py over `qemu.qmp`), and turns QMP events and
the process exit into a phase — Scheduling, Running, Paused, Migrating, Succeeded, Failed —
reported through `on_phase`. QEMU's stderr goes to `<run_dir>/qemu.stderr`, whose text is
what a failed start reports.

QEMU runs in a sandbox (host/sandbox.py) as the unprivileged sandbox user: a mount
namespace holding /usr, the private device nodes of its published block devices and /dev/kvm
when KVM is used, and a network namespace of its own (the host's only when it opens an iSCSI
LUN itself, virt/iscsi_direct.py). Everything else it inherits open from
root (virt/run_dir.py): its volume files, serial log, firmware variables, QMP and console
sockets, and one socket per network interface, whose other end is passt
(virt/guest_network.py). Live migration hands both QEMUs the ends of one socket pair. The
sandbox does not die with the thread that started it (QEMU outlives a daemon crash, as a pod
would).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Callable, Iterator, Mapping

from host.sandbox import Sandbox, open_no_follow
from virt.agent_link import AgentLink
from virt.accel import choose_accel, kvm_devices
from virt.console_history import SERIAL_LOG, ConsoleFollower, ConsoleHistory
from virt.guest_agent import AgentRefused
from virt.guest_network import GuestNetwork, choose_host_ports
from virt.container_volumes import BootKernel
from virt.qemu_args import (AGENT_CHANNEL, AGENT_PORT_ID, QEMU_BINARY, DiskAttachment, KernelFiles, Throttle,
                             build_qemu_argv)
from virt.qemu_sandbox import Inherited, exit_code, kill_tree, open_file_volumes, qemu_pid, qemu_sandbox
from virt.qmp_session import QmpError, QmpSession
from virt.run_dir import copy_into, listen_unix, open_file, prepare_run_dir, remove_sockets, socket_path
from controlplane.vm_spec import VmSpec

OVMF_CANDIDATES = {
    False: [("/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd"),
            ("/usr/share/OVMF/OVMF_CODE.fd", "/usr/share/OVMF/OVMF_VARS.fd")],
    True: [("/usr/share/OVMF/OVMF_CODE_4M.secboot.fd", "/usr/share/OVMF/OVMF_VARS_4M.ms.fd")],
}


class Phase(str, Enum):
    SCHEDULING = "Scheduling"
    RUNNING = "Running"
    PAUSED = "Paused"
    MIGRATING = "Migrating"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


class LaunchError(RuntimeError):
    """QEMU did not start; the message is QEMU's own error text."""

    def __init__(self, message: str, stderr: str = ""):
        self.stderr = stderr
        super().__init__(message)


def find_ovmf(secure_boot: bool) -> tuple[str, str]:
    """(code, vars template) of the installed OVMF (Debian package ovmf)."""
    for code, vars_ in OVMF_CANDIDATES[secure_boot]:
        if Path(code).exists() and Path(vars_).exists():
            return code, vars_
    raise LaunchError("efi firmware requested but OVMF is not installed (Debian package ovmf)")


class VmLauncher:
    """One QEMU process. Not thread-safe for concurrent commands from many callers."""

    def __init__(
        self,
        vm: VmSpec,
        disks: Mapping[str, DiskAttachment],
        run_dir: str | Path,
        *,
        accel: str | None = None,
        incoming: str | None = None,
        node: str = "",
        console: bool = False,
        host_ports: Mapping[tuple[str, int], int] | None = None,
        on_phase: Callable[["VmLauncher", Phase, str], None] | None = None,
        qemu_binary: str = QEMU_BINARY,
        extra_args: tuple[str, ...] = (),
        history: ConsoleHistory | None = None,
        kernel: BootKernel | None = None,
        on_agent: Callable[["VmLauncher", bool, dict | None], bool | None] | None = None,
    ):
        self.vm = vm
        self.disks = dict(disks)
        self.run_dir = Path(run_dir)
        self.accel = accel
        self.incoming = incoming
        self.node = node
        self.console = console
        self.host_ports = dict(host_ports) if host_ports is not None else None
        self.on_phase = on_phase
        self.qemu_binary = qemu_binary
        self.extra_args = extra_args
        self.history = history
        self.kernel = kernel  # firmware.kernelBoot's files, opened for QEMU at start
        self.qmp_path = socket_path(self.run_dir, "qmp.sock")
        self.serial_log = str(self.run_dir / SERIAL_LOG)
        self.console_path = socket_path(self.run_dir, "console.sock") if console else None
        self.stderr_path = self.run_dir / "qemu.stderr"
        self.agent_path = socket_path(self.run_dir, AGENT_CHANNEL)  # the guest agent channel's host end
        self.agent_link = AgentLink(self.agent_path, on_agent and (lambda c, i: on_agent(self, c, i)),
                                    port_open=None if incoming else False, name=vm.name)
        self.phase = Phase.SCHEDULING
        self.reason = ""
        self.argv: list[str] = []  # QEMU's own command line (inside the sandbox)
        self.proc: subprocess.Popen | None = None  # the sandbox (bwrap), whose exit is QEMU's
        self.qemu_pid: int | None = None  # QEMU itself, as the host sees it
        self.qmp: QmpSession | None = None
        self._sandbox: Sandbox | None = None
        self._network: GuestNetwork | None = None
        self._stopping = False
        self._shutdown_reason = ""
        self._lock = threading.Lock()
        self._exited = threading.Event()
        self._follower: ConsoleFollower | None = None
        self._quiescing = False  # a snapshot's pause: not a user's, so no Paused phase
        self._hold_lock = threading.RLock()  # a snapshot's instant and a user's pause/unpause, one at a time
        self._quiesce_resumed = threading.Event()  # the RESUME event of a quiesce's `cont` arrived
        self.last_pause_seconds: float | None = None  # the last quiesce's QMP stop→cont wall time

    # ------------------------------------------------------------ lifecycle

    @property
    def pid(self) -> int | None:
        return self.qemu_pid

    @property
    def returncode(self) -> int | None:
        return exit_code(self.proc.returncode) if self.proc else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 30) -> None:
        """Start QEMU and connect QMP; LaunchError carries QEMU's stderr if it dies first."""
        binary = shutil.which(self.qemu_binary)
        if binary is None:
            self._set_phase(Phase.FAILED, f"{self.qemu_binary} not found")
            raise LaunchError(f"cannot run {self.qemu_binary}: not found")
        self.accel = self.accel or choose_accel()
        if self.host_ports is None:
            self.host_ports = choose_host_ports(self.vm)
        self._set_phase(Phase.SCHEDULING, "starting QEMU")
        inherited = Inherited()  # what QEMU gets open; closed here once it has them
        try:
            prepare_run_dir(self.run_dir)
            if self.history is not None:
                self._follower = ConsoleFollower(self.history, self.run_dir)
            serial = inherited.keep(open_file(self.serial_log, os.O_WRONLY | os.O_APPEND), self.serial_log)
            stderr = inherited.keep(open_file(self.stderr_path, os.O_WRONLY | os.O_TRUNC))
            ovmf_code, ovmf_vars = self._firmware(inherited)
            qmp = inherited.keep(listen_unix(self.qmp_path, self.run_dir).detach())
            console = inherited.keep(listen_unix(self.console_path, self.run_dir).detach()) if self.console_path \
                else None
            agent = inherited.keep(listen_unix(self.agent_path, self.run_dir).detach())
            disks = open_file_volumes(self.vm, self.disks, inherited, self.run_dir)
            self._network = GuestNetwork(self.vm, self.run_dir, self.host_ports)
            nets = {name: inherited.keep(fd) for name, fd in self._network.start().items()}
            self.argv = build_qemu_argv(
                self.vm, disks, accel=self.accel, qmp_fd=qmp, serial_fd=serial, console_fd=console, net_fds=nets,
                incoming=self.incoming, ovmf_code=ovmf_code, ovmf_vars_fd=ovmf_vars, labels=inherited.labels,
                qemu_binary=self.qemu_binary, extra_args=self.extra_args, kernel=self._kernel_files(inherited),
                start_paused=not self.incoming, agent_fd=agent)  # the guest runs once its pid is known (below)
            self._sandbox = qemu_sandbox(disks, binary, [ovmf_code] if ovmf_code else [],
                                         kvm_devices() if self.accel == "kvm" else [])
            self.proc = subprocess.Popen(self._sandbox.wrap(self.argv), stdin=subprocess.DEVNULL, stdout=stderr,
                                         stderr=stderr, start_new_session=True, pass_fds=inherited.fds)
        except OSError as exc:
            self._close_sandbox()
            self._remove_sockets()
            self._set_phase(Phase.FAILED, str(exc))
            raise LaunchError(f"cannot start QEMU: {exc}") from None
        finally:
            inherited.close()
        self.qmp = QmpSession(self.qmp_path, self._on_event, name=self.vm.name)
        try:
            self.qmp.connect(timeout, alive=lambda: self.proc.poll() is None)
            self._sandbox.close()  # its namespace holds the private device nodes now: none stays on the host
            self.qemu_pid = qemu_pid(self.proc, self.qemu_binary)
            network_failure = self._network.failure()
            if network_failure:
                raise QmpError(network_failure)
            if not self.incoming:
                self.qmp.execute("cont")
            status = self.qmp.execute("query-status")["status"]
        except QmpError as exc:
            self._abort_start()
            text = self.stderr_text() or str(exc)
            self._set_phase(Phase.FAILED, text)
            raise LaunchError(f"QEMU failed to start: {text}", text) from None
        threading.Thread(target=self._watch_exit, name=f"wait-{self.vm.name}", daemon=True).start()
        self.agent_link.start()
        if not self.incoming:
            self.take_over_console()
        if status == "inmigrate":
            self._set_phase(Phase.MIGRATING, "waiting for incoming migration")
        elif status in ("paused", "prelaunch"):
            self._set_phase(Phase.PAUSED, status)
        else:
            self._set_phase(Phase.RUNNING, status)

    def _kernel_files(self, inherited: Inherited) -> KernelFiles | None:
        """The kernelBoot files, open for QEMU to read (never a path it opens itself)."""
        if self.kernel is None:
            return None
        kernel = inherited.keep(open_no_follow(self.kernel.kernel), self.kernel.kernel)
        initrd = inherited.keep(open_no_follow(self.kernel.initrd), self.kernel.initrd) if self.kernel.initrd else None
        return KernelFiles(kernel, initrd, self.kernel.args)

    def _firmware(self, inherited: Inherited) -> tuple[str | None, int | None]:
        """OVMF's code (read in /usr) and the guest's own variables, kept in the run directory
        across its runs (a copy of the template, made whole or not at all)."""
        if self.vm.firmware != "efi":
            return None, None
        code, template = find_ovmf(self.vm.secure_boot)
        path = str(self.run_dir / "OVMF_VARS.fd")
        if not os.path.lexists(path):
            copy_into(template, path)
        return code, inherited.keep(open_no_follow(path, os.O_RDWR), path)

    def _close_sandbox(self) -> None:
        if self._sandbox is not None:
            self._sandbox.close()
        if self._network is not None:
            self._network.stop()

    def _abort_start(self) -> None:
        if self.proc:
            kill_tree(self.proc)
            self.proc.wait()
        if self.qmp:
            self.qmp.close()
        self.agent_link.close()
        self._remove_sockets()
        self._close_sandbox()
        self._exited.set()

    def _remove_sockets(self) -> None:
        """A dead QEMU's sockets must not linger (nor the socket directory made for them)."""
        remove_sockets([s for s in (self.qmp_path, self.console_path, self.agent_path) if s], self.run_dir)

    def stderr_text(self) -> str:
        try:
            fd = open_no_follow(str(self.stderr_path))
        except OSError:
            return ""
        with os.fdopen(fd, "rb") as f:
            return f.read(64 << 10).decode(errors="replace").strip()

    def _watch_exit(self) -> None:
        assert self.proc is not None
        rc = exit_code(self.proc.wait())
        if self.qmp:
            self.qmp.close()
        self.agent_link.close()
        self._remove_sockets()
        self._close_sandbox()
        if self._follower is not None:
            self._follower.copy()  # the last words, before a migration target takes over
        if self.phase is Phase.SUCCEEDED:  # migrated away
            phase, reason = Phase.SUCCEEDED, self.reason
        elif self._stopping or (rc == 0 and self._shutdown_reason in ("guest-shutdown", "host-qmp-quit")):
            phase, reason = Phase.SUCCEEDED, self._shutdown_reason or f"exited {rc}"
        else:
            phase, reason = Phase.FAILED, f"QEMU exited {rc}" + (f": {self.stderr_text()}" if self.stderr_text() else "")
        self._set_phase(phase, reason)
        self._exited.set()

    def take_over_console(self) -> None:
        """From now on this QEMU's console output goes to the VM's history (a migration
        target calls this once the source is gone, so the history stays in order)."""
        if self._follower is not None:
            self._follower.start(self._exited, self.vm.name)

    def _on_event(self, event: dict) -> None:
        name, data = event.get("event"), event.get("data") or {}
        if name == "SHUTDOWN":
            self._shutdown_reason = data.get("reason", "")
        elif name in ("STOP", "RESUME") and self._quiescing:  # a snapshot's instant, not a change of phase
            if name == "RESUME":
                self._quiesce_resumed.set()
        elif name == "STOP" and self.phase not in (Phase.MIGRATING, Phase.SUCCEEDED, Phase.FAILED):
            self._set_phase(Phase.PAUSED, "paused")
        elif name == "RESUME" and self.phase not in (Phase.SUCCEEDED, Phase.FAILED):
            self._set_phase(Phase.RUNNING, "resumed")
        elif name == "GUEST_PANICKED":
            self._set_phase(Phase.FAILED, "guest panicked")
        elif name == "VSERPORT_CHANGE" and data.get("id") == AGENT_PORT_ID:
            self.agent_link.port_changed(data.get("open") is True)
        elif name == "MIGRATION" and data.get("status") in ("setup", "active", "device"):
            if self.phase is not Phase.MIGRATING:
                self._set_phase(Phase.MIGRATING, f"migration {data['status']}")

    def _set_phase(self, phase: Phase, reason: str) -> None:
        with self._lock:
            changed = phase is not self.phase or reason != self.reason
            self.phase, self.reason = phase, reason
        if changed and self.on_phase:
            try:
                self.on_phase(self, phase, reason)
            except Exception:  # noqa: BLE001 - a reporting failure must not kill supervision
                pass

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for QEMU to exit and its final phase to be set; the return code or None."""
        if self.proc is None:
            return None
        self._exited.wait(timeout)
        return self.returncode if self._exited.is_set() else None

    # ------------------------------------------------------------ control

    def execute(self, command: str, arguments: dict | None = None, timeout: float = 30):
        if self.qmp is None:
            raise QmpError("QEMU is not started")
        return self.qmp.execute(command, arguments, timeout)

    def hand_fd(self, name: str, fd: int) -> None:
        """Give QEMU an open descriptor as `name` (QMP getfd): a migration stream's socket."""
        if self.qmp is None:
            raise QmpError("QEMU is not started")
        self.qmp.send_fd(fd, name)

    def pause(self) -> None:
        with self._hold_lock:  # not inside a snapshot's instant: its `cont` would undo the pause
            self.execute("stop")
            self._set_phase(Phase.PAUSED, "paused by user")

    def unpause(self) -> None:
        with self._hold_lock:
            self.execute("cont")
            self._set_phase(Phase.RUNNING, "unpaused by user")

    @contextmanager
    def quiesced(self, timeout: float = 5) -> Iterator[str]:
        """Hold the guest still for a snapshot's instant; yields the indication that says how
        (KubeVirt's words): "GuestAgent" — its agent froze the guest's filesystems, so what they
        hold is consistent, and then it is paused as well, so every disk's blocks are of one
        instant; "NoGuestAgent" — no agent answered: paused only; "QuiesceFailed" — the agent
        refused the freeze: paused only. The pause is QMP `stop` (which drains and flushes the
        disks) and `cont` after the body; the filesystems are thawed after that. A guest paused
        before stays paused. The pause's wall time (stop→cont) is kept in last_pause_seconds;
        keep the body short. A pause or unpause asked meanwhile waits for the end."""
        with self._hold_lock:
            if self.execute("query-status", timeout=timeout)["status"] != "running":
                self.last_pause_seconds = 0.0
                yield "NoGuestAgent"  # paused (or not yet running): nothing writes
                return
            try:
                how = "GuestAgent" if self.freeze_filesystems(timeout) else "NoGuestAgent"
            except AgentRefused:  # thawed already; the snapshot goes on, crash-consistent, saying so
                how = "QuiesceFailed"
            try:
                with self._paused_for_snapshot(timeout):
                    yield how
            finally:
                if how == "GuestAgent":
                    self.thaw_filesystems()

    @contextmanager
    def _paused_for_snapshot(self, timeout: float) -> Iterator[None]:
        """QMP stop for the block, cont after it; a `cont` that fails leaves the VM shown Paused."""
        self._quiescing = True
        self._quiesce_resumed.clear()
        started = time.monotonic()
        try:
            self.execute("stop", timeout=timeout)
            yield
        finally:
            try:
                self.execute("cont", timeout=timeout)
                self.last_pause_seconds = time.monotonic() - started
                self._quiesce_resumed.wait(1)  # its RESUME event too is the quiesce's, not the VM's
            except QmpError:
                self._set_phase(Phase.PAUSED, "a snapshot's resume failed: unpause it")
                raise
            finally:
                self._quiescing = False

    def stop(self, grace: float | None = None, quit_timeout: float = 10) -> Phase:
        """ACPI powerdown, `quit` after `grace` seconds, SIGKILL if QEMU still lingers."""
        if not self.running():
            self.wait(5)
            return self.phase
        self._stopping = True
        grace = self.vm.termination_grace_period if grace is None else grace
        try:
            self.execute("system_powerdown", timeout=5)
        except QmpError:
            pass
        if self.wait(grace) is None:
            try:
                self.execute("quit", timeout=5)
            except QmpError:
                pass
            if self.wait(quit_timeout) is None:
                self.kill()
        return self.phase

    def kill(self) -> None:
        """SIGKILL QEMU (as a node failure would)."""
        if self.proc is not None:
            kill_tree(self.proc)
        self.wait(10)

    def mark_migrated(self) -> None:
        """The VM now runs elsewhere: stop this (source) QEMU as a success."""
        self._stopping = True
        self._set_phase(Phase.SUCCEEDED, "migrated")
        if self.running():
            try:
                self.execute("quit", timeout=5)
            except QmpError:
                pass
            if self.wait(10) is None:
                self.kill()
        self.wait(5)

    def note_migration_ended(self) -> None:
        """After a failed or cancelled outgoing migration: back to Running or Paused."""
        state = self.execute("query-status")["status"]
        self._set_phase(Phase.RUNNING if state == "running" else Phase.PAUSED, f"migration ended, {state}")

    def set_throttle(self, volume: str, throttle: Throttle) -> None:
        """Change a volume's IOPS/bandwidth limits live (its throttle group)."""
        if volume not in self.disks or self.disks[volume].throttle is None:
            raise ValueError(f"volume {volume!r} has no throttle group")
        self.execute("qom-set", {"path": f"tg-{volume}", "property": "limits",
                                 "value": {"iops-total": throttle.iops_total, "bps-total": throttle.bps_total}})
        self.disks[volume] = DiskAttachment(**{**self.disks[volume].__dict__, "throttle": throttle})

    def throttle_limits(self, volume: str) -> dict:
        """The throttle group's current limits as QEMU reports them."""
        return self.execute("qom-get", {"path": f"tg-{volume}", "property": "limits"})

    # ------------------------------------------------------------ guest agent (virt/agent_link.py)

    def agent_connected(self) -> bool:
        """True when the guest agent answers guest-ping now (within a second)."""
        return self.agent_link.connected()

    def freeze_filesystems(self, timeout: float) -> bool:
        """Freeze the guest's filesystems through its agent: True when frozen, False when no agent
        answered within `timeout` seconds (pause instead); AgentRefused if the agent failed."""
        return self.agent_link.freeze(timeout)

    def thaw_filesystems(self) -> None:
        """Thaw what freeze_filesystems froze; always safe to call, never raises."""
        self.agent_link.thaw()

    # ------------------------------------------------------------ serial console

    def serial_text(self) -> str:
        try:
            return Path(self.serial_log).read_bytes().decode(errors="replace")
        except OSError:
            return ""

    def wait_for_serial(self, text: str, timeout: float = 30, count: int = 1) -> bool:
        """True once `text` occurs `count` times in the serial log; False on timeout or exit."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.serial_text().count(text) >= count:
                return True
            if self.proc is not None and self.proc.poll() is not None:
                return self.serial_text().count(text) >= count
            time.sleep(0.05)
        return False

    def status(self) -> dict:
        """A VMI-status-like summary (no host paths: a person reads it; the run directory is
        where the code finds the rest)."""
        return {"phase": self.phase.value, "reason": self.reason, "node": self.node, "pid": self.pid,
                "accel": self.accel, "hostPorts": {f"{p}/{n}": h for (p, n), h in (self.host_ports or {}).items()}}
