"""VirtualMachines end to end: `pvlun serve` (2 nodes, TCG) + `pvlun apply / vm / logs`, real QEMU
guests booted from imported DataVolumes, their lifecycle, restart policies and refused specs."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import time

import pytest
from guest_output import MARKER, alive, ticks

PAYLOAD = os.urandom(300_000)


@pytest.fixture(scope="module")
def vms(serve):
    return serve("--nodes", "2", "--accel", "tcg", "--import-retry-backoff", "0.1")  # a 404 retried fast


def logs(inst, vm: str) -> str:
    return inst.cli("logs", f"vm/{vm}").stdout


def wait_markers(inst, vm: str, count: int, timeout: float = 30) -> str:
    inst.wait(lambda: inst.all_serial_logs(vm).count(MARKER) >= count, timeout, f"{count} x {MARKER} from {vm}")
    return inst.all_serial_logs(vm)


def boot(inst, manifest: str, name: str) -> dict:
    """Apply a tick VM, wait until it runs and its guest printed the marker; the VMI status."""
    out = inst.apply(manifest, "--wait")
    assert f"virtualmachine/{name} Running" in out.stdout, out.stdout + out.stderr
    inst.wait(lambda: MARKER in inst.all_serial_logs(name), 30, f"{name}'s marker")
    return inst.vmi_status(name)


# ---------------------------------------------------------------- boot


def test_vm_boots_from_imported_datavolume_template_through_csi(vms, tick_image, tick_vm_yaml):
    status = boot(vms, tick_vm_yaml("boot", tick_image), "boot")
    node = vms.nodes()[0]
    assert status["phase"] == "Running" and status["nodeName"] == node
    vm = vms.get("VirtualMachine", "boot")
    assert vm["status"]["printableStatus"] == "Running" and vm["status"]["ready"] is True
    dv = vms.get("DataVolume", "boot-root")
    assert dv["status"]["phase"] == "Succeeded"
    assert dv["metadata"]["ownerReferences"][0]["name"] == "boot"
    text = vms.wait(lambda: "tick 3" in logs(vms, "boot") and logs(vms, "boot"), 15, "ticks in pvlun logs")
    assert text.count(MARKER) == 1 and ticks(text)[:3] == [1, 2, 3]
    # QEMU opens the block device kubelet-style published on the node, never the pool file
    (attachment,) = vms.attachments("boot")
    assert attachment["spec"]["nodeName"] == node and attachment["status"]["attached"] is True
    with open(f"/proc/{status['launcher']['pid']}/cmdline", "rb") as f:
        argv = f.read().decode()
    assert attachment["spec"]["targetPath"] in argv and "/pool/" not in argv
    table = vms.cli("get", "vm").stdout
    assert re.search(r"boot\s+Running\s+True", table), table


def test_vmi_status_shows_no_host_path_and_names_the_guest_device(vms, tick_image, tick_vm_yaml):
    boot(vms, tick_vm_yaml("shown", tick_image), "shown")
    status = vms.wait(lambda: vms.vmi_status("shown").get("volumeStatus") and vms.vmi_status("shown"), 15,
                      "volumeStatus")
    assert [(v["name"], v["target"]) for v in status["volumeStatus"]] == [("root", "vda")]  # as KubeVirt names it
    assert status["volumeStatus"][0]["size"] == 8 << 20
    shown = json.dumps(status)
    assert vms.data_dir not in shown and os.path.realpath(vms.data_dir) not in shown
    assert set(status["launcher"]) == {"phase", "reason", "node", "pid", "accel", "hostPorts"}
    vms.cli("vm", "stop", "shown", "--wait")


def test_linux_guest_reads_file_on_second_disk_then_powers_off_and_stays_off(vms, web):
    """RerunOnFailure: the Linux guest prints the checksum of the test's file, powers off
    cleanly, and the VM stays Stopped (a clean shutdown is not a failure)."""
    from virt.guest_images import build_data_disk, build_linux_disk

    build_linux_disk(os.path.join(web.root, "linux.img"), marker="PVLUN-LINUX", after="poweroff")
    build_data_disk(os.path.join(web.root, "data.img"), {"payload.bin": PAYLOAD})
    manifest = f"""apiVersion: kubevirt.io/v1
