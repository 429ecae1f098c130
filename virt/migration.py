"""Live migration between two launchers over a socket pair.

Both QEMUs run on this host, each without network: the daemon makes a unix socket pair and
hands one end to each over QMP (`getfd`), so the stream goes from QEMU to QEMU and nothing
else — no port a guest or a local user could reach, no path in either sandbox.

Sequence (KubeVirt's phases in brackets): pre hooks [PreparingTarget] → target QEMU
started with `-incoming defer` → `migrate-incoming` on its end of the pair [TargetReady] →
downtime limit and bandwidth set on the source → `migrate` [Running] → `query-migrate`
polled into the status → completed: the source QEMU quits, post hooks [Succeeded].
Anything failing (a pre hook, the target dying mid-way, a timeout, QEMU reporting
failed/cancelled) cancels the migration, keeps or resumes the source, kills the target and
runs the failed hooks [Failed].

The stream steps (`accept_stream`, `start_sending`, `follow_sending`) take any connected
socket: between launcher Pods it is TCP over the pod network (virt/pod_migration.py). With a
dedicated migration network (`pvlun serve --migration-network CIDR`) the pair is a TCP
connection over this host's address in that network (`tcp_stream_pair`), so the stream
crosses that network's interface and is counted, shaped and firewalled there.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable

from virt.hooks import HookContext, HookError, MigrationHooks
from virt.launcher import LaunchError, Phase, VmLauncher
from virt.qmp_session import QmpError

DEFAULT_DOWNTIME_LIMIT_MS = 300  # QEMU's own default
DEFAULT_BANDWIDTH = 10 << 30  # bytes/s: a local socket is not the bottleneck, don't throttle it
STREAM = "migration"  # the name both QEMUs know their end of the socket pair by


class MigrationFailed(RuntimeError):
    pass


StreamPair = Callable[[], tuple[socket.socket, socket.socket]]


def local_stream_pair() -> tuple[socket.socket, socket.socket]:
    """(outgoing, incoming): a unix socket pair, reachable by nothing but the two QEMUs."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)


def tcp_stream_pair(address: str, timeout: float = 10) -> StreamPair:
    """A StreamPair over TCP on `address` (this host's address in the migration network): a
    listening socket on an ephemeral port that takes only the connection we make ourselves
    (its peer must be our own socket's address), then closes."""
    def make() -> tuple[socket.socket, socket.socket]:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        with socket.create_server((address, 0), family=family) as server:
            server.settimeout(timeout)
            outgoing = socket.create_connection(server.getsockname()[:2], timeout=timeout,
                                                source_address=(address, 0))
            try:
                while True:  # a stranger that raced us to the port is dropped
                    incoming, peer = server.accept()
                    if peer[:2] == outgoing.getsockname()[:2]:
                        break
                    incoming.close()
            except BaseException:
                outgoing.close()
                raise
        outgoing.settimeout(None)
        incoming.settimeout(None)
        return outgoing, incoming

    return make


@dataclass
class MigrationStatus:
    source_node: str
    target_node: str
    phase: str = "Pending"
    qemu_status: str = ""
    data_total: int = 0
    data_remaining: int = 0
    data_transferred: int = 0
    expected_downtime_ms: int | None = None
    downtime_ms: int | None = None
    setup_time_ms: int | None = None
    total_time_ms: int | None = None
    error: str | None = None
    started: float = 0.0
    ended: float | None = None

    def as_dict(self) -> dict:
        """camelCase, ready for a VirtualMachineInstanceMigration's status."""
        return {"phase": self.phase, "sourceNode": self.source_node, "targetNode": self.target_node,
                "qemuStatus": self.qemu_status, "dataTotal": self.data_total, "dataRemaining": self.data_remaining,
                "dataTransferred": self.data_transferred, "expectedDowntimeMs": self.expected_downtime_ms,
                "downtimeMs": self.downtime_ms, "setupTimeMs": self.setup_time_ms, "totalTimeMs": self.total_time_ms,
                "error": self.error, "startTimestamp": self.started,
                "endTimestamp": self.ended}


