"""Several hosts on one machine: a storage host and node hosts as network namespaces.

Tests and `make bench` need a storage host and two or three node hosts that reach each other
only over a network, as a real cluster's do. Each host is a network namespace; the wiring:

    pvlun-<run>-net            the "switch": a namespace with bridge br0 (hosts) and br1
                               (migration), no address at all
    pvlun-<run>-<host>         eth0 (198.18.0.x/24) on br0; a node also mig0 (198.19.0.x/24)
                               on br1, the dedicated migration network; lo up

Every interface is created inside these namespaces (`ip -n SWITCH link add ... peer ...
netns HOST`), so nothing of a run ever appears in the machine's root namespace: names never
clash with another run, and no address of 198.18.0.0/15 (RFC 2544's benchmark range) is ever
configured outside. No namespace has a default route, so nothing is routed out; the switch
has no address, so it forwards nothing but bridged frames between the run's hosts. A run
holds at most MAX_HOSTS hosts.

A host "loses its network" when its switch port goes down (`link_down`): its own interface
keeps its address and routes, as a node whose cable is pulled, and TCP sessions resume when
the port comes back (`link_up`).

Commands run in a host with only its network namespace entered (`Host.prefix`, nsenter):
files, mounts, loop devices and unix sockets are the machine's, as on one host, so a node
plugin's CSI socket and its mounts are reached from anywhere; only the network is the host's.

Everything a run made goes in `teardown` (also on an exception in the `with` block): the
processes in its namespaces (by `ip netns pids`, so a grandchild is found too), then the
namespaces, which takes their veths along. Namespaces whose run's process died (a killed
test worker) are swept by `sweep_leftovers`, which also runs at interpreter exit.
"""

from __future__ import annotations

import atexit
import ipaddress
import itertools
import json
import os
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Iterable, Sequence

from host import command

PREFIX = "pvlun-"
BENCHMARK_RANGE = ipaddress.ip_network("198.18.0.0/15")  # RFC 2544
HOST_NETWORK = ipaddress.ip_network("198.18.0.0/24")
MIGRATION_NETWORK = ipaddress.ip_network("198.19.0.0/24")
MAX_HOSTS = 16
HOST_NAME = re.compile(r"[A-Za-z][A-Za-z0-9]{0,11}")  # + "p-"/"m-": a switch port name of <= 15 bytes
_RUN_NAMESPACE = re.compile(re.escape(PREFIX) + r"(\d+)r\d+-[A-Za-z][A-Za-z0-9]*")
_SWITCH = "net"
_TERM_GRACE = 3.0
_runs = itertools.count(1)


class NetnsError(RuntimeError):
    """The hosts could not be made or reached; the message says what and why."""


@dataclass(frozen=True)
class Host:
    name: str  # "storage", "nodeA"
    namespace: str  # pvlun-<run>-<name>
    address: str  # on HOST_NETWORK (eth0)
    migration_address: str | None  # on MIGRATION_NETWORK (mig0), None when not on it

    @property
    def prefix(self) -> list[str]:
        """The argv prefix that runs a command in this host: only its network namespace is
        entered. (`ip netns exec` would also give the command a mount namespace of its own, and
        then a node plugin's loop mounts and a controller's pool mount would be seen by no one
        else; a real node's kubelet and its CSI plugin share them.)"""
        return ["nsenter", f"--net=/run/netns/{self.namespace}", "--"]


def _ip(namespace: str, *args: str) -> None:
    command.run(["ip", "-n", namespace, *args], timeout=10)


def _namespaces() -> list[str]:
    out = command.output(["ip", "-j", "netns", "list"], timeout=10).strip()
    return [entry["name"] for entry in json.loads(out or "[]")]


