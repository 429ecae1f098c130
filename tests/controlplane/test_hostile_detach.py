"""A detach that cannot finish at once: a process keeps the staging mount of a Filesystem
import busy (`cd STAGING`) when its DataVolume is deleted. The VolumeAttachment stays, marked
detaching and saying why, the claim waits for it, and once the mount is free the attacher
finishes the detach with backoff — or, after a kill -9 in that window, start-up repair does:
no staging mount, loop device or publication outlives its record, and the claim goes."""

from __future__ import annotations

import os
import signal
import subprocess

from test_datavolume import dv
from test_hostile_imports import hostile, released  # noqa: F401 - hostile is a fixture
from test_hostile_lifecycle import loop_devices, mounted

MiB = 1 << 20


def import_under_way(inst, server, name: str) -> tuple[dict, str]:
    """A Filesystem import from a trickling server, caught while its volume is attached: its
    VolumeAttachment, and the LUN."""
    inst.apply(dv(name, f"    http:\n      url: {server.url}", mode="Filesystem"))
    owner = f"import/default/{name}"
    [att] = inst.wait(lambda: [a for a in inst.store.list("VolumeAttachment") if a["spec"]["owner"] == owner
                               and (a.get("status") or {}).get("attached")], 30, "the import's volume attached")
    return att, inst.lun_path(name)


def detaching(inst, att: dict) -> dict | None:
    """The attachment, once a detach of it failed (marked, with the reason), else None."""
    current = inst.get("VolumeAttachment", att["metadata"]["name"], "")
    if current and current["metadata"].get("deletionTimestamp") and (current.get("status") or {}).get("detachError"):
        return current
    return None


def assert_held(inst, att: dict, name: str, lun: str) -> None:
    """The detach cannot finish: everything is still there, and says so."""
    current = inst.wait(lambda: detaching(inst, att), 30, "the detach marked as failing")
    assert "busy" in current["status"]["detachError"]["message"]
    assert mounted(att["spec"]["stagingPath"]) and loop_devices(lun)
    claim = inst.get("PersistentVolumeClaim", name)
    assert claim is not None and claim["metadata"].get("deletionTimestamp")  # protected, waiting
    assert os.path.exists(lun)
    assert not [e for e in inst.store.events(claim) if e["reason"] == "VolumeFailedDelete"]


def assert_gone(inst, att: dict, name: str, lun: str) -> None:
    inst.wait(lambda: released(inst, name, lun), 60, "the volume released")
    assert not mounted(att["spec"]["stagingPath"]) and not mounted(att["spec"]["targetPath"])
    backing = subprocess.run(["losetup", "--list", "--noheadings", "--output", "BACK-FILE"], capture_output=True,
                             text=True, check=True).stdout
    assert lun not in backing  # its loop device went too
    assert inst.get("VolumeAttachment", att["metadata"]["name"], "") is None


def test_a_detach_kept_from_unstaging_keeps_its_record_and_is_finished_once_the_mount_is_free(instance, hostile):
    server = hostile("trickle", size=64 * MiB)
    att, lun = import_under_way(instance, server, "busy-stage")
    holder = subprocess.Popen(["sleep", "120"], cwd=att["spec"]["stagingPath"])  # keeps the mount busy
    try:
        instance.cli("delete", "dv", "busy-stage")
        assert_held(instance, att, "busy-stage", lun)
        instance.wait(lambda: [e for e in instance.store.events(detaching(instance, att) or att)
                               if e["reason"] == "ReconcileError" and e["count"] >= 2], 30, "the attacher retrying")
    finally:
        holder.kill()
        holder.wait()
    assert_gone(instance, att, "busy-stage", lun)


def test_a_kill_9_while_a_detach_is_held_up_is_finished_by_start_up_repair(serve, hostile, tmp_path):
    server = hostile("trickle", size=64 * MiB)
    data_dir = str(tmp_path / "held")
    os.makedirs(data_dir)
    first = serve("--nodes", "1", data_dir=data_dir)
    att, lun = import_under_way(first, server, "held")
    holder = subprocess.Popen(["sleep", "120"], cwd=att["spec"]["stagingPath"])
    try:
        first.cli("delete", "dv", "held")
        assert_held(first, att, "held", lun)
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(30)
    finally:
        holder.kill()
        holder.wait()
    assert detaching(first, att)  # the record outlived the crash: start-up repair knows what to undo
    second = serve("--nodes", "1", data_dir=data_dir)
    assert_gone(second, att, "held", lun)