def _update(status: MigrationStatus, info: dict) -> None:
    status.qemu_status = info.get("status", status.qemu_status)
    ram = info.get("ram") or {}
    status.data_total = ram.get("total", status.data_total)
    status.data_remaining = ram.get("remaining", status.data_remaining)
    status.data_transferred = ram.get("transferred", status.data_transferred)
    for key, attr in (("expected-downtime", "expected_downtime_ms"), ("downtime", "downtime_ms"),
                      ("setup-time", "setup_time_ms"), ("total-time", "total_time_ms")):
        if key in info:
            setattr(status, attr, info[key])


def migrate(
    source: VmLauncher,
    target: VmLauncher | Callable[[], VmLauncher],
    *,
    hooks: MigrationHooks | None = None,
    source_node: str | None = None,
    target_node: str | None = None,
    downtime_limit_ms: int = DEFAULT_DOWNTIME_LIMIT_MS,
    max_bandwidth: int = DEFAULT_BANDWIDTH,
    timeout: float = 300,
    poll_interval: float = 0.05,
    on_progress: Callable[[MigrationStatus], None] | None = None,
    cancel: threading.Event | None = None,
    stream_pair: StreamPair = local_stream_pair,
) -> MigrationStatus:
    """Live-migrate `source` into `target` (a launcher, or a factory called after the pre hooks).

    The target launcher must have been made with incoming="defer" and not yet started; the
    stream goes over the connected sockets `stream_pair()` makes (outgoing, incoming).
    Returns the final status (phase Succeeded or Failed); never leaves two running copies.
    """
    hooks = hooks or MigrationHooks()
    cancel = cancel or threading.Event()

    def check_cancel() -> None:
        if cancel.is_set():
            raise MigrationFailed("migration cancelled")

    status = MigrationStatus(source_node or source.node, target_node or "", started=time.time())
    progress = on_progress or (lambda s: None)
    target_launcher: VmLauncher | None = None
    was_paused = source.phase is Phase.PAUSED

    def context(event: str) -> HookContext:
        return HookContext(event, source.vm, status.source_node, status.target_node, status.as_dict(), status.error)

    def set_phase(phase: str) -> None:
        status.phase = phase
        progress(status)

    try:
        if not source.running() or source.phase not in (Phase.RUNNING, Phase.PAUSED):
            raise MigrationFailed(f"source is not running (phase {source.phase.value})")
        set_phase("PreparingTarget")
        if isinstance(target, VmLauncher):
            target_launcher = target
            status.target_node = status.target_node or target.node
            hooks.run(context("pre"), stop_on_error=True)
        else:
            hooks.run(context("pre"), stop_on_error=True)
            target_launcher = target()
            status.target_node = status.target_node or target_launcher.node
        check_cancel()
        if target_launcher.incoming != "defer":
            raise MigrationFailed('the target launcher must be created with incoming="defer"')
        target_launcher.start()

        def target_gone() -> str | None:
            if target_launcher.running():
                return None
            said = target_launcher.stderr_text() or "no error text"
            return f"target QEMU exited {target_launcher.returncode}: {said}"

        try:
            outgoing, incoming = stream_pair()
        except OSError as exc:
            raise MigrationFailed(f"no migration stream: {exc.strerror or exc}") from None
        with outgoing, incoming:  # each QEMU holds its own copy once handed over
            try:
                accept_stream(target_launcher, incoming.fileno())
            except QmpError as exc:  # it died between starting and taking the stream
                raise MigrationFailed(target_gone() or f"the target QEMU did not take the stream: {exc}") from None
            set_phase("TargetReady")
            start_sending(source, outgoing.fileno(), downtime_limit_ms=downtime_limit_ms, max_bandwidth=max_bandwidth)
        set_phase("Running")

        follow_sending(source, status, target_gone=target_gone, timeout=timeout, poll_interval=poll_interval,
                       progress=progress, cancel=cancel)
        wait_target_running(target_launcher, timeout=30)
        source.mark_migrated()
        target_launcher.take_over_console()  # after the source's last console bytes
        status.ended = time.time()
        set_phase("Succeeded")
        errors = hooks.run(context("post"), stop_on_error=False)
        if errors:
            status.error = "post hooks failed: " + "; ".join(errors)
            progress(status)
        return status
    except (MigrationFailed, HookError, LaunchError, QmpError) as exc:
        status.error = str(exc)
        recover_source(source, was_paused)
        if target_launcher is not None and target_launcher.proc is not None:
            target_launcher.kill()
        status.ended = time.time()
        set_phase("Failed")
        hooks.run(context("failed"), stop_on_error=False)
        return status


