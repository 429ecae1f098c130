"""host/netns.py for real: hosts as network namespaces that reach each other over
198.18.0.0/24 and nothing else, lose and regain their network, and leave nothing behind."""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from host.netns import BENCHMARK_RANGE, Hosts, NetnsError, PREFIX, sweep_leftovers

# one line of Python per side: a server that answers one connection, a client that says what happened
SERVER = ("import socket,sys; s=socket.create_server((sys.argv[1], int(sys.argv[2]))); print('ready', flush=True); "
          "c,_=s.accept(); c.sendall(b'hello from '+sys.argv[1].encode()); c.close()")
CLIENT = ("import socket,sys\n"
          "try:\n"
          "    c=socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))\n"
          "    print(c.recv(100).decode())\n"
          "except OSError as e:\n"
          "    print('error', e.errno or type(e).__name__)\n")


def serve_once(hosts: Hosts, host: str, address: str, port: int = 7000) -> subprocess.Popen:
    server = hosts.popen_in(host, [sys.executable, "-c", SERVER, address, str(port)], stdout=subprocess.PIPE)
    assert server.stdout.readline() == b"ready\n"
    return server


def connect(hosts: Hosts, host: str, address: str, port: int = 7000, timeout: float = 1.0) -> str:
    return hosts.run_in(host, [sys.executable, "-c", CLIENT, address, str(port), str(timeout)],
                        timeout=timeout + 10).stdout.decode().strip()


def namespaces() -> list[str]:
    return [n["name"] for n in json.loads(subprocess.run(["ip", "-j", "netns", "list"], capture_output=True,
                                                         text=True, check=True).stdout or "[]")]


@pytest.fixture
def hosts():
    with Hosts(["storage", "nodeA", "nodeB"], migration=["nodeA", "nodeB"]) as made:
        yield made


def test_hosts_reach_each_other_over_the_benchmark_range(hosts):
    storage, node_a = hosts["storage"], hosts["nodeA"]
    assert ipaddress.ip_address(storage.address) in BENCHMARK_RANGE
    assert ipaddress.ip_address(node_a.migration_address) in BENCHMARK_RANGE
    serve_once(hosts, "storage", storage.address)
    assert connect(hosts, "nodeA", storage.address) == f"hello from {storage.address}"
    serve_once(hosts, "nodeB", hosts["nodeB"].migration_address, 7001)
    assert connect(hosts, "nodeA", hosts["nodeB"].migration_address, 7001) == \
        f"hello from {hosts['nodeB'].migration_address}"


def test_the_storage_host_is_not_on_the_migration_network(hosts):
    assert hosts["storage"].migration_address is None
    with pytest.raises(NetnsError, match="no 'migration' network"):
        hosts.link_bytes("storage", "migration")
    assert connect(hosts, "storage", hosts["nodeB"].migration_address).startswith("error")


def test_a_host_reaches_nothing_outside_its_run(hosts):
    """No route out: the root namespace's services (on 127.0.0.1 and on its own addresses) and
    the world are out of reach; the hosts have no default route and no address outside the
    range, and the root namespace got none of the range."""
    with socket.create_server(("0.0.0.0", 0)) as root_service:
        port = root_service.getsockname()[1]
        root_addresses = [a["local"] for link in json.loads(subprocess.run(
            ["ip", "-j", "-4", "addr"], capture_output=True, text=True, check=True).stdout)
            for a in link["addr_info"] if not a["local"].startswith("127.")]
        assert connect(hosts, "nodeA", "127.0.0.1", port) == f"error {111}"  # its own loopback: refused
        for address in root_addresses:
            assert connect(hosts, "nodeA", address, port) == f"error {101}"  # ENETUNREACH
        assert connect(hosts, "nodeA", "9.9.9.9", 53) == f"error {101}"
    for host in hosts.hosts.values():
        routes = json.loads(hosts.run_in(host, ["ip", "-j", "route"]).stdout)
        assert routes and not [r for r in routes if r["dst"] == "default"]
        for link in json.loads(hosts.run_in(host, ["ip", "-j", "addr"]).stdout):
            for info in link["addr_info"]:
                address = ipaddress.ip_address(info["local"])
                assert address.is_loopback or address in BENCHMARK_RANGE, (host.name, info)
    for link in json.loads(subprocess.run(["ip", "-j", "addr"], capture_output=True, text=True, check=True).stdout):
        for info in link["addr_info"]:
            assert ipaddress.ip_address(info["local"]) not in BENCHMARK_RANGE, link["ifname"]


