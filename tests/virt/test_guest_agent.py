"""The QEMU guest agent of a real guest: the linux test guest's agent variant runs Debian's
qemu-ga on the channel every VM gets; the tick guest has no agent at all. Both run through the
daemon's VmRuntime (volumes given as files instead of attached through CSI), so the VMI in the
store shows what KubeVirt's would."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from kube_fixtures import wait_until
from controlplane.context import Context
from controlplane.store import SQLiteStore
from controlplane.vm_spec import parse_virtual_machine
from virt.guest_images import build_data_disk, build_linux_disk, kernel_path
from virt.qemu_args import DiskAttachment, Throttle
from virt.runtime import Running, VmRuntime

NODE = "node-1"


@pytest.fixture(scope="module")
def agent_boot_disk(tmp_path_factory) -> Path:
    """The linux guest with qemu-ga, its data disk mounted writable, idle once booted."""
    return build_linux_disk(tmp_path_factory.mktemp("agent") / "boot.img", agent=True, after="idle",
                            extra_cmdline="pvlun.mount=rw")


@pytest.fixture
def runtime(tmp_path):
    """A VmRuntime over a store of its own; every QEMU it started is killed at the end."""
    ctx = Context(SQLiteStore(str(tmp_path / "objects.db")), None, str(tmp_path / "data"), [NODE])
    rt = VmRuntime(ctx, accel="tcg")
    yield rt
    for running in list(rt.running.values()):
        running.launcher.kill()


def run_vm(rt: VmRuntime, obj: dict, disks: dict[str, DiskAttachment]):
    """Store the VMI, then start its QEMU as VmRuntime.start does once volumes are attached."""
    spec = parse_virtual_machine(obj).template
    name = obj["metadata"]["name"]
    rt.ctx.store.apply({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
                        "metadata": {"name": name, "namespace": "default"}, "spec": {}})
    key = f"default/{name}"
    launcher = rt.launcher(spec, key, NODE, disks)
    with rt.lock:
        rt.running[key] = Running(key, spec, NODE, launcher)
    launcher.start()
    return launcher


def vmi_status(rt: VmRuntime, name: str) -> dict:
    return (rt.ctx.store.get("VirtualMachineInstance", name, "default") or {}).get("status") or {}


def agent_condition(rt: VmRuntime, name: str) -> dict | None:
    return next((c for c in vmi_status(rt, name).get("conditions", []) if c["type"] == "AgentConnected"), None)


def run_agent_vm(rt: VmRuntime, manifest, boot_disk: Path, tmp_path: Path, payload: bytes):
    """The linux guest with qemu-ga (VM `agent`), its ext4 data disk holding `payload`, booted."""
    data = build_data_disk(tmp_path / "data.img", {"payload.bin": payload})
    obj = manifest("agent", "256Mi",
                   disks=[{"name": "boot", "disk": {"bus": "virtio"}, "bootOrder": 1},
                          {"name": "data", "disk": {"bus": "virtio"}}],
                   volumes=[{"name": "boot", "persistentVolumeClaim": {"claimName": "boot"}},
                            {"name": "data", "persistentVolumeClaim": {"claimName": "data"}}])
    vm = run_vm(rt, obj, {"boot": DiskAttachment.for_path(str(boot_disk), readonly=True),
                          "data": DiskAttachment.for_path(str(data), throttle=Throttle())})
    assert vm.wait_for_serial("PVLUN-LINUX", timeout=90), vm.serial_text()[-2000:]
    return vm


def test_agent_guest_is_connected_reports_its_os_freezes_thaws_and_is_quiesced_frozen(runtime, manifest, agent_boot_disk,
                                                                       tmp_path):
    vm = run_agent_vm(runtime, manifest, agent_boot_disk, tmp_path, b"before the snapshot\n")
    assert "PVLUN-AGENT started" in vm.serial_text()

    # the VMI says so as KubeVirt's would: AgentConnected True, the guest's OS from guest-get-osinfo
    condition = wait_until(lambda: agent_condition(runtime, "agent"), 30, lambda: "AgentConnected on the VMI")
    assert condition["status"] == "True"
    assert vmi_status(runtime, "agent")["guestOSInfo"] == {
        "id": "pvlun-test", "name": "pvlun test guest", "prettyName": "pvlun test guest (busybox)", "versionId": "1",
        "kernelRelease": kernel_path().name.removeprefix("vmlinuz-"), "machine": "x86_64",
        "kernelVersion": vmi_status(runtime, "agent")["guestOSInfo"]["kernelVersion"]}
    assert vm.agent_connected()
    agent = vm.agent_link.agent
    assert agent.execute("guest-ping", timeout=2) == {}
    assert "guest-fsfreeze-freeze" in {c["name"] for c in agent.execute("guest-info")["supported_commands"]}

    # freeze: the agent froze the mounted ext4 data disk; thaw returns it; a second thaw is a no-op
    mounts = {fs["mountpoint"]: fs["type"] for fs in agent.execute("guest-get-fsinfo")}
    assert mounts == {"/mnt": "ext4"}  # the one filesystem FIFREEZE applies to (the rest are in memory)
    assert agent.execute("guest-fsfreeze-status") == "thawed"
    assert vm.freeze_filesystems(10) is True
    assert agent.execute("guest-fsfreeze-status") == "frozen"
    assert vm.agent_connected()  # a frozen guest's agent still answers guest-ping
    vm.thaw_filesystems()
    assert agent.execute("guest-fsfreeze-status") == "thawed"
    started = time.monotonic()
    vm.thaw_filesystems()
    assert time.monotonic() - started < 0.5 and agent.execute("guest-fsfreeze-status") == "thawed"

    # a snapshot's quiesce: the agent froze the filesystems, then the guest is paused (one instant
    # for every disk); after it, resumed and thawed
    with vm.quiesced() as how:
        assert how == "GuestAgent"
        assert vm.execute("query-status")["status"] == "paused"
    assert vm.execute("query-status")["status"] == "running"
    assert agent.execute("guest-fsfreeze-status") == "thawed" and vm.last_pause_seconds > 0

    # QEMU gone: so is the condition (KubeVirt removes it), and the agent channel's socket
    vm.kill()
    wait_until(lambda: agent_condition(runtime, "agent") is None, 10, lambda: "AgentConnected removed")
    assert not Path(vm.agent_path).exists()


def test_tick_guest_has_no_agent_so_freezing_gives_up_at_once_and_a_quiesce_pauses_it(runtime, manifest, tick_copy):
    vm = run_vm(runtime, manifest("tick"), tick_copy)
    assert vm.wait_for_serial("tick 1", timeout=30), vm.serial_text()[-500:]
    assert Path(vm.agent_path).is_socket()  # the channel is there; no agent opens it
    started = time.monotonic()
    assert vm.freeze_filesystems(1.5) is False
    assert time.monotonic() - started < 0.5  # the port is closed (VSERPORT_CHANGE): no agent to wait for
    with vm.quiesced() as how:  # so a snapshot pauses it at once
        assert how == "NoGuestAgent" and vm.execute("query-status")["status"] == "paused"
    assert vm.last_pause_seconds < 1
    assert vm.agent_connected() is False
    started = time.monotonic()
    vm.thaw_filesystems()  # nothing was frozen: nothing to wait for
    assert time.monotonic() - started < 0.5
    assert vm.execute("query-status")["status"] == "running"  # the guest ran on, never paused
    assert agent_condition(runtime, "tick") is None and "guestOSInfo" not in vmi_status(runtime, "tick")