def accept_stream(target: VmLauncher, fd: int) -> None:
    """Make a target QEMU (started with incoming="defer") take the migration stream from the
    connected socket `fd` (handed over QMP; the caller closes its own copy)."""
    target.execute("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})
    target.hand_fd(STREAM, fd)
    target.execute("migrate-incoming", {"uri": f"fd:{STREAM}"})


def start_sending(source: VmLauncher, fd: int, *, downtime_limit_ms: int = DEFAULT_DOWNTIME_LIMIT_MS,
                  max_bandwidth: int = DEFAULT_BANDWIDTH) -> None:
    """Start migrating the source QEMU into the connected socket `fd` (handed over QMP; the
    caller closes its own copy before following, so a dead peer fails the stream)."""
    source.execute("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})
    source.hand_fd(STREAM, fd)
    source.execute("migrate-set-parameters", {"downtime-limit": downtime_limit_ms, "max-bandwidth": max_bandwidth})
    source.execute("migrate", {"uri": f"fd:{STREAM}"})


def follow_sending(source: VmLauncher, status: MigrationStatus, *, target_gone: Callable[[], str | None],
                   timeout: float, poll_interval: float, progress: Callable[[MigrationStatus], None],
                   cancel: threading.Event) -> None:
    """Poll the source's `query-migrate` into `status` until QEMU says completed; MigrationFailed
    when it fails, the target is gone (`target_gone` says why), `cancel` is set or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while True:
        if cancel.is_set():
            raise MigrationFailed("migration cancelled")
        info = source.execute("query-migrate")
        _update(status, info)
        progress(status)
        if status.qemu_status == "completed":
            return
        if status.qemu_status in ("failed", "cancelled"):
            raise MigrationFailed(info.get("error-desc") or f"migration {status.qemu_status}")
        gone = target_gone()
        if gone:
            raise MigrationFailed(gone)
        if time.monotonic() > deadline:
            raise MigrationFailed(f"migration did not complete within {timeout}s")
        time.sleep(poll_interval)


def wait_target_running(target: VmLauncher, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = target.execute("query-status")["status"]
        if state in ("running", "paused"):
            return
        if not target.running():
            break
        time.sleep(0.02)
    raise MigrationFailed("target did not take over after the migration completed")


def recover_source(source: VmLauncher, was_paused: bool) -> None:
    """Cancel an in-flight migration and make sure the source guest runs again."""
    if not source.running():
        return
    try:
        info = source.execute("query-migrate")
        if info.get("status") in ("setup", "active", "device", "pre-switchover"):
            source.execute("migrate_cancel")
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and source.execute("query-migrate").get("status") not in (
                    "cancelled", "failed", "completed"):
                time.sleep(0.05)
        if source.execute("query-status")["status"] in ("postmigrate", "finish-migrate", "paused") \
                and not was_paused:
            source.execute("cont")
        source.note_migration_ended()
    except QmpError:
        pass
