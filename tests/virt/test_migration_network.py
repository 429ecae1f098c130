"""The dedicated migration network: a QEMU migration stream between two node hosts (network
namespaces of host/netns.py) goes over their migration veths, the guest ticking on; the
embedded migration streams over this host's address in `--migration-network`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from host.netns import MIGRATION_NETWORK, Hosts
from launch_process import ROOT, Launch, ticks
from test_launch_cli import launch_args, vmi_file
from virt.migration import migrate, tcp_stream_pair

CIDR = str(MIGRATION_NETWORK)


@pytest.fixture
def hosts():
    with Hosts(["nodeA", "nodeB"], migration=["nodeA", "nodeB"]) as made:
        yield made


@pytest.fixture
def disk(tick_disk, tmp_path):
    copy = tmp_path / "root.img"
    copy.write_bytes(tick_disk.read_bytes())
    return copy


def launch_migrate(tmp_path, run: str, to: str, token) -> tuple[int, dict]:
    done = subprocess.run([sys.executable, "-m", "pvlun.cli", "launch-migrate", "--run-dir", str(tmp_path / run),
                           "--to", to, "--token-file", str(token)], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=90)
    return done.returncode, json.loads(done.stdout)


def test_a_migration_between_two_node_namespaces_goes_over_the_migration_network(hosts, disk, tmp_path):
    """Each launcher in its node's namespace; the order reaches the source over its unix socket
    (a filesystem object, shared across network namespaces); the stream is counted on the
    migration veths, not on the host network's."""
    token = tmp_path / "token"
    token.write_text("t" * 32)
    vmi = vmi_file(tmp_path / "vmi.json")
    node_a, node_b = hosts["nodeA"], hosts["nodeB"]
    launches = []
    try:
        source = Launch(tmp_path, "source", launch_args(tmp_path, "src", vmi, "--volume", f"root={disk}",
                                                        "--migration-network", CIDR),
                        prefix=node_a.prefix, env={"NODE_NAME": "nodeA"})
        launches.append(source)
        target = Launch(tmp_path, "target", launch_args(tmp_path, "dst", vmi, "--volume", f"root={disk}",
                                                        "--incoming", "7000", "--migration-network", CIDR,
                                                        "--token-file", str(token)),
                        prefix=node_b.prefix, env={"NODE_NAME": "nodeB"})
        launches.append(target)
        assert source.wait_for("tick 3"), source.stderr()
        deadline = time.monotonic() + 20
        while not any(e.get("phase") == "Migrating" for e in target.events()) and time.monotonic() < deadline:
            time.sleep(0.05)
        # the target listens on its migration address only; an order naming its host address is refused
        code, refused = launch_migrate(tmp_path, "src", f"{node_b.address}:7000", token)
        assert code == 1 and refused["error"] == \
            f"the target {node_b.address} is not an address in the migration network {CIDR}"
        mig_before, host_before = hosts.link_bytes("nodeA", "migration"), hosts.link_bytes("nodeA", "host")
        code, result = launch_migrate(tmp_path, "src", f"{node_b.migration_address}:7000", token)
        assert code == 0 and result["phase"] == "Succeeded", result
        sent = hosts.link_bytes("nodeA", "migration")[1] - mig_before[1]
        assert sent >= result["dataTransferred"] > 0  # every byte of the stream left through mig0
        assert hosts.link_bytes("nodeA", "host")[1] - host_before[1] < 4096  # eth0 carried none of it
        received = hosts.link_bytes("nodeB", "migration")[0]
        assert received >= result["dataTransferred"]
        assert any(f"stream from {node_a.migration_address} accepted" in e.get("message", "")
                   for e in target.events())
        assert source.proc.wait(15) == 0 and source.events()[-1]["reason"] == "migrated"
        last = ticks(source.stdout())[-1]
        assert target.wait_for(f"tick {last + 3}"), target.stderr()
        assert "PVLUN-BOOT" not in target.stdout() and ticks(target.stdout())[:3] == [last + 1, last + 2, last + 3]
    finally:
        for launch in launches:
            launch.stop()