def _kill_namespace_processes(namespace: str, grace: float = _TERM_GRACE) -> None:
    """SIGTERM everything that runs in `namespace`, SIGKILL what is left after `grace` s."""
    deadline = time.monotonic() + grace
    sig = signal.SIGTERM
    while True:
        proc = command.run(["ip", "netns", "pids", namespace], timeout=10, check=False)
        pids = [int(p) for p in proc.stdout.split() if p.isdigit() and int(p) != os.getpid()]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            if sig is signal.SIGKILL:
                time.sleep(0.1)
                if time.monotonic() > deadline + 5:
                    raise NetnsError(f"processes {pids} in namespace {namespace} do not die")
            sig = signal.SIGKILL
        time.sleep(0.05)


def _delete_namespace(namespace: str) -> None:
    _kill_namespace_processes(namespace)
    command.run(["ip", "netns", "delete", namespace], timeout=10, check=False)


def sweep_leftovers(pid: int | None = None) -> list[str]:
    """Delete the namespaces (and their processes) of runs whose process is gone — or, with
    `pid`, of that process's runs. The deleted names."""
    swept = []
    for name in _namespaces():
        match = _RUN_NAMESPACE.fullmatch(name)
        if not match:
            continue
        owner = int(match.group(1))
        if pid is not None:
            if owner != pid:
                continue
        elif _alive(owner):
            continue
        _delete_namespace(name)
        swept.append(name)
    return swept


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


atexit.register(lambda: sweep_leftovers(os.getpid()))


