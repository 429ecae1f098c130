"""`pvlun serve` killed with -9 and started again on the same data dir: half-done imports start
over on a fresh volume (uploads and VMs: test_kill9.py)."""

from __future__ import annotations

import os
import signal

from test_datavolume import dv, make_qcow2, same_prefix


def kill9(inst) -> None:
    inst.proc.send_signal(signal.SIGKILL)
    inst.proc.wait()


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