kind: VirtualMachine
metadata:
  name: linux
spec:
  runStrategy: RerunOnFailure
  dataVolumeTemplates:
  - metadata: {{name: linux-boot}}
    spec:
      source: {{http: {{url: "{web.url}/linux.img"}}}}
      storage: {{volumeMode: Block, accessModes: [ReadWriteOnce], resources: {{requests: {{storage: 64Mi}}}}}}
  template:
    spec:
      terminationGracePeriodSeconds: 2
      domain:
        resources: {{requests: {{memory: 256Mi}}}}
        devices:
          autoattachPodInterface: false
          disks:
          - {{name: boot, bootOrder: 1, disk: {{bus: virtio}}}}
          - {{name: data, disk: {{bus: virtio}}}}
      volumes:
      - {{name: boot, dataVolume: {{name: linux-boot}}}}
      - {{name: data, persistentVolumeClaim: {{claimName: linux-data, readOnly: true}}}}
---
apiVersion: cdi.kubevirt.io/v1beta1
kind: DataVolume
metadata: {{name: linux-data}}
spec:
  source: {{http: {{url: "{web.url}/data.img"}}}}
  storage: {{volumeMode: Block, accessModes: [ReadWriteOnce], resources: {{requests: {{storage: 16Mi}}}}}}