def test_a_launcher_without_an_address_in_the_migration_network_says_so(disk, tmp_path):
    launch = Launch(tmp_path, "nowhere", launch_args(tmp_path, "run", vmi_file(tmp_path / "vmi.json"), "--volume",
                                                     f"root={disk}", "--incoming", "7000",
                                                     "--migration-network", CIDR))
    try:
        assert launch.proc.wait(20) == 1
    finally:
        launch.stop()
    lines = launch.stderr().splitlines()
    said = f"pvlun launch: no address of this host is in the migration network {CIDR} (its addresses: 127.0.0.1"
    assert len(lines) == 1 and lines[0].startswith(said) and "198.19." not in lines[0][len(said):]


def test_tcp_stream_pair_connects_on_the_given_address_and_takes_no_stranger():
    outgoing, incoming = tcp_stream_pair("127.0.0.1")()
    with outgoing, incoming:
        assert outgoing.getpeername() == incoming.getsockname() and incoming.getsockname()[0] == "127.0.0.1"
        outgoing.sendall(b"stream")
        assert incoming.recv(6) == b"stream"
        port = incoming.getsockname()[1]
    with pytest.raises(ConnectionRefusedError):  # the listening socket is gone with the pair made
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_embedded_migration_streams_over_the_migration_address(launchers, make_tick_vm, tick_copy, tmp_path):
    spec = make_tick_vm()
    source = launchers(spec, tick_copy, tmp_path / "src", node="node-a")
    source.start()
    assert source.wait_for_serial("tick 2", timeout=15)
    pairs = []

    def recorded_pair():
        pair = tcp_stream_pair("127.0.0.1")()
        pairs.append((pair[0].getsockname(), pair[0].getpeername(), pair[0].family))
        return pair

    status = migrate(source, lambda: launchers(spec, tick_copy, tmp_path / "dst", node="node-b", incoming="defer"),
                     target_node="node-b", stream_pair=recorded_pair)
    assert status.phase == "Succeeded", status.error
    assert len(pairs) == 1 and pairs[0][2] == socket.AF_INET and pairs[0][1][0] == "127.0.0.1"


def test_an_embedded_migration_whose_stream_cannot_be_made_fails_and_the_source_runs_on(
        launchers, make_tick_vm, tick_copy, tmp_path):
    spec = make_tick_vm()
    source = launchers(spec, tick_copy, tmp_path / "src", node="node-a")
    source.start()
    assert source.wait_for_serial("tick 2", timeout=15)
    status = migrate(source, lambda: launchers(spec, tick_copy, tmp_path / "dst", node="node-b", incoming="defer"),
                     target_node="node-b", stream_pair=tcp_stream_pair("198.19.0.1"))  # not ours
    assert status.phase == "Failed" and status.error.startswith("no migration stream: ")
    assert source.running() and source.wait_for_serial("tick 4", timeout=15)


def test_serve_streams_migrations_over_its_address_in_the_migration_network(hosts, tmp_path):
    """Embedded mode in node A's namespace finds its mig0 address; in the root namespace, which
    has none in the range, it refuses to start in one line; a bad CIDR is refused by the parser."""
    from pvlun.local_run import start_daemon, stop_daemon

    data_dir = tmp_path / "d"
    data_dir.mkdir()
    proc = start_daemon(str(data_dir), "--migration-network", CIDR, "--nodes", "1", pool_size="1Gi",
                        prefix=hosts["nodeA"].prefix)
    try:
        log = (data_dir / "serve.log").read_text()
        assert f"live migrations stream over {hosts['nodeA'].migration_address} (migration network {CIDR})" in log
    finally:
        assert stop_daemon(proc, str(data_dir)) == 0
    for network, said in ((CIDR, f"pvlun serve: no address of this host is in the migration network {CIDR}"),
                          ("198.19.0.1/24", "argument --migration-network: '198.19.0.1/24' is not a network")):
        refused = subprocess.run([sys.executable, "-m", "pvlun.cli", "serve", "--data-dir", str(tmp_path / "no"),
                                  "--migration-network", network], capture_output=True, text=True, cwd=ROOT,
                                 env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
        [line] = refused.stderr.splitlines()
        assert refused.returncode in (1, 2) and said in line, refused.stderr
        assert not (tmp_path / "no").exists()  # nothing was made
