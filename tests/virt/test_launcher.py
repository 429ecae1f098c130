"""The launcher runs real QEMU under TCG with the tick guest: boot, pause, stop, failures, QoS."""

from __future__ import annotations

import os
import re
import subprocess
import time

import pytest

from virt.launcher import LaunchError, Phase
from virt.local_volumes import local_attachments
from virt.qemu_args import DiskAttachment, Throttle
from controlplane.vm_spec import parse_virtual_machine


def ticks(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"tick (\d+)\r\n", text)]


def test_tick_guest_boots_and_prints_marker_then_ticks(launchers, make_tick_vm, tick_copy, tmp_path):
    phases = []
    vm = launchers(make_tick_vm(), tick_copy, tmp_path / "run", on_phase=lambda l, p, r: phases.append(p))
    started = time.monotonic()
    vm.start()
    assert vm.phase is Phase.RUNNING and vm.accel == "tcg"
    assert vm.wait_for_serial("PVLUN-BOOT", timeout=15)
    boot_seconds = time.monotonic() - started
    assert vm.wait_for_serial("tick 3", timeout=10)
    assert boot_seconds < 10
    assert phases[:2] == [Phase.SCHEDULING, Phase.RUNNING]
    assert ticks(vm.serial_text())[:3] == [1, 2, 3]


def test_pause_stops_ticks_and_unpause_resumes_them(launchers, make_tick_vm, tick_copy, tmp_path):
    vm = launchers(make_tick_vm(), tick_copy, tmp_path / "run")
    vm.start()
    assert vm.wait_for_serial("tick 2", timeout=15)
    vm.pause()
    assert vm.phase is Phase.PAUSED
    assert vm.execute("query-status")["status"] == "paused"
    frozen = ticks(vm.serial_text())
    time.sleep(1.0)
    assert ticks(vm.serial_text()) == frozen
    vm.unpause()
    assert vm.phase is Phase.RUNNING
    assert vm.wait_for_serial(f"tick {frozen[-1] + 3}\r\n", timeout=10)
    assert ticks(vm.serial_text())[: len(frozen) + 3] == list(range(1, len(frozen) + 4))  # continued, no reboot


def test_graceful_stop_quits_after_grace_when_guest_ignores_acpi(launchers, make_tick_vm, tick_copy, tmp_path):
    vm = launchers(make_tick_vm(), tick_copy, tmp_path / "run")
    vm.start()
    assert vm.wait_for_serial("tick 1", timeout=15)
    started = time.monotonic()
    assert vm.stop(grace=1.0) is Phase.SUCCEEDED
    assert 0.9 < time.monotonic() - started < 8
    assert vm.returncode == 0 and not vm.running()


def test_killed_qemu_is_failed(launchers, make_tick_vm, tick_copy, tmp_path):
    vm = launchers(make_tick_vm(), tick_copy, tmp_path / "run")
    vm.start()
    vm.kill()
    assert vm.phase is Phase.FAILED and "exited -9" in vm.reason


def test_start_failure_reports_qemu_error_text(launchers, make_tick_vm, tick_copy, tmp_path):
    missing = {"root": DiskAttachment(str(tmp_path / "no-such-device"), block=True)}
    vm = launchers(make_tick_vm(), missing, tmp_path / "run")
    with pytest.raises(LaunchError) as err:
        vm.start(timeout=15)
    assert "no-such-device" in str(err.value) and "No such file or directory" in str(err.value)
    assert vm.phase is Phase.FAILED and "No such file or directory" in vm.reason


def test_missing_qemu_binary_is_a_launch_error(launchers, make_tick_vm, tick_copy, tmp_path):
    vm = launchers(make_tick_vm(), tick_copy, tmp_path / "run", qemu_binary=str(tmp_path / "qemu-nope"))
    with pytest.raises(LaunchError, match="cannot run"):
        vm.start()


def test_throttle_group_limits_set_from_volume_and_changed_live(launchers, make_tick_vm, tick_disk, tmp_path):
    copy = tmp_path / "root.img"
    copy.write_bytes(tick_disk.read_bytes())
    throttle = Throttle.from_volume_context({"maxIOPS": "200", "maxMBps": "8"})
    vm = launchers(make_tick_vm(), {"root": DiskAttachment.for_path(str(copy), throttle=throttle)}, tmp_path / "run")
    vm.start()
    limits = vm.throttle_limits("root")
    assert (limits["iops-total"], limits["bps-total"]) == (200, 8 << 20)
    vm.set_throttle("root", Throttle(max_iops=50, max_mbps=1))
    limits = vm.throttle_limits("root")
    assert (limits["iops-total"], limits["bps-total"]) == (50, 1 << 20)
    info = vm.execute("query-named-block-nodes")
    assert any(n["node-name"] == "drive-root" and n["drv"] == "throttle" for n in info)
    vm.set_throttle("root", Throttle())  # back to unlimited
    assert vm.throttle_limits("root")["iops-total"] == 0
    assert vm.wait_for_serial("tick 1", timeout=10)  # the guest kept running throughout