def test_a_host_has_its_own_network_but_the_machines_files_and_mounts(hosts):
    ours = {ns: os.readlink(f"/proc/self/ns/{ns}") for ns in ("net", "mnt")}
    theirs = hosts.run_in("nodeA", ["sh", "-c", "readlink /proc/self/ns/net /proc/self/ns/mnt"]).stdout.split()
    assert theirs[0].decode() != ours["net"] and theirs[1].decode() == ours["mnt"]
    assert os.stat(f"/run/netns/{hosts['nodeA'].namespace}").st_ino == int(theirs[0].decode()[5:-1])


def test_link_down_cuts_a_host_off_and_link_up_brings_it_back(hosts):
    storage = hosts["storage"].address
    hosts.link_down("nodeA")
    assert connect(hosts, "nodeA", storage, timeout=0.5) == "error TimeoutError"
    hosts.link_up("nodeA")
    serve_once(hosts, "storage", storage)
    assert connect(hosts, "nodeA", storage, timeout=5) == f"hello from {storage}"


def test_link_down_for_some_seconds_comes_back_by_itself_and_a_waiting_connect_gets_through(hosts):
    storage = hosts["storage"].address
    serve_once(hosts, "storage", storage)
    started = time.monotonic()
    hosts.link_down("nodeA", 1.0)
    assert connect(hosts, "nodeA", storage, timeout=10) == f"hello from {storage}"  # SYN retried after the outage
    assert time.monotonic() - started >= 1.0


def test_link_bytes_count_the_traffic_of_one_network(hosts):
    before_host = hosts.link_bytes("nodeA", "host")
    before = hosts.link_bytes("nodeA", "migration")
    serve_once(hosts, "nodeB", hosts["nodeB"].migration_address)
    assert connect(hosts, "nodeA", hosts["nodeB"].migration_address).startswith("hello")
    after = hosts.link_bytes("nodeA", "migration")
    assert after[0] > before[0] and after[1] > before[1]
    carried = (after[0] - before[0]) + (after[1] - before[1])  # a TCP connection's packets, at least 200 bytes
    host = hosts.link_bytes("nodeA", "host")
    chatter = (host[0] - before_host[0]) + (host[1] - before_host[1])
    # nothing of the connection went over the host network; a link may see a stray frame of its own (54 bytes seen)
    assert carried >= 200 and chatter < 120, (carried, chatter)


def test_teardown_leaves_no_namespace_veth_or_process_even_after_a_failure():
    links_before = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout.count("\n")
    with pytest.raises(RuntimeError, match="the test failed"):
        with Hosts(["storage", "nodeA"], migration=["nodeA"]) as hosts:
            made = [h.namespace for h in hosts.hosts.values()] + [hosts.switch]
            assert set(made) <= set(namespaces())
            child = hosts.popen_in("nodeA", ["sleep", "60"])
            # a grandchild nobody holds a Popen of: found by its namespace
            grandchild = int(hosts.run_in("nodeA", ["sh", "-c", "sleep 61 >/dev/null 2>&1 & echo $!"]).stdout)
            raise RuntimeError("the test failed")
    assert not set(made) & set(namespaces())
    assert child.poll() is not None
    assert not os.path.exists(f"/proc/{grandchild}") or "zombie" in open(f"/proc/{grandchild}/status").read()
    links_after = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    assert links_after.count("\n") == links_before and "p-nodeA" not in links_after


def test_leftovers_of_a_dead_run_are_swept_and_a_live_runs_are_kept():
    gone = subprocess.Popen(["true"])
    gone.wait()
    stale = f"{PREFIX}{gone.pid}r1-nodeA"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    try:
        with Hosts(["nodeA"]) as live:
            swept = sweep_leftovers()
            assert stale in swept and live["nodeA"].namespace not in swept
            assert live["nodeA"].namespace in namespaces() and stale not in namespaces()
    finally:
        subprocess.run(["ip", "netns", "delete", stale], capture_output=True)


@pytest.mark.parametrize("names, migration, said", [
    (["storage", "storage"], [], "unique"),
    (["node/../x"], [], "not a host name"),
    (["net"], [], "not a host name"),
    (["a" * 13], [], "not a host name"),
    ([f"n{i}" for i in range(17)], [], "1 to 16 hosts"),
    (["nodeA"], ["nodeB"], "'nodeB' is on the migration network but not one of the hosts"),
])
def test_bad_host_lists_are_refused_before_anything_is_made(names, migration, said):
    before = namespaces()
    with pytest.raises(NetnsError, match=said):
        Hosts(names, migration=migration)
    assert namespaces() == before
