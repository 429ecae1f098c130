"""`pvlun serve` killed with -9 in the middle of an upload and while a VM runs, then started
again on the same data dir: the upload starts over on a fresh volume that reads as zeros (the
next upload holds exactly its own bytes), the orphaned QEMU is gone, attachments agree with the
driver's publications, and the VM runs again as its runStrategy says, its console history holding
all the orphan printed before it was stopped."""

from __future__ import annotations

import os
import socket
import sqlite3
import ssl
import subprocess
import time

from guest_output import MARKER, alive, ticks
from test_datavolume import dv, start_upload, upload_ready
from test_restart import kill9

MiB = 1 << 20


def loop_devices(path: str) -> list[str]:
    out = subprocess.run(["losetup", "-j", path], capture_output=True, text=True, check=True).stdout
    return [line.split(":", 1)[0] for line in out.splitlines()]


def publications(data_dir: str) -> set[tuple[str, str]]:
    """(volume, node) pairs the CSI driver's catalog says are published."""
    with sqlite3.connect(f"file:{os.path.join(data_dir, 'catalog.db')}?mode=ro", uri=True) as db:
        return set(db.execute("SELECT volume_id, node_id FROM publications").fetchall())


def read_volume(path: str, size: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(size)


def test_upload_cut_off_by_a_daemon_kill_starts_over_on_a_fresh_volume_that_reads_as_zeros(serve, tmp_path):
    from importer.upload_gateway import endpoint, mint_token

    data_dir = str(tmp_path / "upload")
    os.makedirs(data_dir)
    first = serve(data_dir=data_dir)
    first.apply(dv("phoenix-up", "    upload: {}", size="32Mi"))
    first.wait(lambda: (first.get("DataVolume", "phoenix-up").get("status") or {}).get("phase") == "UploadReady",
               what="UploadReady")
    old_lun = first.lun_path("phoenix-up")
    image1 = os.urandom(16 * MiB)
    url, ca = endpoint(data_dir)
    host, port = url.removeprefix("https://").split(":")
    tls = ssl.create_default_context(cafile=ca)
    conn = tls.wrap_socket(socket.create_connection((host, int(port))), server_hostname=host)
    conn.sendall((f"PUT /v1beta1/upload HTTP/1.1\r\nHost: {host}\r\n"
                  f"Authorization: Bearer {mint_token(data_dir, 'default', 'phoenix-up')}\r\n"
                  f"Content-Length: {len(image1)}\r\n\r\n").encode() + image1[:12 * MiB])
    # the first image's bytes are on the volume (read through its loop device) when the daemon dies
    first.wait(lambda: any(read_volume(dev, 4 * MiB) == image1[:4 * MiB] for dev in loop_devices(old_lun)), 30,
               "the first upload's bytes on the volume")
    kill9(first)
    conn.close()
    second = serve(data_dir=data_dir)
    second.wait(lambda: second.get("DataVolume", "phoenix-up")["status"].get("phase") == "UploadReady"
                and second.get("DataVolume", "phoenix-up")["status"].get("restartCount") == 1, 30,
                "UploadReady again, on a fresh volume")
    new_lun = second.lun_path("phoenix-up")
    assert new_lun != old_lun and not os.path.exists(old_lun)
    assert read_volume(new_lun, 32 * MiB) == bytes(32 * MiB)
    assert "UploadRestarted" in second.cli("describe", "dv", "phoenix-up").stdout
    image2 = os.urandom(MiB) + bytes(15 * MiB)  # zeros where the first image had data: none of it may show
    path = tmp_path / "image2.raw"
    path.write_bytes(image2)
    assert "complete" in second.cli("image-upload", "--dv", "phoenix-up", "--image-path", str(path)).stdout
    assert read_volume(second.lun_path("phoenix-up"), 32 * MiB) == image2 + bytes(16 * MiB)
    assert second.store.list("VolumeAttachment") == []


def test_scratch_copy_of_a_qcow2_upload_cut_off_by_a_daemon_kill_is_removed_at_the_next_start(serve, tmp_path):
    """A qcow2 upload is downloaded to scratch before it is converted: killed mid-way, the daemon
    cannot remove the copy; the next start does, and leaves what is not pvlun's alone."""
    data_dir = str(tmp_path / "scratchy")
    os.makedirs(data_dir)
    first = serve(data_dir=data_dir)
    scratch = os.path.join(data_dir, "scratch")
    with open(os.path.join(scratch, "operator-notes"), "w") as f:
        f.write("not pvlun's\n")
    first.apply(dv("scratchy", "    upload: {}", size="64Mi"))
    upload_ready(first, "scratchy")
    raw, image = tmp_path / "disk.raw", tmp_path / "disk.qcow2"
    raw.write_bytes(os.urandom(24 * MiB))
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(image)], check=True)
    body = image.read_bytes()
    conn = start_upload(first, "scratchy", len(body), body[:16 * MiB])

    def copies() -> list[str]:
        return [name for name in os.listdir(scratch) if name.startswith("pvlun-scratch-")]

    first.wait(lambda: any(os.path.getsize(os.path.join(scratch, d, "image")) >= 8 * MiB
                           for d in copies() if os.path.exists(os.path.join(scratch, d, "image"))), 30,
               "the upload's scratch copy growing")
    kill9(first)
    conn.close()
    assert copies(), "the killed daemon left its scratch copy"
    second = serve(data_dir=data_dir)
    second.wait(lambda: second.get("DataVolume", "scratchy")["status"].get("restartCount") == 1, 30,
                "the start-up repair")
    assert copies() == [] and os.listdir(scratch) == ["operator-notes"]
    with open(os.path.join(scratch, "operator-notes")) as f:
        assert f.read() == "not pvlun's\n"


