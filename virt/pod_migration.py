"""Live migration between two launcher Pods over the pod network.

In a cluster the two QEMUs are on different nodes, so the stream is TCP: the target launcher
(`pvlun launch --incoming PORT`) listens on its Pod's address, the source launcher connects to
it when told to (`pvlun launch-migrate`, which the controller runs in the source Pod as
virt-handler would tell its virt-launcher). Neither QEMU has a network: each launcher hands its
QEMU the connected socket over QMP, exactly as the embedded mode hands it one end of a socket
pair (virt/migration.py's `accept_stream` / `start_sending` / `follow_sending`).

Before any byte reaches QEMU, the target reads one line from the connection: HEADER, then the
shared token (a Secret both sides were given) or `-`. A connection with the wrong line is closed
and the target waits on; a port scanner or a stranger on the pod network never feeds QEMU. The
right line is answered with ACCEPTED before the target's QEMU takes the socket, so the source
starts its QEMU only on a target that took it, and a refusal is said as one (a wrong token).
The source turns on QEMU's `return-path`, so it completes only once the target has loaded the
state; then it quits, and the target runs the guest. The stream itself is not encrypted (as
KubeVirt with TLS disabled): the pod network must be trusted with guest memory.

The source launcher takes orders on a unix socket in its run directory (root's, 0700): one
JSON request line, one JSON reply line (the migration's status, camelCase).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
import re
import socket
import threading
import time
from pathlib import Path
from typing import Callable

from controlplane.user_text import user_text
from host.addresses import Network, local_address_in
from host.command import CommandError
from virt.launcher import Phase, VmLauncher
from virt.migration import MigrationFailed, MigrationStatus, accept_stream, follow_sending, recover_source, \
    start_sending
from virt.pod_freeze import Freezer
from virt.qmp_session import QmpError
from virt.run_dir import listen_unix, remove_sockets, socket_path

HEADER = b"PVLUN-MIGRATION/2 "
ACCEPTED = b"PVLUN-MIGRATION/2 OK\n"
ACCEPT_TIMEOUT = 60.0  # seconds the source waits for ACCEPTED: the target accepts once its QEMU started
CONTROL_SOCKET = "launcher.sock"
TOKEN = re.compile(r"[A-Za-z0-9+/=_.-]{16,256}")
_HOST = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9.]{0,251}[A-Za-z0-9])?")
_LINE_MAX = 4096
MIGRATION_TIMEOUT = 300.0  # seconds for one migration, as the embedded mode allows


def read_token(path: str) -> str:
    """The shared token from a file (`-`: stdin), checked: 16 to 256 base64/hex characters."""
    if path == "-":
        text = os.read(0, 1024).decode(errors="replace")
    else:
        with open(path, "rb") as f:
            text = f.read(1024).decode(errors="replace")
    text = text.strip()
    if not TOKEN.fullmatch(text):
        raise ValueError("the migration token must be 16 to 256 letters, digits or '+/=_.-'")
    return text


def parse_address(text: str) -> tuple[str, int]:
    """HOST:PORT or [IPV6]:PORT of a migration target; ValueError says what is wrong."""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{text[:80]!r} is not HOST:PORT (an IPv6 address in brackets)") from None
    elif not sep or not _HOST.fullmatch(host):
        raise ValueError(f"{text[:80]!r} is not HOST:PORT (an address or DNS name, and a port)")
    if not port.isascii() or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text[:80]!r} has no port within 1..65535")
    return host, int(port)


def listen(port: int, address: str = "") -> socket.socket:
    """The target's listening socket: every address of the Pod (IPv4 and IPv6) unless `address`."""
    if not address and socket.has_dualstack_ipv6():
        return socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True)
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    return socket.create_server((address or "0.0.0.0", port), family=family)


class _Silent(ConnectionError):
    """The peer closed without sending a byte (a TCP probe)."""


def _read_line(conn: socket.socket, limit: int) -> bytes:
    """One line, byte by byte: nothing after the newline is taken from QEMU's stream."""
    line = b""
    while not line.endswith(b"\n"):
        byte = conn.recv(1)
        if not byte and not line:
            raise _Silent("closed before a byte")
        if not byte or len(line) >= limit:
            raise ConnectionError("no header line")
        line += byte
    return line


