"""The sandbox untrusted tools run in: nothing of the host but what they are handed."""

from __future__ import annotations

import os
import socket
import stat
import subprocess

import pytest

from pvlun.command import CommandError, run
from pvlun.sandbox import Sandbox, give, prepare_dir, sandbox_ids


def _sh(box: Sandbox, script: str) -> subprocess.CompletedProcess[bytes]:
    return run(box.wrap(["sh", "-c", script]), check=False, timeout=30)


@pytest.fixture
def canary(tmp_path):
    path = tmp_path / "canary"
    path.write_text("host secret\n")
    os.chmod(path, 0o600)
    return str(path)


def test_runs_as_nobody_without_capabilities():
    with Sandbox() as box:
        proc = _sh(box, "id -u; id -g; id -G; grep CapEff /proc/self/status; grep NoNewPrivs /proc/self/status")
    lines = proc.stdout.decode().split("\n")
    uid, gid = sandbox_ids()
    assert lines[0] == str(uid) and lines[1] == str(gid) and lines[2] == str(gid)
    assert lines[3].split() == ["CapEff:", "0000000000000000"]
    assert lines[4].split() == ["NoNewPrivs:", "1"]


def test_host_files_not_handed_over_do_not_exist(canary):
    with Sandbox() as box:
        proc = _sh(box, f"cat /etc/shadow; cat /etc/passwd; cat {canary}; ls /root /var /home /etc 2>&1")
    assert proc.returncode != 0
    assert b"host secret" not in proc.stdout and b"root:" not in proc.stdout
    assert b"No such file" in proc.stderr


def test_handed_over_root_only_file_stays_unreadable_until_given(tmp_path, canary):
    with Sandbox(read_only=[canary]) as box:
        denied = _sh(box, f"cat {canary}")
    assert denied.returncode != 0 and b"Permission denied" in denied.stderr
    give(canary)
    with Sandbox(read_only=[canary]) as box:
        allowed = _sh(box, f"cat {canary}; echo x > {canary}")
    assert allowed.stdout == b"host secret\n"
    assert b"Read-only file system" in allowed.stderr
    assert open(canary).read() == "host secret\n"


def test_writable_directory_and_block_device(tmp_path):
    work = prepare_dir(str(tmp_path), "box-")
    backing = tmp_path / "disk.raw"
    backing.write_bytes(bytes(1 << 20))
    device = run(["losetup", "--find", "--show", str(backing)]).stdout.decode().strip()
    try:
        before = os.stat(device)
        with Sandbox(writable=[work], devices=[device]) as box:
            proc = _sh(box, f"printf marker > {work}/out && printf blockdata | dd of={device} conv=notrunc status=none")
            node_dir = box._node_dir
        assert proc.returncode == 0, proc.stderr
        after = os.stat(device)
        assert (after.st_uid, after.st_gid, stat.S_IMODE(after.st_mode)) == (
            before.st_uid, before.st_gid, stat.S_IMODE(before.st_mode))
        assert node_dir is not None and not os.path.exists(node_dir)
    finally:
        run(["losetup", "-d", device])
    assert open(os.path.join(work, "out")).read() == "marker"
    assert backing.read_bytes()[:9] == b"blockdata"


def test_network_only_when_asked():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    port = listener.getsockname()[1]
    probe = f"exec 3<>/dev/tcp/127.0.0.1/{port} && echo connected"
    try:
        with Sandbox() as box:
            offline = run(box.wrap(["bash", "-c", probe]), check=False, timeout=30)
        with Sandbox(network=True) as box:
            online = run(box.wrap(["bash", "-c", probe]), check=False, timeout=30)
    finally:
        listener.close()
    assert b"connected" not in offline.stdout and offline.returncode != 0
    assert online.stdout == b"connected\n"


def test_a_tool_failing_inside_reports_its_own_stderr(tmp_path):
    with Sandbox() as box, pytest.raises(CommandError) as err:
        run(box.wrap(["qemu-img", "info", str(tmp_path / "missing.qcow2")]))
    assert "missing.qcow2" in err.value.stderr and "No such file" in err.value.stderr
