"""Live migration end to end: `pvlun serve --nodes 2 --migration-hook ...` under TCG, the tick
guest moving between the two nodes with `pvlun vm migrate` or a VirtualMachineInstanceMigration,
its volume published only where it runs, and failed migrations leaving the source running."""

from __future__ import annotations

import os
import re
import subprocess

import grpc
import pytest
import yaml

from csi.proto import csi_pb2 as pb
from csi.proto import csi_pb2_grpc
from guest_output import MARKER, alive, ticks


# A user hook (argv: event vm source target data-dir): records "{event} {vm} {source} {target}";
# a flag file makes the pre hook fail, or makes it start a watcher that SIGKILLs the target QEMU
# (found by its run directory in this instance, not its sandbox's processes that name it too) as
# soon as it appears, while the flag exists.
HOOK = """#!/bin/sh
dir=$(dirname "$0")
echo "$1 $2 $3 $4" >> "$dir/hooks.log"
if [ "$1" = pre ] && [ -e "$dir/fail-pre-$2" ]; then echo "pre hook refused to move $2" >&2; exit 3; fi
if [ "$1" = pre ] && [ -e "$dir/slow-pre-$2" ]; then sleep 3; fi
if [ "$1" = pre ] && [ -e "$dir/kill-target-$2" ]; then
  ( while [ -e "$dir/kill-target-$2" ]; do
      pid=$(pgrep -f "^qemu-system-x86_64 .*$5/vms/default/$2/$4/") && { kill -9 $pid; echo "$pid" > "$dir/killed-$2"; exit 0; }
      sleep 0.005; done ) </dev/null >/dev/null 2>&1 &
fi
exit 0
"""


@pytest.fixture(scope="module")
def hooks_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("hooks")
    (path / "hook.sh").write_text(HOOK)
    return str(path)


@pytest.fixture(scope="module")
def mig(serve, hooks_dir, tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("pvlun-mig"))
    hook = f"sh {hooks_dir}/hook.sh {{event}} {{vm}} {{source}} {{target}} {data_dir}"
    return serve("--nodes", "2", "--accel", "tcg",
                 "--migration-hook", f"pre={hook}", "--migration-hook", f"post={hook}",
                 "--migration-hook", f"failed={hook}", data_dir=data_dir)


@pytest.fixture(scope="module")
def mover(mig, tick_image, tick_vm_yaml) -> str:
    """A ticking guest on a Block ReadWriteMany DataVolume (live-migratable)."""
    out = mig.apply(tick_vm_yaml("mover", tick_image, memory="128Mi"), "--wait")
    assert "virtualmachine/mover Running" in out.stdout, out.stdout + out.stderr
    mig.wait(lambda: MARKER in mig.all_serial_logs("mover"), 30, "mover's marker")
    return "mover"


def hook_lines(hooks_dir: str) -> list[str]:
    try:
        with open(os.path.join(hooks_dir, "hooks.log")) as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


def placement(inst, vm: str) -> tuple[str, str]:
    """(the node the VMI runs on, the other node)."""
    node = inst.vmi_status(vm)["nodeName"]
    return node, next(n for n in inst.nodes() if n != node)


def published_nodes(inst, claim: str) -> list[str]:
    """The CSI driver's own view (ListVolumes published_node_ids) of where the claim's volume is published."""
    pv = inst.get("PersistentVolume", inst.get("PersistentVolumeClaim", claim)["spec"]["volumeName"])
    handle = pv["spec"]["csi"]["volumeHandle"]
    with grpc.insecure_channel(f"unix://{inst.data_dir}/csi.sock") as channel:
        entries = csi_pb2_grpc.ControllerStub(channel).ListVolumes(pb.ListVolumesRequest(), timeout=10).entries
    (entry,) = [e for e in entries if e.volume.volume_id == handle]
    return sorted(entry.status.published_node_ids)


def attachment_nodes(inst, vm: str) -> list[str]:
    return sorted(a["spec"]["nodeName"] for a in inst.attachments(vm))