def receive(target: VmLauncher, server: socket.socket, token: str | None, *, timeout: float,
            log: Callable[[str], None]) -> None:
    """Wait (up to `timeout` s, while the target QEMU lives) for the source's connection with the
    right header, hand it to the target QEMU and close the listening socket."""
    expected = HEADER + (token or "-").encode() + b"\n"
    deadline = time.monotonic() + timeout
    server.settimeout(0.5)
    with server:
        while True:
            if not target.running() or time.monotonic() > deadline:
                raise MigrationFailed("no migration stream arrived" if target.running() else "QEMU exited")
            try:
                conn, peer = server.accept()
            except (socket.timeout, InterruptedError):
                continue
            with conn:
                try:
                    conn.settimeout(10)
                    line = _read_line(conn, len(expected) + 1)
                except _Silent:
                    continue  # connected and closed: the kubelet's startup probe
                except OSError as exc:
                    log(f"migration connection from {peer[0]} refused: {exc}")
                    continue
                if not hmac.compare_digest(line, expected):
                    log(f"migration connection from {peer[0]} refused: wrong header or token")
                    continue
                try:
                    conn.sendall(ACCEPTED)
                except OSError as exc:
                    log(f"migration connection from {peer[0]} lost: {exc}")
                    continue
                conn.settimeout(None)
                accept_stream(target, conn.fileno())
                log(f"migration stream from {peer[0]} accepted")
                return


def wait_resumed(target: VmLauncher) -> bool:
    """Wait until the migrated guest runs (or stays paused, as its source was) on the target;
    False when QEMU exits first (the stream broke: the source keeps the guest)."""
    while target.running():
        try:
            if target.execute("query-status", timeout=5)["status"] in ("running", "paused"):
                return True
        except QmpError:
            pass
        time.sleep(0.05)
    return False


def _await_accepted(conn: socket.socket, where: str, cancel: threading.Event) -> None:
    """Wait for the target's ACCEPTED (it starts its QEMU first), byte by byte so that none of
    QEMU's return path is taken; MigrationFailed when it refuses, takes too long or a cancel comes."""
    answer, deadline = b"", time.monotonic() + ACCEPT_TIMEOUT
    conn.settimeout(0.25)
    while not answer.endswith(b"\n") and len(answer) < len(ACCEPTED):
        if cancel.is_set():
            raise MigrationFailed("migration cancelled")
        if time.monotonic() > deadline:
            raise MigrationFailed(f"the target at {where} did not take the stream within {ACCEPT_TIMEOUT:g} s")
        try:
            byte = conn.recv(1)
        except socket.timeout:
            continue
        if not byte:
            break
        answer += byte
    if answer != ACCEPTED:
        raise MigrationFailed(f"the target at {where} refused the stream (a wrong migration token, or not a "
                              "pvlun migration target)")


def check_on_network(host: str, network: Network) -> None:
    """A migration network takes only a target address inside it (a name could resolve anywhere)."""
    try:
        inside = ipaddress.ip_address(host) in network
    except ValueError:
        inside = False
    if not inside:
        raise MigrationFailed(f"the target {host[:80]} is not an address in the migration network {network}")


def our_address_in(network: Network) -> str:
    """This node's address in the migration network, or MigrationFailed saying there is none."""
    try:
        return local_address_in(network)
    except (ValueError, CommandError) as exc:
        raise MigrationFailed(str(exc)) from None


def send(source: VmLauncher, host: str, port: int, token: str | None, *, node: str = "",
         timeout: float = MIGRATION_TIMEOUT, cancel: threading.Event | None = None,
         network: Network | None = None) -> MigrationStatus:
    """Migrate the running source QEMU to the target launcher at host:port. Succeeded: the
    target has the guest and the source QEMU has quit. Failed: the source runs on. With a
    migration `network`, the target must be in it and the stream leaves from our address there."""
    status = MigrationStatus(node, "", started=time.time())
    was_paused = source.phase is Phase.PAUSED
    try:
        if not source.running() or source.phase not in (Phase.RUNNING, Phase.PAUSED):
            raise MigrationFailed(f"the source is not running (phase {source.phase.value})")
        status.phase = "Running"
        bind = None
        if network is not None:
            check_on_network(host, network)
            bind = (our_address_in(network), 0)
        with socket.create_connection((host, port), timeout=10, source_address=bind) as conn:
            conn.sendall(HEADER + (token or "-").encode() + b"\n")
            _await_accepted(conn, f"{host}:{port}", cancel or threading.Event())
            conn.settimeout(None)
            source.execute("migrate-set-capabilities",
                           {"capabilities": [{"capability": "return-path", "state": True}]})
            start_sending(source, conn.fileno())
        follow_sending(source, status, target_gone=lambda: None, timeout=timeout, poll_interval=0.05,
                       progress=lambda s: None, cancel=cancel or threading.Event())
        source.mark_migrated()
        status.phase = "Succeeded"
    except (MigrationFailed, QmpError, OSError) as exc:
        status.error = user_text(exc)
        recover_source(source, was_paused)
        status.phase = "Failed"
    status.ended = time.time()
    return status


