"""`pvlun serve` killed with -9 and started again on the same data dir: nothing runs twice,
nothing stays attached, half-done imports start over, VMs come back as their runStrategy says."""

from __future__ import annotations

import os
import signal

from guest_output import MARKER, alive
from test_datavolume import dv, make_qcow2, same_prefix


def kill9(inst) -> None:
    inst.proc.send_signal(signal.SIGKILL)
    inst.proc.wait()


def test_vm_after_daemon_kill_runs_once_again_with_its_volume_attached_once(serve, tmp_path, tick_image, tick_vm_yaml):
    data_dir = str(tmp_path / "data")
    os.makedirs(data_dir)
    first = serve("--nodes", "2", "--accel", "tcg", data_dir=data_dir)
    first.apply(tick_vm_yaml("phoenix", tick_image), "--wait")
    first.wait(lambda: MARKER in first.all_serial_logs("phoenix"), 30, "first boot")
    old_pid = first.qemu_pid("phoenix")
    kill9(first)
    assert alive(old_pid)  # QEMU outlives the daemon, as a pod would outlive a controller crash
    second = serve("--nodes", "2", "--accel", "tcg", data_dir=data_dir)
    second.wait(lambda: not alive(old_pid), 15, "the orphaned QEMU stopped")
    second.wait(lambda: second.all_serial_logs("phoenix").count(MARKER) == 2, 30, "the VM booted again (Always)")
    new_pid = second.qemu_pid("phoenix")
    assert new_pid != old_pid and alive(new_pid)
    assert len(second.attachments("phoenix")) == 1
    second.wait_printable("phoenix", "Running", 15)
    second.cli("vm", "stop", "phoenix", "--wait")
    assert second.attachments("phoenix") == []


def test_import_cut_off_by_a_daemon_kill_starts_over_on_a_fresh_volume(serve, tmp_path, web):
    data_dir = str(tmp_path / "data2")
    os.makedirs(data_dir)
    raw = make_qcow2(os.path.join(web.root, "restart.qcow2"))
    first = serve(data_dir=data_dir)
    first.apply(dv("again", f"    http:\n      url: {web.url}/restart.qcow2"), "--wait")
    lun = first.lun_path("again")
    kill9(first)  # the pool stays mounted, as after a crash
    # as if the daemon died mid-import: the phase says so and the volume holds junk
    first.store.merge_status("DataVolume", "again", "default", phase="ImportInProgress", progress="40.00%")
    with open(lun, "r+b") as f:
        f.write(os.urandom(1 << 20))
    second = serve(data_dir=data_dir)
    second.wait(lambda: (second.get("DataVolume", "again").get("status") or {}).get("phase") == "Succeeded", 60,
                "the import done again")
    status = second.get("DataVolume", "again")["status"]
    assert status["restartCount"] == 1
    assert not os.path.exists(lun)  # the half-written volume was deleted, not reused
    assert same_prefix(raw, second.lun_path("again"))
    events = second.cli("describe", "dv", "again").stdout
    assert "ImportRestarted" in events