def assert_keeps_ticking(inst, vm: str, node: str, pid: int) -> None:
    """Still the same QEMU on the same node, counting on."""
    assert alive(pid) and inst.qemu_pid(vm) == pid and inst.vmi_status(vm)["nodeName"] == node
    last = ticks(inst.serial_log(vm, node))[-1]
    inst.wait(lambda: ticks(inst.serial_log(vm, node))[-1] >= last + 3, 15, f"{vm} ticking on {node}")
    assert inst.all_serial_logs(vm).count(MARKER) == 1
    inst.wait_printable(vm, "Running", 10)


def assert_moved(inst, vm: str, source: str, target: str, old_pid: int, target_log_before: int) -> None:
    """The guest runs on `target` in a new QEMU that kept counting; nothing is left on `source`."""
    status = inst.vmi_status(vm)
    assert status["nodeName"] == target and status["phase"] == "Running"
    assert not alive(old_pid) and status["launcher"]["pid"] != old_pid and alive(status["launcher"]["pid"])
    inst.wait(lambda: len(ticks(inst.serial_log(vm, target)[target_log_before:])) >= 3, 15, "ticks on the target")
    on_target = inst.serial_log(vm, target)[target_log_before:]
    assert MARKER not in on_target  # no reboot
    assert inst.all_serial_logs(vm).count(MARKER) == 1
    # the target carries on the source's byte stream (even if a line was cut in the middle)
    on_source = inst.serial_log(vm, source)
    last = list(re.finditer(r"tick (\d+)\r?\n", on_source))[-1]
    counted = ticks(on_source[last.start():] + on_target)
    assert counted == list(range(int(last.group(1)), int(last.group(1)) + len(counted))) and len(counted) >= 4
    assert attachment_nodes(inst, vm) == [target]
    assert published_nodes(inst, f"{vm}-root") == [target]
    inst.wait_printable(vm, "Running", 10)
    assert "tick" in inst.cli("logs", f"vm/{vm}").stdout.splitlines()[-1]  # logs follow the VMI


def test_vm_migrate_moves_the_ticking_guest_to_the_other_node(mig, mover, hooks_dir):
    source, target = placement(mig, mover)
    pid = mig.qemu_pid(mover)
    mig.wait(lambda: len(ticks(mig.serial_log(mover, source))) >= 3, 15, "ticks before the migration")
    before, log_before = len(hook_lines(hooks_dir)), len(mig.serial_log(mover, target))
    assert attachment_nodes(mig, mover) == [source] and published_nodes(mig, "mover-root") == [source]

    out = mig.cli("vm", "migrate", mover, "--wait", "--timeout", "120")
    assert f"migrated {mover} from {source} to {target}" in out.stdout, out.stdout + out.stderr

    assert_moved(mig, mover, source, target, pid, log_before)
    vmi = yaml.safe_load(mig.cli("get", "vmi", mover, "-o", "yaml").stdout)
    assert vmi["status"]["nodeName"] == target
    listed = yaml.safe_load(mig.cli("get", "volumeattachment", "-o", "yaml").stdout)["items"]
    assert [a["spec"]["nodeName"] for a in listed if a["spec"]["owner"] == f"vm/default/{mover}"] == [target]
    (migration,) = [m for m in mig.store.list("VirtualMachineInstanceMigration") if m["spec"]["vmiName"] == mover]
    st = migration["status"]
    assert st["phase"] == "Succeeded" and st["sourceNode"] == source and st["targetNode"] == target
    assert isinstance(st["downtimeMs"], int) and 0 <= st["downtimeMs"] < 5000, st
    assert st["dataRemaining"] == 0 and st["dataTotal"] >= 128 << 20 and st["dataTransferred"] > 0
    assert st["totalTimeMs"] >= st["downtimeMs"]  # QEMU's total-time (ms) may round to 0 for a guest this idle
    assert mig.vmi_status(mover)["migrationState"]["phase"] == "Succeeded"
    # the user hooks ran in order, with the nodes, around our own publish/unpublish hooks
    assert hook_lines(hooks_dir)[before:] == [f"pre {mover} {source} {target}", f"post {mover} {source} {target}"]