"""
    vms.apply(manifest)
    node = vms.nodes()[0]
    text = vms.wait(lambda: "PVLUN-LINUX" in vms.serial_log("linux", node) and vms.serial_log("linux", node),
                    120, "the Linux guest's marker")
    found = re.search(r"PVLUN-SHA256 ([0-9a-f]{64}|none) payload.bin", text)
    assert found and found.group(1) == hashlib.sha256(PAYLOAD).hexdigest(), text[-2000:]
    vms.wait_printable("linux", "Stopped", 60)
    assert vms.get("VirtualMachineInstance", "linux") is None
    assert vms.wait(lambda: not vms.attachments("linux"), 10, "linux's volumes detached")
    time.sleep(3)  # RerunOnFailure must not start it again
    assert vms.printable("linux") == "Stopped"
    assert vms.serial_log("linux", node).count("PVLUN-LINUX") == 1
    # started by hand it runs once more, and stays RerunOnFailure (virtctl start changes only Halted)
    assert "is Running" in vms.cli("vm", "start", "linux", "--wait", "--timeout", "60").stdout
    vms.wait(lambda: vms.serial_log("linux", node).count("PVLUN-LINUX") == 2, 120, "the second boot's marker")
    vms.wait_printable("linux", "Stopped", 60)
    assert vms.get("VirtualMachine", "linux")["spec"]["runStrategy"] == "RerunOnFailure"
    assert vms.serial_log("linux", node).count(f"PVLUN-SHA256 {hashlib.sha256(PAYLOAD).hexdigest()}") == 2


# ---------------------------------------------------------------- lifecycle


def test_stop_detaches_volumes_and_start_boots_again(vms, tick_image, tick_vm_yaml):
    pid = boot(vms, tick_vm_yaml("stopstart", tick_image), "stopstart")["launcher"]["pid"]
    out = vms.cli("vm", "stop", "stopstart", "--wait", "--timeout", "60")
    assert "is Stopped" in out.stdout
    vm = vms.get("VirtualMachine", "stopstart")
    assert vm["spec"]["runStrategy"] == "Halted"
    assert vms.get("VirtualMachineInstance", "stopstart") is None
    assert not alive(pid)
    assert vms.attachments("stopstart") == []
    handle = vms.get("PersistentVolume", vms.get("PersistentVolumeClaim", "stopstart-root")["spec"]["volumeName"])
    handle = handle["spec"]["csi"]["volumeHandle"]
    assert not [a for a in vms.store.list("VolumeAttachment") if a["spec"]["volumeId"] == handle]
    assert vms.cli("logs", "vm/stopstart").stdout.count(MARKER) == 1  # the console history outlives the run
    out = vms.cli("vm", "start", "stopstart", "--wait", "--timeout", "60")
    assert "is Running" in out.stdout
    wait_markers(vms, "stopstart", 2)
    assert vms.qemu_pid("stopstart") != pid
    assert len(vms.attachments("stopstart")) == 1


def test_pause_stops_the_ticks_and_unpause_resumes_them_without_reboot(vms, tick_image, tick_vm_yaml):
    node = boot(vms, tick_vm_yaml("pausing", tick_image), "pausing")["nodeName"]
    vms.wait(lambda: len(ticks(vms.serial_log("pausing", node))) >= 2, 15, "ticks")
    assert "is Paused" in vms.cli("vm", "pause", "pausing", "--wait", "--timeout", "30").stdout
    assert vms.vmi_status("pausing")["paused"] is True
    frozen = ticks(vms.serial_log("pausing", node))[-1]
    time.sleep(1.5)  # ~9 ticks' worth
    assert ticks(vms.serial_log("pausing", node))[-1] == frozen
    assert "is Running" in vms.cli("vm", "unpause", "pausing", "--wait", "--timeout", "30").stdout
    vms.wait(lambda: ticks(vms.serial_log("pausing", node))[-1] >= frozen + 3, 15, "ticks after unpause")
    text = vms.serial_log("pausing", node)
    assert text.count(MARKER) == 1
    assert ticks(text) == list(range(1, ticks(text)[-1] + 1))  # one run, counting on
    assert vms.vmi_status("pausing")["paused"] is False


def test_restart_boots_a_new_qemu(vms, tick_image, tick_vm_yaml):
    pid = boot(vms, tick_vm_yaml("restarting", tick_image), "restarting")["launcher"]["pid"]
    out = vms.cli("vm", "restart", "restarting", "--wait", "--timeout", "60")
    assert "is Running" in out.stdout
    assert not alive(pid) and vms.qemu_pid("restarting") != pid  # --wait returns once the new QEMU runs
    wait_markers(vms, "restarting", 2)
    assert vms.get("VirtualMachine", "restarting")["spec"]["runStrategy"] == "Always"


# ---------------------------------------------------------------- restart policies after QEMU is killed


def test_always_boots_a_new_qemu_after_qemu_is_killed(vms, tick_image, tick_vm_yaml):
    pid = boot(vms, tick_vm_yaml("always", tick_image), "always")["launcher"]["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_markers(vms, "always", 2, timeout=60)
    vms.wait_printable("always", "Running", 30)
    assert vms.qemu_pid("always") != pid and alive(vms.qemu_pid("always"))


def test_rerun_on_failure_boots_a_new_qemu_after_a_crash(vms, tick_image, tick_vm_yaml):
    pid = boot(vms, tick_vm_yaml("rerun", tick_image, strategy="RerunOnFailure"), "rerun")["launcher"]["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_markers(vms, "rerun", 2, timeout=60)
    vms.wait_printable("rerun", "Running", 30)
    assert vms.qemu_pid("rerun") != pid
    # a restart (a clean stop, then a new run) is not held back by the policy either
    pid = vms.qemu_pid("rerun")
    assert "is Running" in vms.cli("vm", "restart", "rerun", "--wait", "--timeout", "60").stdout
    wait_markers(vms, "rerun", 3)
    assert vms.qemu_pid("rerun") != pid
    assert vms.get("VirtualMachine", "rerun")["spec"]["runStrategy"] == "RerunOnFailure"


def test_manual_vm_stays_stopped_after_qemu_is_killed(vms, tick_image, tick_vm_yaml):
    vms.apply(tick_vm_yaml("manual", tick_image, strategy="Manual"))
    vms.wait(lambda: vms.printable("manual") == "Stopped", 60, "a Manual VM Stopped until started")
    assert "is Running" in vms.cli("vm", "start", "manual", "--wait", "--timeout", "60").stdout
    wait_markers(vms, "manual", 1)
    pid = vms.qemu_pid("manual")
    os.kill(pid, signal.SIGKILL)
    vms.wait_printable("manual", "Stopped", 30)
    vms.wait(lambda: not vms.attachments("manual"), 10, "manual's volumes detached")
    time.sleep(2)
    assert vms.printable("manual") == "Stopped"
    assert vms.all_serial_logs("manual").count(MARKER) == 1


def test_halted_vm_is_provisioned_but_not_started(vms, tick_image, tick_vm_yaml):
    vms.apply(tick_vm_yaml("halted", tick_image, strategy="Halted"))
    vms.wait(lambda: (vms.get("DataVolume", "halted-root") or {}).get("status", {}).get("phase") == "Succeeded",
             60, "halted's DataVolume")
    vms.wait_printable("halted", "Stopped", 10)
    time.sleep(1.5)
    assert vms.printable("halted") == "Stopped" and vms.get("VirtualMachineInstance", "halted") is None
    assert vms.all_serial_logs("halted") == "" and vms.attachments("halted") == []


# ---------------------------------------------------------------- specs refused or failing


def _refused(inst, manifest: str) -> str:
    out = inst.apply(manifest, check=False)
    assert out.returncode != 0, out.stdout
    return out.stderr


def test_disk_naming_an_unknown_volume_is_refused_with_the_field(vms, tick_image, tick_vm_yaml):
    manifest = tick_vm_yaml("badvol", tick_image).replace("          - name: root\n            bootOrder",
                                                         "          - name: rootfs\n            bootOrder")
    err = _refused(vms, manifest)
    assert "spec.template.spec.domain.devices.disks[0].name" in err and "rootfs" in err, err
    assert vms.get("VirtualMachine", "badvol") is None and vms.get("DataVolume", "badvol-root") is None


def test_unsupported_bus_is_refused_with_the_field(vms, tick_image, tick_vm_yaml):
    err = _refused(vms, tick_vm_yaml("badbus", tick_image).replace("bus: virtio", "bus: ide"))
    assert "spec.template.spec.domain.devices.disks[0].disk.bus" in err and "ide" in err, err
    assert vms.get("VirtualMachine", "badbus") is None


def test_memory_that_is_not_a_quantity_is_refused_with_the_field(vms, tick_image, tick_vm_yaml):
    err = _refused(vms, tick_vm_yaml("badmem", tick_image, memory="lots"))
    assert "spec.template.spec.domain.memory.guest" in err and "lots" in err, err
    assert vms.get("VirtualMachine", "badmem") is None


def test_missing_datavolume_is_refused_by_apply_with_the_field(vms, tick_image, tick_vm_yaml):
    manifest = tick_vm_yaml("nodv", tick_image)
    manifest = manifest[:manifest.index("  dataVolumeTemplates:")] + manifest[manifest.index("  template:"):]
    err = _refused(vms, manifest)
    assert "spec.template.spec.volumes[0].dataVolume.name" in err and "nodv-root" in err, err
    assert vms.get("VirtualMachine", "nodv") is None


def test_failed_datavolume_is_reported_as_datavolume_error(vms, tick_image, tick_vm_yaml):
    """As KubeVirt: the VM is stored, and its status says which DataVolume failed."""
    manifest = tick_vm_yaml("baddv", tick_image).replace("tick.img", "no-such-image.img")
    out = vms.apply(manifest, "--wait", "--timeout", "30", check=False)
    assert out.returncode != 0 and "DataVolumeError" in out.stderr and "baddv-root" in out.stderr, out.stderr
    vm = vms.get("VirtualMachine", "baddv")
    assert vm["status"]["printableStatus"] == "DataVolumeError"
    ready = next(c for c in vm["status"]["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False" and "baddv-root" in ready["message"]
    assert vms.get("VirtualMachineInstance", "baddv") is None


def test_missing_claim_is_reported_as_pvc_not_found(vms, tick_image, tick_vm_yaml):
    manifest = tick_vm_yaml("nopvc", tick_image)
    manifest = manifest[:manifest.index("  dataVolumeTemplates:")] + manifest[manifest.index("  template:"):]
    manifest = manifest.replace("dataVolume:\n          name: nopvc-root",
                                "persistentVolumeClaim:\n          claimName: nopvc-root")
    vms.apply(manifest)
    vms.wait_printable("nopvc", "ErrorPvcNotFound", 10)


# ---------------------------------------------------------------- volume QoS


def test_volume_attributes_class_change_reaches_the_running_guest_throttle(vms, tick_image, tick_vm_yaml):
    vms.apply("""apiVersion: storage.k8s.io/v1beta1