class ControlServer:
    """The source launcher's order socket: `{"command": "migrate", "to": "HOST:PORT",
    "token": ...}` → the migration's status, one migration at a time; `{"command": "cancel"}`
    aborts the one in flight (the source runs on) → `{"cancelled": true|false}`; `freeze` and
    `thaw` hold the guest for a VM snapshot (virt/pod_freeze.py)."""

    def __init__(self, launcher: VmLauncher, run_dir: str | os.PathLike, node: str = "",
                 network: Network | None = None):
        self.launcher = launcher
        self.network = network  # the migration network the stream must go over
        self.run_dir = Path(run_dir)
        self.node = node
        self.path = socket_path(self.run_dir, CONTROL_SOCKET)
        self.busy = threading.Lock()
        self._cancel = threading.Event()  # of the migration in flight (replaced by each one)
        self._server: socket.socket | None = None
        self.freezer = Freezer(launcher)  # a VM snapshot's freeze and thaw (virt/pod_freeze.py)

    def start(self) -> None:
        self._server = listen_unix(self.path, self.run_dir)
        threading.Thread(target=self._serve, name="launcher-control", daemon=True).start()

    def close(self) -> None:
        if self._server is not None:
            try:
                self._server.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
            except OSError:
                pass
            self._server.close()
            remove_sockets([self.path], self.run_dir)

    def _serve(self) -> None:
        assert self._server is not None
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        """One order, one reply; `busy` is held until the reply is out, so the launcher (which
        waits for it before it exits) never ends between a migration and its report."""
        with conn:
            held = False
            try:
                conn.settimeout(10)
                request = json.loads(_read_line(conn, _LINE_MAX))
                if isinstance(request, dict) and request.get("command") == "cancel":
                    running = self.busy.locked() and not self._cancel.is_set()
                    self._cancel.set()
                    reply = {"cancelled": running}
                elif isinstance(request, dict) and request.get("command") in ("freeze", "thaw"):
                    reply = self.freezer.order(request)
                else:
                    host, port, token = _migrate_order(request)
                    held = self.busy.acquire(blocking=False)
                    if not held:
                        raise ValueError("a migration is already running")
                    self._cancel = threading.Event()
                    reply = {**send(self.launcher, host, port, token, node=self.node, cancel=self._cancel,
                                    network=self.network).as_dict(),
                             "targetNode": "", "targetAddress": f"{host}:{port}"}  # the controller knows the node
            except (OSError, ValueError) as exc:
                reply = {"phase": "Failed", "error": user_text(exc)}
            try:
                conn.sendall(json.dumps(reply, separators=(",", ":")).encode() + b"\n")
            except OSError:
                pass
            finally:
                if held:
                    self.busy.release()


def _migrate_order(request: object) -> tuple[str, int, str | None]:
    """(host, port, token) of a `migrate` order; ValueError for anything else."""
    if not isinstance(request, dict) or request.get("command") != "migrate":
        raise ValueError("unknown command (migrate, cancel, freeze, thaw)")
    host, port = parse_address(str(request.get("to", ""))[:300])
    token = request.get("token")
    if token is not None and (not isinstance(token, str) or not TOKEN.fullmatch(token)):
        raise ValueError("the migration token must be 16 to 256 letters, digits or '+/=_.-'")
    return host, port, token


def _order(run_dir: str | os.PathLike, request: dict, timeout: float) -> dict:
    """One order to the launcher of `run_dir`, its reply."""
    path = socket_path(Path(run_dir), CONTROL_SOCKET)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout)
        try:
            conn.connect(path)
        except OSError as exc:
            raise ConnectionError(f"no launcher in {run_dir}: {exc.strerror or exc}") from None
        conn.sendall(json.dumps(request).encode() + b"\n")
        reply = json.loads(_read_line(conn, 1 << 16))
    if not isinstance(reply, dict):
        raise ValueError("the launcher's reply is not an object")
    return reply


def request_migration(run_dir: str | os.PathLike, to: str, token: str | None = None,
                      timeout: float = MIGRATION_TIMEOUT + 60) -> dict:
    """Tell the launcher of `run_dir` to migrate to `to` (HOST:PORT); its status when done."""
    parse_address(to)
    return _order(run_dir, {"command": "migrate", "to": to, "token": token}, timeout)


def request_freeze(run_dir: str | os.PathLike, unfreeze_timeout: float | None, timeout: float = 30.0) -> dict:
    """Freeze the guest of the launcher of `run_dir` (None: thaw it); the launcher's reply."""
    request = {"command": "thaw"} if unfreeze_timeout is None else {"command": "freeze",
                                                                   "unfreezeTimeout": unfreeze_timeout}
    return _order(run_dir, request, timeout)


def request_cancel(run_dir: str | os.PathLike, timeout: float = 10.0) -> bool:
    """Abort the migration the launcher of `run_dir` is sending; False when none runs."""
    return _order(run_dir, {"command": "cancel"}, timeout).get("cancelled") is True
