"""Fixtures for the virt tests: guest images built once per worker, launchers cleaned up."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from virt.guest_images import build_data_disk, build_linux_disk, build_tick_disk
from virt.launcher import VmLauncher
from virt.qemu_args import DiskAttachment, Throttle
from controlplane.vm_spec import VmSpec, parse_virtual_machine

PAYLOAD = os.urandom(200_000)
PAYLOAD_SHA256 = hashlib.sha256(PAYLOAD).hexdigest()


def vm_manifest(name: str = "tick", memory: str = "64Mi", disks: list | None = None,
                volumes: list | None = None, **domain) -> dict:
    disks = disks if disks is not None else [{"name": "root", "disk": {"bus": "virtio"}, "bootOrder": 1}]
    volumes = volumes if volumes is not None else [{"name": "root", "persistentVolumeClaim": {"claimName": name}}]
    return {
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"runStrategy": "Always", "template": {"spec": {
            "domain": {"memory": {"guest": memory}, "devices": {"disks": disks, "autoattachPodInterface": False}, **domain},
            "networks": [], "volumes": volumes, "terminationGracePeriodSeconds": 5}}},
    }


def tick_vm(name: str = "tick", memory: str = "64Mi") -> VmSpec:
    return parse_virtual_machine(vm_manifest(name, memory)).template


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("images")


@pytest.fixture(scope="session")
def tick_disk(images) -> Path:
    return build_tick_disk(images / "tick.img")


@pytest.fixture(scope="session")
def linux_disks(images) -> tuple[Path, Path]:
    boot = build_linux_disk(images / "linux.img", after="poweroff")
    data = build_data_disk(images / "data.img", {"payload.bin": PAYLOAD})
    return boot, data


@pytest.fixture(autouse=True)
def _tcg(monkeypatch):
    monkeypatch.setenv("PVLUN_ACCEL", "tcg")


@pytest.fixture
def launchers():
    """Make launchers; every QEMU still running at the end of the test is killed."""
    made: list[VmLauncher] = []

    def make(vm: VmSpec, disks: dict, run_dir: Path, **kw) -> VmLauncher:
        launcher = VmLauncher(vm, disks, run_dir, **kw)
        made.append(launcher)
        return launcher

    yield make
    for launcher in made:
        launcher.kill()


@pytest.fixture
def tick_copy(tick_disk, tmp_path) -> dict[str, DiskAttachment]:
    """A private copy of the tick disk with a throttle layer (like a CSI block volume)."""
    copy = tmp_path / "root.img"
    copy.write_bytes(tick_disk.read_bytes())
    return {"root": DiskAttachment.for_path(str(copy), throttle=Throttle())}


@pytest.fixture(scope="session")
def manifest():
    """The VirtualMachine manifest builder (a fixture, so test modules need not import conftest)."""
    return vm_manifest


@pytest.fixture(scope="session")
def make_tick_vm():
    return tick_vm


@pytest.fixture(scope="session")
def payload_sha256() -> str:
    return PAYLOAD_SHA256
