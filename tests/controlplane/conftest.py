"""A real `pvlun serve` (embedded mode) and the `pvlun` CLI, as a user runs them."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from pvlun.local_run import DirectoryServer, start_daemon, stop_daemon
from controlplane.store import SQLiteStore
from kube_fixtures import wait_until
from virt.guest_images import tick_vm_manifest


class Instance:
    def __init__(self, data_dir: str, proc: subprocess.Popen):
        self.data_dir = data_dir
        self.proc = proc
        self.store = SQLiteStore(os.path.join(data_dir, "catalog.db"))

    def cli(self, *args: str, input: str | None = None, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-m", "pvlun.cli", *args, "--data-dir", self.data_dir],
                              input=input, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"pvlun {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def apply(self, manifest: str, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.cli("apply", "-f", "-", *extra, input=manifest, check=check)

    def get(self, kind: str, name: str, namespace: str = "default") -> dict | None:
        return self.store.get(kind, name, namespace)

    def lun_path(self, claim: str, namespace: str = "default") -> str:
        pvc = self.get("PersistentVolumeClaim", claim, namespace)
        pv = self.get("PersistentVolume", pvc["spec"]["volumeName"])
        return os.path.join(self.data_dir, "pool", "volumes", pv["spec"]["csi"]["volumeHandle"] + ".img")

    def wait(self, predicate, timeout: float = 60, what: str = "condition"):
        return wait_until(predicate, timeout, said=lambda: f"(waiting for {what})")


    def printable(self, vm: str, namespace: str = "default") -> str:
        return ((self.get("VirtualMachine", vm, namespace) or {}).get("status") or {}).get("printableStatus", "")

    def wait_printable(self, vm: str, want: str, timeout: float = 60) -> dict:
        """Wait for the VM's printableStatus; the failure message shows where it got stuck."""
        try:
            return self.wait(lambda: self.printable(vm) == want and self.get("VirtualMachine", vm), timeout,
                             f"VirtualMachine {vm} {want}")
        except AssertionError:
            vm_obj = self.get("VirtualMachine", vm) or {}
            raise AssertionError(f"VirtualMachine {vm} is {self.printable(vm)!r}, not {want!r}: "
                                 f"{vm_obj.get('status')}\nevents: {self.store.events(vm_obj) if vm_obj else None}")


    # ---- VMs: what a test looks at, read where `pvlun` itself keeps it

    def vmi_status(self, vm: str, namespace: str = "default") -> dict:
        return (self.get("VirtualMachineInstance", vm, namespace) or {}).get("status") or {}

    def qemu_pid(self, vm: str) -> int:
        return self.vmi_status(vm)["launcher"]["pid"]

    def serial_log(self, vm: str, node: str, namespace: str = "default") -> str:
        path = os.path.join(self.data_dir, "vms", namespace, vm, node, "serial.log")
        try:
            with open(path, "rb") as f:
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def all_serial_logs(self, vm: str, namespace: str = "default") -> str:
        """Every node's serial log of the VM (logs append across restarts)."""
        return "".join(self.serial_log(vm, node, namespace) for node in self.nodes())

    def nodes(self) -> list[str]:
        """The node ids of `pvlun serve --nodes 2` (no --node-id): HOST, HOST-2."""
        return [socket.gethostname(), socket.gethostname() + "-2"]

    def attachments(self, vm: str, namespace: str = "default") -> list[dict]:
        """The VolumeAttachments the VM holds (owner vm/NS/NAME)."""
        return [a for a in self.store.list("VolumeAttachment") if a["spec"].get("owner") == f"vm/{namespace}/{vm}"]


def start_instance(data_dir: str, *extra: str) -> Instance:
    return Instance(data_dir, start_daemon(data_dir, *extra))


def stop_instance(inst: Instance) -> None:
    stop_daemon(inst.proc, inst.data_dir)


@pytest.fixture(scope="module")
def instance(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("pvlun"))
    inst = start_instance(data_dir, "--nodes", "2", "--import-retry-backoff", "0.1")  # a 404 retried fast
    yield inst
    stop_instance(inst)


@pytest.fixture(scope="module")
def serve(tmp_path_factory):
    """Start `pvlun serve` instances with the flags a module needs (start(*flags, data_dir=None));
    every one is stopped and its pool unmounted when the module ends."""
    started: list[Instance] = []

    def start(*extra: str, data_dir: str | None = None) -> Instance:
        inst = start_instance(data_dir or str(tmp_path_factory.mktemp("pvlun")), *extra)
        started.append(inst)
        return inst

    yield start
    for inst in started:
        stop_instance(inst)




@pytest.fixture(scope="session")
def daemons():
    """(start_instance, stop_instance) for tests that run daemons on one data dir in turn and
    stop each themselves: `serve`'s teardown would unmount the pool the next one holds."""
    return start_instance, stop_instance


@pytest.fixture(scope="session")
def tick_vm_yaml():
    """The tick VirtualMachine manifest builder: (name, url, strategy=, access=, memory=, grace=) -> YAML."""
    return tick_vm_manifest


@pytest.fixture(scope="module")
def tick_image(web) -> str:
    """The tick guest's disk (marker PVLUN-BOOT, then "tick N"), served over HTTP; its URL."""
    from virt.guest_images import build_tick_disk

    build_tick_disk(os.path.join(web.root, "tick.img"))
    return f"{web.url}/tick.img"


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    """A plain Python HTTP server (no range requests needed) on loopback."""
    server = DirectoryServer(str(tmp_path_factory.mktemp("www")))
    yield server
    server.stop()
