"""`pvlun launch`: one VMI's QEMU in its launcher Pod (or anywhere), as virt-launcher runs it.

The VMI comes from a file (in a Pod: the downward-API file of its `pvlun.dev/vmi` annotation,
virt/pods.py), at most MAX_VMI_BYTES of JSON, and passes every check `pvlun apply` makes
before anything runs. Each claim is found where the Pod spec puts it — a Block claim's device
at /dev/pvlun/<volume>, else a Filesystem claim's disk.img — unless a `--volume NAME=PATH`
says otherwise; cloud-init seeds and emptyDisks are made in the disk directory. QEMU then runs
exactly as in the embedded mode (virt/launcher.py: the same argv, sandbox, QMP), its serial
console copied to our stdout (so `kubectl logs` shows the guest) while its log on disk is cut
back as it grows (virt/console_history.py), its QMP socket in the run directory.

The process ends with QEMU: 0 when the guest powered off, or when the VMI migrated away; 1 when
QEMU failed. SIGTERM (a Pod being deleted) powers the guest off within its grace period.
Progress goes to stderr as JSON lines; a refused VMI is one line there.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, TextIO

from host.addresses import local_address_in, parse_network
from host.sandbox import UnsafeFile
from controlplane.vm_spec import VmSpec
from virt.console_history import ConsoleHistory
from virt.launcher import LaunchError, Phase, VmLauncher
from virt.iscsi_direct import parse_url
from virt.local_volumes import local_attachments
from virt.migration import MigrationFailed
from virt.pod_migration import ControlServer, listen, receive, wait_resumed
from virt.pods import DISK_DIR, MAX_VMI_BYTES, RUN_DIR, volume_path, vmi_spec
from virt.qemu_args import DiskAttachment, Throttle

CSI_SOURCES = ("dataVolume", "persistentVolumeClaim")
INCOMING_TIMEOUT = 600.0  # seconds a target waits for the stream (the controller deletes a stale one sooner)


@dataclass
class LaunchOptions:
    vmi_file: str
    run_dir: str = RUN_DIR
    disk_dir: str = DISK_DIR
    accel: str | None = None  # kvm, tcg, or None: probe
    volumes: dict[str, str] = field(default_factory=dict)  # volume name → path, instead of the Pod's
    incoming_port: int | None = None  # a migration target: wait for the stream on this port
    listen_address: str = ""  # "": every address of the Pod
    token: str | None = None  # the migration's shared token
    incoming_timeout: float = INCOMING_TIMEOUT
    migration_network: str = ""  # CIDR: migrate in (listen) and out (connect) on our address in it


def read_vmi(path: str) -> VmSpec:
    """The VMI in `path` (JSON, at most MAX_VMI_BYTES), checked as `pvlun apply` checks it."""
    with open(path, "rb") as f:
        data = f.read(MAX_VMI_BYTES + 1)
    if len(data) > MAX_VMI_BYTES:
        raise ValueError(f"{path}: the VMI is larger than {MAX_VMI_BYTES} bytes")
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError):
        raise ValueError(f"{path}: not a JSON VirtualMachineInstance") from None
    return vmi_spec(obj)


def pod_attachments(spec: VmSpec, overrides: dict[str, str], disk_dir: str, node: str = "") -> dict[str, DiskAttachment]:
    """Every volume's attachment: the claims where the Pod has them (or `overrides`: a path, or
    an `iscsi://HOST:PORT/IQN/LUN` QEMU logs in to itself as `node`'s initiator), and the
    cloud-init seeds and emptyDisks made in `disk_dir`."""
    claims = {v.name: v for v in spec.volumes if v.source in CSI_SOURCES}
    unknown = sorted(set(overrides) - set(claims))
    if unknown:
        raise ValueError(f"--volume {unknown[0][:63]}: the VMI has no dataVolume or persistentVolumeClaim volume "
                         "of that name")
    disks: dict[str, DiskAttachment] = {}
    for name, volume in claims.items():
        if (overrides.get(name) or "").startswith("iscsi://"):
            disks[name] = DiskAttachment.for_iscsi(parse_url(overrides[name], node), readonly=volume.readonly,
                                                   throttle=Throttle())
            continue
        path = overrides.get(name) or (volume_path(name, True) if os.path.lexists(volume_path(name, True))
                                       else volume_path(name, False))
        try:  # an unlimited throttle group: its limits can be set live
            disks[name] = DiskAttachment.for_path(path, readonly=volume.readonly, throttle=Throttle())
        except UnsafeFile as exc:
            raise UnsafeFile(exc.errno, f"volume {name} (claim {volume.claim_name}): {exc}") from None
        except FileNotFoundError:
            raise FileNotFoundError(f"volume {name} (claim {volume.claim_name}): nothing at {path}") from None
    disks.update(local_attachments(spec, disk_dir))
    return disks


class StreamConsole(ConsoleHistory):
    """The serial console's bytes written to a stream (stdout) instead of kept in a file."""

    def __init__(self, stream: BinaryIO):
        super().__init__(os.devnull)
        self.stream = stream

    def append(self, data: bytes) -> None:
        with self._lock:
            if data:
                self.stream.write(data)
                self.stream.flush()

    def read(self) -> bytes:
        return b""