class Hosts:
    """A run's hosts and the network between them. Use as a context manager:

        with Hosts(["storage", "nodeA", "nodeB"], migration=["nodeA", "nodeB"]) as hosts:
            hosts.run_in("nodeA", ["ip", "-j", "addr"])
    """

    def __init__(self, names: Sequence[str], *, migration: Iterable[str] = ()):
        names = list(names)
        migration = list(migration)
        for name in names:
            if not HOST_NAME.fullmatch(name) or name == _SWITCH:
                raise NetnsError(f"{name[:40]!r} is not a host name: a letter, then up to 11 letters or digits "
                                 f"(not {_SWITCH!r})")
        if len(set(names)) != len(names):
            raise NetnsError("host names must be unique")
        if not 0 < len(names) <= MAX_HOSTS:
            raise NetnsError(f"a run has 1 to {MAX_HOSTS} hosts, not {len(names)}")
        unknown = sorted(set(migration) - set(names))
        if unknown:
            raise NetnsError(f"{unknown[0]!r} is on the migration network but not one of the hosts")
        self.run_id = f"{os.getpid()}r{next(_runs)}"
        self.switch = f"{PREFIX}{self.run_id}-{_SWITCH}"
        self.hosts: dict[str, Host] = {}
        for index, name in enumerate(names, start=1):
            self.hosts[name] = Host(name, f"{PREFIX}{self.run_id}-{name}", str(HOST_NETWORK[index]),
                                    str(MIGRATION_NETWORK[index]) if name in migration else None)
        self._processes: list[subprocess.Popen] = []
        self._timers: list[threading.Timer] = []
        self._made: list[str] = []

    def __enter__(self) -> "Hosts":
        try:
            self.setup()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.teardown()

    def __getitem__(self, name: str) -> Host:
        return self.host(name)

    def host(self, name: str | Host) -> Host:
        if isinstance(name, Host):
            return name
        try:
            return self.hosts[name]
        except KeyError:
            raise NetnsError(f"no host {name[:40]!r} in this run (hosts: {', '.join(self.hosts)})") from None

    def setup(self) -> None:
        """Make the namespaces, the bridges and a veth per host (and per migration host)."""
        for namespace in [self.switch] + [h.namespace for h in self.hosts.values()]:
            command.run(["ip", "netns", "add", namespace], timeout=10)
            self._made.append(namespace)
            _ip(namespace, "link", "set", "lo", "up")
            # no IPv6: no link-local chatter on the wires, no address outside 198.18.0.0/15
            command.run(["nsenter", f"--net=/run/netns/{namespace}", "--", "sysctl", "-q", "-w",
                         "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"], timeout=10)
        migration = [h for h in self.hosts.values() if h.migration_address]
        for bridge, members in (("br0", list(self.hosts.values())), ("br1", migration)):
            if members:
                _ip(self.switch, "link", "add", bridge, "type", "bridge", "forward_delay", "0", "stp_state", "0")
                _ip(self.switch, "link", "set", bridge, "up")
        for host in self.hosts.values():
            self._wire(host, "eth0", f"p-{host.name}", "br0", host.address, HOST_NETWORK)
            if host.migration_address:
                self._wire(host, "mig0", f"m-{host.name}", "br1", host.migration_address, MIGRATION_NETWORK)

    def _wire(self, host: Host, inside: str, port: str, bridge: str, address: str,
              network: ipaddress.IPv4Network) -> None:
        _ip(self.switch, "link", "add", port, "type", "veth", "peer", "name", inside, "netns", host.namespace)
        _ip(self.switch, "link", "set", port, "master", bridge, "up")
        _ip(host.namespace, "addr", "add", f"{address}/{network.prefixlen}", "dev", inside)
        _ip(host.namespace, "link", "set", inside, "up")

    def run_in(self, host: str | Host, argv: Sequence[str], **kwargs) -> subprocess.CompletedProcess[bytes]:
        """Run argv in the host's namespace through the one command runner (its keywords)."""
        return command.run(self.host(host).prefix + list(argv), **kwargs)

    def popen_in(self, host: str | Host, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        """Start argv in the host's namespace (Popen's keywords); teardown ends it."""
        proc = subprocess.Popen(self.host(host).prefix + list(argv), **kwargs)
        self._processes.append(proc)
        return proc

    def link_down(self, host: str | Host, seconds: float | None = None, *, network: str = "host") -> None:
        """Cut the host off its network ("host", or "migration"): its switch port goes down.
        With `seconds`, it comes back by itself after that long (the call returns at once)."""
        _ip(self.switch, "link", "set", self._port(host, network), "down")
        if seconds is not None:
            timer = threading.Timer(seconds, self._restore, args=(host, network))
            timer.daemon = True
            self._timers.append(timer)
            timer.start()

    def link_up(self, host: str | Host, *, network: str = "host") -> None:
        """Reconnect the host's switch port."""
        _ip(self.switch, "link", "set", self._port(host, network), "up")

    def _restore(self, host: str | Host, network: str) -> None:
        try:
            self.link_up(host, network=network)
        except command.CommandError:
            pass  # torn down meanwhile

    def _port(self, host: str | Host, network: str) -> str:
        found = self.host(host)
        if network == "host":
            return f"p-{found.name}"
        if network == "migration" and found.migration_address:
            return f"m-{found.name}"
        raise NetnsError(f"host {found.name} has no {network!r} network")

    def link_bytes(self, host: str | Host, network: str = "host") -> tuple[int, int]:
        """(received, sent) bytes of the host's interface on `network` ("host" or "migration")."""
        found = self.host(host)
        name = {"host": "eth0", "migration": "mig0"}.get(network)
        if name is None or (name == "mig0" and not found.migration_address):
            raise NetnsError(f"host {found.name} has no {network!r} network")
        out = command.output(["ip", "-n", found.namespace, "-j", "-s", "link", "show", name], timeout=10)
        stats = json.loads(out)[0]["stats64"]
        return stats["rx"]["bytes"], stats["tx"]["bytes"]

    def teardown(self) -> None:
        """End every process and remove every namespace (and so every veth) this run made."""
        for timer in self._timers:
            timer.cancel()
        for proc in self._processes:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + _TERM_GRACE
        for proc in self._processes:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        errors = []
        for namespace in reversed(self._made):
            try:
                _delete_namespace(namespace)
            except (NetnsError, command.CommandError) as exc:
                errors.append(str(exc))
        self._made.clear()
        if errors:
            raise NetnsError("; ".join(errors))