def test_vm_with_a_readwriteonce_volume_is_not_live_migratable(mig, tick_image, tick_vm_yaml, hooks_dir):
    out = mig.apply(tick_vm_yaml("pinned", tick_image, access="ReadWriteOnce"), "--wait")
    assert "virtualmachine/pinned Running" in out.stdout, out.stdout + out.stderr
    mig.wait(lambda: MARKER in mig.all_serial_logs("pinned"), 30, "pinned's marker")
    node, _ = placement(mig, "pinned")
    pid = mig.qemu_pid("pinned")
    before = len(hook_lines(hooks_dir))

    out = mig.cli("vm", "migrate", "pinned", "--wait", "--timeout", "60", check=False)
    assert out.returncode == 1 and "ReadWriteMany" in out.stderr, out.stdout + out.stderr
    (migration,) = [m for m in mig.store.list("VirtualMachineInstanceMigration") if m["spec"]["vmiName"] == "pinned"]
    assert migration["status"]["phase"] == "Failed" and "ReadWriteMany" in migration["status"]["reason"]
    assert hook_lines(hooks_dir)[before:] == []  # refused before anything was prepared
    assert_keeps_ticking(mig, "pinned", node, pid)
    assert attachment_nodes(mig, "pinned") == [node] and published_nodes(mig, "pinned-root") == [node]


def test_failing_pre_hook_fails_the_migration_and_leaves_the_source_running(mig, mover, hooks_dir):
    source, target = placement(mig, mover)
    pid = mig.qemu_pid(mover)
    before = len(hook_lines(hooks_dir))
    flag = os.path.join(hooks_dir, f"fail-pre-{mover}")
    open(flag, "w").close()
    try:
        out = mig.cli("vm", "migrate", mover, "--wait", "--timeout", "60", check=False)
    finally:
        os.unlink(flag)
    assert out.returncode == 1 and "pre hook refused to move mover" in out.stderr, out.stdout + out.stderr
    assert hook_lines(hooks_dir)[before:] == [f"pre {mover} {source} {target}", f"failed {mover} {source} {target}"]
    assert_keeps_ticking(mig, mover, source, pid)
    # our own pre hook had published the volume on the target; the failed hooks took it back
    assert attachment_nodes(mig, mover) == [source] and published_nodes(mig, "mover-root") == [source]
    assert mig.vmi_status(mover)["migrationState"]["phase"] == "Failed"


def test_target_qemu_killed_during_migration_leaves_the_source_running(mig, mover, hooks_dir):
    """The target QEMU is SIGKILLed as soon as it appears (a whole migration of the tick guest takes
    ~15 ms on loopback, too short to aim at the transfer itself from outside; tests/virt does that)."""
    source, target = placement(mig, mover)
    pid = mig.qemu_pid(mover)
    before = len(hook_lines(hooks_dir))
    flag = os.path.join(hooks_dir, f"kill-target-{mover}")
    open(flag, "w").close()
    try:
        out = mig.cli("vm", "migrate", mover, "--wait", "--timeout", "60", check=False)
    finally:
        os.unlink(flag)
    assert out.returncode == 1 and "migration failed" in out.stderr and "QEMU" in out.stderr, out.stdout + out.stderr
    with open(os.path.join(hooks_dir, f"killed-{mover}")) as f:
        killed = int(f.read())
    assert killed != pid and not alive(killed)
    assert hook_lines(hooks_dir)[before:] == [f"pre {mover} {source} {target}", f"failed {mover} {source} {target}"]
    assert_keeps_ticking(mig, mover, source, pid)
    assert attachment_nodes(mig, mover) == [source] and published_nodes(mig, "mover-root") == [source]
    leftover = subprocess.run(["pgrep", "-f", f"vms/default/{mover}/{target}/"], capture_output=True, text=True)
    assert leftover.stdout == ""