def _logger(err: TextIO) -> Callable[..., None]:
    def log(event: str, **fields) -> None:
        err.write(json.dumps({"time": round(time.time(), 3), "event": event, **fields}) + "\n")
        err.flush()
    return log


def run_launch(options: LaunchOptions, out: BinaryIO | None = None, err: TextIO | None = None) -> int:
    """Run the VMI until QEMU ends; the process's exit code."""
    out = out or sys.stdout.buffer
    log = _logger(err or sys.stderr)
    spec = read_vmi(options.vmi_file)
    node = os.environ.get("NODE_NAME") or socket.gethostname()  # the Pod's node (downward API)
    disks = pod_attachments(spec, options.volumes, options.disk_dir, node)
    incoming = options.incoming_port is not None
    network = parse_network(options.migration_network) if options.migration_network else None
    if network is not None and options.listen_address:
        raise ValueError("give --listen-address or --migration-network, not both")
    address = local_address_in(network) if network is not None else options.listen_address
    server = listen(options.incoming_port, address) if incoming else None
    launcher = VmLauncher(spec, disks, options.run_dir, accel=options.accel, incoming="defer" if incoming else None,
                          node=node, history=StreamConsole(out),
                          on_phase=lambda _l, phase, reason: log("phase", phase=phase.value, reason=reason))
    stopping = threading.Event()

    def on_signal(signum: int, _frame) -> None:
        if not stopping.is_set():
            stopping.set()
            log("stopping", signal=signal.Signals(signum).name)
            threading.Thread(target=launcher.stop, name="stop", daemon=True).start()

    # Kept to the process's end (run_launch is the process: pvlun launch): the Pod of a launcher
    # whose guest moved away is deleted as the launcher ends, and that SIGTERM must not turn a
    # clean end into a kill.
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, on_signal)
    control = None
    try:
        try:
            launcher.start()
        except LaunchError as exc:
            raise LaunchError(str(exc).splitlines()[0] if str(exc) else "QEMU did not start") from None
        control = ControlServer(launcher, options.run_dir, node, network)
        control.start()
        if server is not None:
            try:
                receive(launcher, server, options.token, timeout=options.incoming_timeout,
                        log=lambda text: log("migration", message=text))
            except MigrationFailed as exc:
                log("migration", message=str(exc))
                launcher.kill()
            else:
                server = None
                if wait_resumed(launcher):
                    log("migration", message="the guest runs here")
                    launcher.take_over_console()
        while launcher.wait(0.2) is None:
            pass
        with control.busy:  # a migration's reply goes out before the process ends
            pass
    except BaseException:
        launcher.kill()  # nothing of this VMI outlives its launcher
        raise
    finally:
        if server is not None:
            server.close()
        if control is not None:
            control.close()
    log("exit", phase=launcher.phase.value, reason=launcher.reason, code=launcher.returncode)
    return 0 if launcher.phase is Phase.SUCCEEDED else 1