def test_vm_after_a_daemon_kill_runs_again_with_consistent_attachments_and_a_whole_console_history(
        serve, tmp_path, tick_image, tick_vm_yaml):
    data_dir = str(tmp_path / "vm")
    os.makedirs(data_dir)
    first = serve("--nodes", "2", "--accel", "tcg", data_dir=data_dir)
    first.apply(tick_vm_yaml("phoenix", tick_image), "--wait")
    first.wait(lambda: MARKER in first.all_serial_logs("phoenix"), 30, "first boot")
    old_pid = first.qemu_pid("phoenix")
    node = first.vmi_status("phoenix")["nodeName"]
    lun = first.lun_path("phoenix-root")
    kill9(first)
    assert alive(old_pid)  # QEMU outlives the daemon, as a pod would outlive a controller crash
    time.sleep(1.5)  # it goes on printing while no daemon copies its console
    second = serve("--nodes", "2", "--accel", "tcg", data_dir=data_dir)
    second.wait(lambda: not alive(old_pid), 15, "the orphaned QEMU stopped")
    second.wait(lambda: second.all_serial_logs("phoenix").count(MARKER) == 2, 30, "the VM booted again (Always)")
    # the console history has all the first run printed, also what it printed while no daemon ran
    last = ticks(second.serial_log("phoenix", node).split(MARKER)[1])[-1]
    history = second.cli("logs", "vm/phoenix").stdout.split(MARKER)
    assert ticks(history[1])[-1] == last and len(history) == 3, history[1][-200:]
    new_pid = second.qemu_pid("phoenix")
    assert new_pid != old_pid and alive(new_pid)
    second.wait_printable("phoenix", "Running", 15)
    [att] = second.store.list("VolumeAttachment")  # the VM's, once: the old run's was undone
    assert att["spec"]["owner"] == "vm/default/phoenix"
    assert publications(data_dir) == {(att["spec"]["volumeId"], att["spec"]["nodeName"])}
    assert len(loop_devices(lun)) == 1
    second.cli("vm", "stop", "phoenix", "--wait")
    assert second.attachments("phoenix") == [] and publications(data_dir) == set()
    second.wait(lambda: loop_devices(lun) == [], 10, "the volume's loop device detached")


def loop_backings() -> dict[str, str]:
    """/dev/loopN → its backing file as the kernel shows it (read from sysfs: fast enough to
    catch a device between its attach and its mount)."""
    found = {}
    for name in os.listdir("/sys/block"):
        try:
            with open(f"/sys/block/{name}/loop/backing_file") as f:
                found["/dev/" + name] = f.read().strip()
        except OSError:
            continue
    return found


def test_a_stage_cut_off_by_a_daemon_kill_leaves_no_loop_device_or_mount_behind(serve, tmp_path):
    """kill -9 while a 4Gi blank Filesystem volume is being staged (its loop device attached,
    mkfs running, no mount yet): the import is redone after the restart, and start-up repair
    releases the device, which no NodeUnstageVolume finds and whose LUN file is deleted with
    the restarted import's claim. A stage left mounted is undone too."""
    import signal
    import threading
    import time

    data_dir = str(tmp_path / "stage")
    os.makedirs(data_dir)
    first = serve("--nodes", "1", data_dir=data_dir)
    volumes = os.path.join(os.path.realpath(data_dir), "pool", "volumes") + "/"
    # watched from before the apply (the daemon may attach, format and detach the volume in
    # tens of milliseconds, before the apply command has even exited): the first LUN attached
    # is the import's, and the daemon is frozen the moment it shows (between the attach and
    # the mount, or just after)
    attached: list[str] = []

    def watch() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            attached.extend(b for b in loop_backings().values() if b.startswith(volumes))
            if attached:
                first.proc.send_signal(signal.SIGSTOP)
                return
            time.sleep(0.001)

    watcher = threading.Thread(target=watch)
    watcher.start()
    first.apply(dv("formatting", "    blank: {}", size="4Gi", mode="Filesystem"))
    watcher.join()
    assert attached, "the volume was never attached"
    old_volume = os.path.basename(attached[0]).split(".img")[0]
    kill9(first)

    # and a stage that got as far as its mount, of a volume published nowhere (a crash after
    # ControllerUnpublish's record went, before the node's unmount): made by hand
    first.store.close()
    leftover = os.path.join(data_dir, "pool", "volumes", "vol-" + "e" * 32 + ".img")
    with open(leftover, "wb") as f:
        f.truncate(64 * MiB)
    subprocess.run(["mkfs.ext4", "-q", leftover], check=True)
    staging = os.path.join(data_dir, "nodes", "leftover-staging")
    os.makedirs(staging)
    device = subprocess.run(["losetup", "--find", "--show", leftover], capture_output=True, text=True,
                            check=True).stdout.strip()
    subprocess.run(["mount", device, staging], check=True)

    second = serve("--nodes", "1", data_dir=data_dir)
    second.wait(lambda: (second.get("DataVolume", "formatting").get("status") or {}).get("phase") == "Succeeded",
                120, "the import redone")
    assert second.get("DataVolume", "formatting")["status"].get("restartCount") == 1
    assert old_volume not in second.lun_path("formatting")
    assert not [dev for dev, backing in loop_backings().items() if old_volume in backing or leftover in backing]
    assert not os.path.ismount(staging)
    with open(os.path.join(data_dir, "serve.log")) as f:
        assert "released" in f.read()
    from pvlun.local_run import stop_daemon

    stop_daemon(second.proc, data_dir)
    with open(os.path.join(data_dir, "serve.log")) as f:
        log = f.read()
    assert "pool stays mounted" not in log, log[-2000:]
    assert [b for b in loop_backings().values() if data_dir in b] == []