def test_applied_virtualmachineinstancemigration_moves_the_guest(mig, mover, hooks_dir):
    """After the failures above, a VirtualMachineInstanceMigration manifest still moves it."""
    source, target = placement(mig, mover)
    pid = mig.qemu_pid(mover)
    before, log_before = len(hook_lines(hooks_dir)), len(mig.serial_log(mover, target))
    mig.apply(f"""apiVersion: kubevirt.io/v1
kind: VirtualMachineInstanceMigration
metadata:
  name: move-{mover}
spec:
  vmiName: {mover}
""")
    phase = lambda: ((mig.get("VirtualMachineInstanceMigration", f"move-{mover}") or {}).get("status") or {}).get("phase")
    mig.wait(lambda: phase() in ("Succeeded", "Failed"), 60, "the migration to finish")
    status = mig.get("VirtualMachineInstanceMigration", f"move-{mover}")["status"]
    assert status["phase"] == "Succeeded", status
    assert status["sourceNode"] == source and status["targetNode"] == target
    assert_moved(mig, mover, source, target, pid, log_before)
    assert hook_lines(hooks_dir)[before:] == [f"pre {mover} {source} {target}", f"post {mover} {source} {target}"]
    table = mig.cli("get", "vmim").stdout
    assert re.search(rf"move-{mover}\s+Succeeded\s+{mover}", table), table


def test_cancelled_migration_leaves_the_source_running_and_cleans_the_target(mig, mover, hooks_dir):
    source, target = placement(mig, mover)
    pid = mig.qemu_pid(mover)
    before = len(hook_lines(hooks_dir))
    flag = os.path.join(hooks_dir, f"slow-pre-{mover}")
    open(flag, "w").close()
    try:
        mig.cli("vm", "migrate", mover)  # no --wait: it is under way, in its (slow) pre hook
        mig.wait(lambda: len(hook_lines(hooks_dir)) > before, 10, "the pre hook running")
        out = mig.cli("vm", "migrate-cancel", mover)
        assert "cancelled" in out.stdout
    finally:
        os.unlink(flag)
    mig.wait(lambda: hook_lines(hooks_dir)[before:] == [f"pre {mover} {source} {target}",
                                                        f"failed {mover} {source} {target}"], 20, "failed hooks")
    assert mig.vmi_status(mover)["migrationState"]["phase"] == "Failed"
    assert "cancelled" in mig.vmi_status(mover)["migrationState"]["error"]
    assert_keeps_ticking(mig, mover, source, pid)
    assert attachment_nodes(mig, mover) == [source] and published_nodes(mig, "mover-root") == [source]
    # the deleted migration object goes away once the cancel is done
    mig.wait(lambda: not [m for m in mig.store.list("VirtualMachineInstanceMigration")
                          if (m.get("spec") or {}).get("vmiName") == mover
                          and (m.get("status") or {}).get("phase") not in ("Succeeded", "Failed")], 10,
             "the cancelled migration object gone")


def test_logs_show_the_whole_console_history_across_a_migration_and_a_restart(mig, tick_image, tick_vm_yaml):
    out = mig.apply(tick_vm_yaml("historian", tick_image), "--wait")
    assert "virtualmachine/historian Running" in out.stdout, out.stdout + out.stderr
    source, target = placement(mig, "historian")
    mig.wait(lambda: len(ticks(mig.serial_log("historian", source))) >= 3, 15, "ticks before the migration")
    out = mig.cli("vm", "migrate", "historian", "--wait", "--timeout", "120")
    assert f"from {source} to {target}" in out.stdout, out.stdout + out.stderr
    last_on_source = ticks(mig.serial_log("historian", source))[-1]
    mig.wait(lambda: len(ticks(mig.serial_log("historian", target))) >= 3, 15, "ticks after the migration")
    first_run_end = ticks(mig.serial_log("historian", target))[-1]
    assert "is Running" in mig.cli("vm", "restart", "historian", "--wait", "--timeout", "60").stdout
    second_boot = lambda: mig.cli("logs", "vm/historian").stdout.split(MARKER)[2:]  # noqa: E731
    mig.wait(lambda: second_boot() and len(ticks(second_boot()[0])) >= 2, 30, "ticks of the second run in pvlun logs")

    text = mig.cli("logs", "vm/historian").stdout
    assert text.count(MARKER) == 2  # two boots, in order, each once
    _, first_run, second_run = text.split(MARKER)
    counted = ticks(first_run)  # one count across both nodes: nothing lost or repeated at the switch
    assert counted == list(range(1, len(counted) + 1)) and len(counted) >= first_run_end > last_on_source
    assert ticks(second_run)[:2] == [1, 2]
