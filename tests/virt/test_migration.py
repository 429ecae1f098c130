"""Live migration of the ticking guest between two QEMUs on loopback, with hooks."""

from __future__ import annotations

import re
import time

from virt.hooks import MigrationHooks
from virt.launcher import Phase
from virt.migration import migrate


def ticks(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"tick (\d+)\r\n", text)]


def recording_hooks(calls: list) -> MigrationHooks:
    hooks = MigrationHooks()
    for event in ("pre", "post", "failed"):
        for n in (1, 2):
            hooks.register(event, lambda ctx, tag=f"{event}{n}": calls.append(
                (tag, ctx.vm.name, ctx.source_node, ctx.target_node)), name=f"{event}{n}")
    return hooks


def test_live_migration_keeps_the_guest_ticking_on_the_target(launchers, make_tick_vm, tick_copy, tmp_path):
    spec = make_tick_vm()
    source = launchers(spec, tick_copy, tmp_path / "src", node="node-a")
    source.start()
    assert source.wait_for_serial("tick 3", timeout=15)
    calls: list = []
    progress: list[str] = []
    log = tmp_path / "hook.log"
    hooks = recording_hooks(calls)
    hooks.register("pre", ["sh", "-c", f"echo {{event}} {{vm}} {{source}} {{target}} >> {log}"], name="cmd")
    made = []

    def make_target():  # called after the pre hooks, as a CSI publish on the target would require
        made.append(launchers(spec, tick_copy, tmp_path / "dst", node="node-b", incoming="defer"))
        return made[-1]

    status = migrate(source, make_target, hooks=hooks, target_node="node-b",
                     on_progress=lambda s: progress.append(s.phase))
    assert status.phase == "Succeeded", status.error
    assert progress[0] == "PreparingTarget" and "Running" in progress and progress[-1] == "Succeeded"
    assert status.downtime_ms is not None and status.downtime_ms < 300
    assert status.total_time_ms and status.data_remaining == 0 and status.data_total >= 64 << 20
    assert [c[0] for c in calls] == ["pre1", "pre2", "post1", "post2"]
    assert calls[0][1:] == ("tick", "node-a", "node-b")
    assert log.read_text() == "pre tick node-a node-b\n"
    assert [h[:2] for h in hooks.history] == [("pre", "pre1"), ("pre", "pre2"), ("pre", "cmd"),
                                              ("post", "post1"), ("post", "post2")]
    # the source QEMU is gone; its last tick is where the target carries on
    assert not source.running() and source.phase is Phase.SUCCEEDED and source.reason == "migrated"
    last_source_tick = ticks(source.serial_text())[-1]
    dst_log = (tmp_path / "dst" / "serial.log")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and len(ticks(dst_log.read_bytes().decode(errors="replace"))) < 3:
        time.sleep(0.1)
    dst_text = dst_log.read_bytes().decode(errors="replace")
    assert "PVLUN-BOOT" not in dst_text  # no reboot on the target
    dst_ticks = ticks(dst_text)
    assert len(dst_ticks) >= 3 and made[0].phase is Phase.RUNNING
    assert dst_ticks[0] == last_source_tick + 1
    assert dst_ticks == list(range(dst_ticks[0], dst_ticks[0] + len(dst_ticks)))


def test_target_killed_mid_way_leaves_source_running(launchers, make_tick_vm, tick_copy, tmp_path):
    spec = make_tick_vm()
    source = launchers(spec, tick_copy, tmp_path / "src", node="node-a")
    source.start()
    assert source.wait_for_serial("tick 2", timeout=15)
    target = launchers(spec, tick_copy, tmp_path / "dst", node="node-b", incoming="defer")
    calls: list = []
    killed = []

    def kill_target_once_data_flows(status):
        if status.phase == "Running" and status.data_transferred > 0 and not killed:
            killed.append(status.qemu_status)
            target.kill()

    # 200 KB/s: the migration cannot finish before the target is killed
    status = migrate(source, target, hooks=recording_hooks(calls), max_bandwidth=200_000,
                     on_progress=kill_target_once_data_flows)
    assert killed == ["active"]
    assert status.phase == "Failed" and status.error
    assert [c[0] for c in calls] == ["pre1", "pre2", "failed1", "failed2"]
    assert not target.running()
    assert source.running() and source.phase is Phase.RUNNING
    assert source.execute("query-status")["status"] == "running"
    before = ticks(source.serial_text())[-1]
    assert source.wait_for_serial(f"tick {before + 2}\r\n", timeout=10)  # still ticking
    assert source.serial_text().count("PVLUN-BOOT") == 1


def test_failing_pre_hook_aborts_before_the_target_starts(launchers, make_tick_vm, tick_copy, tmp_path):
    spec = make_tick_vm()
    source = launchers(spec, tick_copy, tmp_path / "src", node="node-a")
    source.start()
    hooks = MigrationHooks()
    order = []
    hooks.register("pre", ["sh", "-c", "echo publish failed >&2; exit 3"], name="publish")
    hooks.register("failed", lambda ctx: order.append(("failed", ctx.error)))
    made = []
    status = migrate(source, lambda: made.append(1), hooks=hooks, target_node="node-b")
    assert status.phase == "Failed" and "publish" in status.error and "publish failed" in status.error
    assert made == [] and order and "publish failed" in order[0][1]
    assert source.running() and source.phase is Phase.RUNNING
