"""A guest's network goes through passt: the guest reaches a host listener on a non-loopback
address as any network peer would, its forwarded port works, and nothing that listens only on
the host's loopback is in its reach (QEMU's user-mode network mapped the gateway to it)."""

from __future__ import annotations

import os
import re
import socket
import socketserver
import threading
import time

import pytest

from virt.guest_images import build_data_disk, build_linux_disk
from virt.launcher import LaunchError, Phase
from virt.qemu_args import DiskAttachment
from controlplane.vm_spec import parse_virtual_machine

DHCP_SCRIPT = """#!/bin/sh
[ "$1" = bound ] || exit 0
ifconfig "$interface" "$ip" netmask "$subnet" up
route add default gw "$router"
"""

GUEST_SCRIPT = """
cp /mnt/dhcp.sh /dhcp.sh; chmod +x /dhcp.sh
ip link set lo up; ip link set eth0 up
udhcpc -i eth0 -q -n -t 10 -s /dhcp.sh >/dev/null 2>&1
echo "ADDRESS $(ip -4 -o addr show eth0 | awk '{{print $4}}')"
get() {{ printf 'hello\\n' | timeout 6 nc -w 3 "$1" "$2" 2>&1 | tail -1; }}
echo "OUTSIDE [$(get {outside} {outside_port})]"
for address in 10.0.2.1 10.0.2.2 127.0.0.1 {outside}; do
  echo "LOOPBACK-ONLY $address [$(get $address {secret_port})]"
done
mkdir -p /www; echo GUEST-SERVED > /www/index.html; httpd -p 8080 -h /www
"""


class _Answer(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.recv(100)
        self.request.sendall(self.server.answer + b"\n")  # type: ignore[attr-defined]


def listener(address: str, answer: bytes) -> socketserver.ThreadingTCPServer:
    server = socketserver.ThreadingTCPServer((address, 0), _Answer)
    server.daemon_threads = True
    server.answer = answer  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def outside_address() -> str:
    """This host's address on its default route: not loopback, reachable like any peer's."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("203.0.113.1", 9))  # routing only: no packet is sent
        return s.getsockname()[0]


@pytest.fixture
def servers():
    outside = listener(outside_address(), b"OUTSIDE-REACHED")
    secret = listener("127.0.0.1", b"LOOPBACK-SECRET")
    yield outside, secret
    for server in (outside, secret):
        server.shutdown()
        server.server_close()


def test_guest_reaches_outside_and_its_forwarded_port_but_not_the_hosts_loopback(launchers, manifest, servers,
                                                                                 tmp_path):
    outside, secret = servers
    host, outside_port = outside.server_address
    script = GUEST_SCRIPT.format(outside=host, outside_port=outside_port, secret_port=secret.server_address[1])
    boot = build_linux_disk(tmp_path / "boot.img", after="script", check_file="net.sh")
    data = build_data_disk(tmp_path / "data.img", {"net.sh": script.encode(), "dhcp.sh": DHCP_SCRIPT.encode()})
    obj = manifest("net", "256Mi",
                   disks=[{"name": "boot", "disk": {"bus": "virtio"}, "bootOrder": 1},
                          {"name": "data", "disk": {"bus": "virtio"}}],
                   volumes=[{"name": "boot", "persistentVolumeClaim": {"claimName": "boot"}},
                            {"name": "data", "persistentVolumeClaim": {"claimName": "data", "readOnly": True}}])
    tmpl = obj["spec"]["template"]["spec"]
    tmpl["domain"]["devices"]["interfaces"] = [{"name": "default", "masquerade": {}, "ports": [{"port": 8080}]}]
    tmpl["networks"] = [{"name": "default", "pod": {}}]
    spec = parse_virtual_machine(obj).template
    disks = {"boot": DiskAttachment.for_path(str(boot)), "data": DiskAttachment.for_path(str(data), readonly=True)}
    vm = launchers(spec, disks, tmp_path / "run")
    vm.start()
    assert os.readlink(f"/proc/{vm.pid}/ns/net") != os.readlink("/proc/self/ns/net")  # QEMU itself has no network
    assert vm.wait_for_serial("PVLUN-LINUX", timeout=90), vm.serial_text()[-3000:]
    text = vm.serial_text()
    assert "ADDRESS 10.0.2.2/24" in text, text[-3000:]
    assert f"OUTSIDE [OUTSIDE-REACHED]" in text, text[-3000:]
    tried = re.findall(r"LOOPBACK-ONLY (\S+) \[(.*)\]", text)
    assert [address for address, _ in tried] == ["10.0.2.1", "10.0.2.2", "127.0.0.1", host], text[-3000:]
    assert "LOOPBACK-SECRET" not in text
    # the forwarded port: the host's 127.0.0.1:<hostPort> reaches the guest's port 8080
    port = vm.status()["hostPorts"]["TCP/8080"]
    deadline, answer = time.monotonic() + 30, b""
    while b"GUEST-SERVED" not in answer and time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
                conn.sendall(b"GET / HTTP/1.0\r\n\r\n")
                answer = b"".join(iter(lambda: conn.recv(4096), b""))
        except OSError:
            time.sleep(0.5)
    assert b"GUEST-SERVED" in answer
    vm.stop(grace=0)
    assert vm._network is not None and vm._network.processes == []  # passt ended with QEMU


def test_a_forwarded_port_already_in_use_fails_the_start_with_passts_words(launchers, manifest, tick_copy, tmp_path):
    obj = manifest()
    obj["spec"]["template"]["spec"]["domain"]["devices"]["interfaces"] = [
        {"name": "default", "masquerade": {}, "ports": [{"port": 22}]}]
    obj["spec"]["template"]["spec"]["networks"] = [{"name": "default", "pod": {}}]
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        vm = launchers(parse_virtual_machine(obj).template, tick_copy, tmp_path / "run",
                       host_ports={("TCP", 22): busy.getsockname()[1]})
        with pytest.raises(LaunchError, match=r"guest network \(passt\): Failed to bind any port"):
            vm.start()
    assert vm.phase is Phase.FAILED and not vm.running()