kind: VolumeAttributesClass
metadata:
  name: qos-slow
driverName: csi.pvlun.dev
parameters:
  maxIOPS: "150"
  maxMBps: "7"
""")
    boot(vms, tick_vm_yaml("qos", tick_image), "qos")
    limits = lambda: {v["name"]: v.get("ioLimits") for v in vms.vmi_status("qos").get("volumeStatus", [])}  # noqa: E731
    vms.wait(lambda: limits().get("root") == {"iopsTotal": 0, "bpsTotal": 0}, 15, "unlimited volume status")
    claim = vms.get("PersistentVolumeClaim", "qos-root")
    claim["spec"]["volumeAttributesClassName"] = "qos-slow"
    claim.pop("status")
    import yaml

    vms.apply(yaml.safe_dump(claim))
    # read back from QEMU's throttle group: 150 IOPS, 7 MiB/s, while the guest keeps running
    vms.wait(lambda: limits().get("root") == {"iopsTotal": 150, "bpsTotal": 7 << 20}, 15, "throttle from QEMU")
    assert vms.get("PersistentVolumeClaim", "qos-root")["status"]["currentVolumeAttributesClassName"] == "qos-slow"
    before = ticks(vms.all_serial_logs("qos"))[-1]
    vms.wait(lambda: ticks(vms.all_serial_logs("qos"))[-1] > before + 2, 10, "ticks after the change")
    assert vms.all_serial_logs("qos").count(MARKER) == 1
    vms.cli("vm", "stop", "qos", "--wait")


def test_expanding_the_claim_grows_the_disk_under_the_running_guest(vms, tick_image, tick_vm_yaml):
    boot(vms, tick_vm_yaml("grow", tick_image), "grow")
    size = lambda: {v["name"]: v.get("size") for v in vms.vmi_status("grow").get("volumeStatus", [])}.get("root")  # noqa: E731
    before = vms.wait(size, 15, "volume size in the VMI status")
    claim = vms.get("PersistentVolumeClaim", "grow-root")
    claim["spec"]["resources"]["requests"]["storage"] = str(before + (32 << 20))
    claim.pop("status")
    import yaml

    vms.apply(yaml.safe_dump(claim))
    # QEMU itself now reports the bigger disk (block_resize), and the guest never rebooted
    vms.wait(lambda: size() >= before + (32 << 20), 15, "QEMU's disk grown")
    status = vms.get("PersistentVolumeClaim", "grow-root")["status"]
    assert int(status["capacity"]["storage"]) >= before + (32 << 20)
    assert vms.all_serial_logs("grow").count(MARKER) == 1
    vms.cli("vm", "stop", "grow", "--wait")


def test_console_shows_the_live_serial_output_and_ctrl_close_bracket_leaves(vms, tick_image, tick_vm_yaml):
    import pty
    import select
    import sys

    boot(vms, tick_vm_yaml("cons", tick_image), "cons")
    pid, fd = pty.fork()
    if pid == 0:  # the child: the CLI on a terminal, as a person runs it
        os.execv(sys.executable, [sys.executable, "-m", "pvlun.cli", "console", "vm/cons", "--data-dir", vms.data_dir])
    out = b""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and out.count(b"tick") < 3:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            out += os.read(fd, 4096)
    os.write(fd, b"\x1d")
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0
    assert b"escape sequence is ^]" in out and out.count(b"tick") >= 3, out
    vms.cli("vm", "stop", "cons", "--wait")
