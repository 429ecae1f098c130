"""Sources that stall or crawl: a stalled import is retried with backoff and then Failed with
the reason; deleting a DataVolume cancels its import within seconds, child processes and all,
and its volume is released (detached, claim and PV gone, the LUN deleted)."""

from __future__ import annotations

import os
import subprocess
import time

import pytest
from hostile_http import HostileServer
from test_datavolume import dv, make_qcow2

from host.sandbox import processes_below

MiB = 1 << 20


@pytest.fixture
def hostile():
    servers: list[HostileServer] = []

    def make(behaviour: str, **kw) -> HostileServer:
        servers.append(HostileServer(behaviour, **kw))
        return servers[-1]

    yield make
    for server in servers:
        server.stop()


def status(inst, name: str) -> dict:
    return (inst.get("DataVolume", name) or {}).get("status") or {}


def descendants(pid: int) -> list[str]:
    """Command lines of every process below pid."""
    found = []
    for child in processes_below(pid):
        try:
            with open(f"/proc/{child}/cmdline", "rb") as f:
                found.append(f.read().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            continue
    return found


def released(inst, name: str, lun: str) -> bool:
    """The DataVolume's volume is gone everywhere: no attachment, no claim, no PV, no LUN."""
    return (not [a for a in inst.store.list("VolumeAttachment") if a["spec"]["owner"].endswith(f"/default/{name}")]
            and inst.get("PersistentVolumeClaim", name) is None
            and not [pv for pv in inst.store.list("PersistentVolume")
                     if (pv["spec"].get("claimRef") or {}).get("name") == name]
            and not os.path.exists(lun))


def test_import_from_a_server_that_goes_silent_is_retried_with_backoff_then_failed_as_stalled(serve, hostile):
    inst = serve("--import-stall-timeout", "1")
    server = hostile("silent")
    started = time.monotonic()
    inst.apply(dv("stalled", f"    http:\n      url: {server.url}"))
    inst.wait(lambda: status(inst, "stalled").get("phase") == "Failed", 60, "the stalled import Failed")
    took = time.monotonic() - started
    st = status(inst, "stalled")
    ready = next(c for c in st["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "TransferStalled"
    assert "no data arrived" in ready["message"] and "(3 attempts)" in ready["message"]
    assert st["restartCount"] == 2 and server.requests == 3
    retries = [e for e in inst.store.events(inst.get("DataVolume", "stalled")) if e["reason"] == "TransferStalled"]
    assert len(retries) == 3 and "trying again in 0.25 s" in retries[0]["message"]
    assert took < 30, took  # 3 x 1 s stalls and 0.75 s of backoff, not 3 x a socket timeout
    # a failed import leaves no volume (its claim goes once the detach is done: a moment after Failed)
    inst.wait(lambda: inst.get("PersistentVolumeClaim", "stalled") is None, 30, "the failed import's claim gone")
    assert inst.store.list("VolumeAttachment") == []


def test_an_in_place_import_the_server_fails_is_retried_as_a_transfer_failure_not_failed_as_invalid(serve, hostile,
                                                                                                  tmp_path):
    """qemu-img reading through nbdkit sees the server's 503 only as an I/O error: nbdkit's log
    says it was the server, so the import is retried with backoff like a streamed one."""
    inst = serve("--import-stall-timeout", "2")
    make_qcow2(str(tmp_path / "disk.qcow2"), 16)
    server = hostile("ranged_503", image=(tmp_path / "disk.qcow2").read_bytes())
    inst.apply(dv("failing", f"    http:\n      url: {server.url}"))
    inst.wait(lambda: status(inst, "failing").get("phase") == "Failed", 60, "the failing import Failed")
    st = status(inst, "failing")
    ready = next(c for c in st["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "TransferFailed", ready
    assert "503" in ready["message"] and "(3 attempts)" in ready["message"] and st["restartCount"] == 2


def test_deleting_a_datavolume_cancels_its_streaming_import_within_seconds_and_releases_its_volume(instance, hostile):
    server = hostile("trickle", size=64 * MiB)
    instance.apply(dv("crawl", f"    http:\n      url: {server.url}"))
    instance.wait(lambda: status(instance, "crawl").get("phase") == "ImportInProgress"
                  and instance.store.list("VolumeAttachment"), 30, "the import under way")
    lun = instance.lun_path("crawl")
    time.sleep(0.5)
    assert server.hung_up_at is None
    deleted = time.monotonic()
    instance.cli("delete", "dv", "crawl")
    instance.wait(lambda: server.hung_up_at is not None, 5, "the import hung up on the server")
    assert server.hung_up_at - deleted < 5
    instance.wait(lambda: released(instance, "crawl", lun), 10, "the volume released")


def test_deleting_a_datavolume_kills_its_in_place_qemu_img_convert_and_nbdkit(instance, hostile, tmp_path):
    raw = tmp_path / "disk.raw"
    with open(raw, "wb") as f:
        f.truncate(32 * MiB)
        f.seek(8 * MiB)
        f.write(os.urandom(2 * MiB))
    qcow2 = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)], check=True)
    extents = subprocess.run(["qemu-img", "map", "--output=json", str(qcow2)], check=True, capture_output=True, text=True)
    first_data = min(e["offset"] for e in __import__("json").loads(extents.stdout) if e.get("data"))
    server = hostile("ranged_trickle", image=qcow2.read_bytes(), fast=first_data)  # metadata at once, data crawls
    daemon = instance.proc.pid
    instance.apply(dv("inplace", f"    http:\n      url: {server.url}"))
    instance.wait(lambda: any("qemu-img convert" in c for c in descendants(daemon)), 30, "qemu-img converting in place")
    assert any("nbdkit" in c for c in descendants(daemon))
    lun = instance.lun_path("inplace")
    deleted = time.monotonic()
    instance.cli("delete", "dv", "inplace")
    instance.wait(lambda: not [c for c in descendants(daemon) if "qemu-img" in c or "nbdkit" in c], 5,
                  "qemu-img and nbdkit gone")
    assert time.monotonic() - deleted < 5
    instance.wait(lambda: released(instance, "inplace", lun), 10, "the volume released")
