"""VmLauncher.quiesced(): a running guest is paused (QMP stop) for the body and resumed (cont)
after it, even when the body fails; the pause's wall time is kept; the VM's phase never shows
the snapshot's instant; a guest the user paused stays paused."""

from __future__ import annotations

import time

import pytest

from virt.launcher import Phase


def ticks(launcher) -> int:
    return launcher.serial_text().count("tick ")


def test_a_running_guest_is_held_still_for_the_body_then_runs_on(launchers, make_tick_vm, tick_copy, tmp_path):
    phases: list[tuple[Phase, str]] = []
    vm = launchers(make_tick_vm(), tick_copy, tmp_path / "run", on_phase=lambda _l, p, r: phases.append((p, r)))
    vm.start()
    assert vm.wait_for_serial("tick 2", timeout=30)
    before = list(phases)
    with vm.quiesced() as indication:
        assert indication == "NoGuestAgent"
        assert vm.execute("query-status")["status"] == "paused"
        held = ticks(vm)
        time.sleep(0.6)  # about four ticks' time
        assert ticks(vm) == held  # the guest does not run
    assert vm.execute("query-status")["status"] == "running"
    assert vm.wait_for_serial("tick ", timeout=10, count=held + 2)
    assert 0.5 < vm.last_pause_seconds < 5
    time.sleep(0.2)
    assert phases == before and vm.phase is Phase.RUNNING  # neither its stop nor its cont is a change of phase

    with pytest.raises(RuntimeError, match="snapshot failed"):
        with vm.quiesced():
            raise RuntimeError("snapshot failed")
    assert vm.execute("query-status")["status"] == "running"  # resumed all the same


def test_a_paused_guest_stays_paused(launchers, make_tick_vm, tick_copy, tmp_path):
    vm = launchers(make_tick_vm(), tick_copy, tmp_path / "run")
    vm.start()
    assert vm.wait_for_serial("tick 1", timeout=30)
    vm.pause()
    with vm.quiesced() as indication:
        assert indication == "NoGuestAgent"
    assert vm.execute("query-status")["status"] == "paused" and vm.phase is Phase.PAUSED
    assert vm.last_pause_seconds == 0.0  # nothing was paused for the snapshot: it already was