def test_loop_device_is_opened_as_host_device(launchers, make_tick_vm, tick_disk, tmp_path):
    copy = tmp_path / "root.img"
    copy.write_bytes(tick_disk.read_bytes())
    loop = subprocess.run(["losetup", "--find", "--show", "--direct-io=on", str(copy)],
                          capture_output=True, text=True, check=True).stdout.strip()
    try:
        att = DiskAttachment.for_path(loop, throttle=Throttle())
        assert att.block
        vm = launchers(make_tick_vm(), {"root": att}, tmp_path / "run")
        vm.start()
        assert vm.wait_for_serial("PVLUN-BOOT", timeout=15)
        node = next(n for n in vm.execute("query-named-block-nodes") if n["node-name"] == "file-root")
        assert node["drv"] == "host_device" and node["file"] == loop
        vm.stop(grace=0)
    finally:
        subprocess.run(["losetup", "-d", loop], check=False)


def test_cloud_init_and_empty_disk_volumes_are_attached(launchers, manifest, tick_disk, tmp_path):
    obj = manifest(disks=[{"name": "root", "disk": {}, "bootOrder": 1}, {"name": "cidata", "disk": {"bus": "sata"}}],
                   volumes=[{"name": "root", "persistentVolumeClaim": {"claimName": "r"}},
                            {"name": "cidata", "cloudInitNoCloud": {"userData": "#cloud-config\nhostname: x\n",
                                                                    "networkData": "version: 2\n"}},
                            {"name": "scratch", "emptyDisk": {"capacity": "64Mi"}}])
    spec = parse_virtual_machine(obj).template
    run = tmp_path / "run"
    disks = local_attachments(spec, run)
    assert set(disks) == {"cidata", "scratch"}
    seed = (run / "cidata.cidata.iso")
    label = subprocess.run(["blkid", "-o", "value", "-s", "LABEL", str(seed)], capture_output=True, text=True)
    assert label.stdout.strip() == "cidata"
    listing = subprocess.run(["isoinfo", "-R", "-f", "-i", str(seed)], capture_output=True, text=True).stdout
    assert {"/user-data", "/meta-data", "/network-config"} <= set(listing.split())
    assert (run / "scratch.empty.img").stat().st_size == 64 << 20
    copy = tmp_path / "root.img"
    copy.write_bytes(tick_disk.read_bytes())
    disks["root"] = DiskAttachment.for_path(str(copy))
    vm = launchers(spec, disks, run)
    vm.start()
    assert vm.wait_for_serial("PVLUN-BOOT", timeout=15)
    nodes = {n["node-name"]: n for n in vm.execute("query-named-block-nodes")}
    assert nodes["file-cidata"]["file"].startswith("/dev/fdset/") and nodes["file-scratch"]["file"].startswith("/dev/fdset/")
    held = {os.path.realpath(f"/proc/{vm.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{vm.pid}/fd")}
    assert {str(seed), str(run / "scratch.empty.img")} <= held  # inherited open, not opened by path


def test_interactive_console_socket_logs_and_long_run_dirs_work(launchers, make_tick_vm, tick_copy, tmp_path):
    import socket

    run = tmp_path / ("very-long-directory-name-" * 5) / "vms" / "default" / "tick" / "node-a"
    vm = launchers(make_tick_vm(), tick_copy, run, console=True)
    vm.start()
    assert len(vm.qmp_path) < 108 and (run / "qmp.sock").is_symlink() and (run / "console.sock").is_symlink()
    assert len(vm.agent_path.encode()) < 108 and (run / "org.qemu.guest_agent.0").is_symlink()
    with socket.socket(socket.AF_UNIX) as console:
        console.connect(vm.console_path)  # the symlink in run_dir names it; connect to its short target
        console.settimeout(10)
        received = b""
        while b"tick" not in received:
            received += console.recv(4096)
    assert vm.wait_for_serial("tick", timeout=10)  # the same output also lands in serial.log
    assert (run / "serial.log").exists()
