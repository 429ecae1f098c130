"""The sandbox untrusted tools run in: nothing of the host but what they are handed."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from host.command import CommandError, run
from host.sandbox import TOOLS_ONLY, Sandbox, give, lent, open_as_sandbox_user, prepare_dir, sandbox_ids


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


@pytest.fixture
def reachable():
    """A directory every user may enter (pytest's temporary directories are private)."""
    path = tempfile.mkdtemp(prefix="pvlun-test-reachable-")
    os.chmod(path, 0o711)
    yield Path(path)
    shutil.rmtree(path)


def test_open_as_the_sandbox_user_checks_every_directory_on_the_way(reachable):
    public = reachable / "public"
    public.mkdir(mode=0o700)
    (public / "f").write_text("data\n")
    os.chmod(public / "f", 0o644)
    with pytest.raises(PermissionError):
        open_as_sandbox_user(str(public / "f"))  # a world-readable file in a directory only root may enter
    os.chmod(public, 0o711)
    fd = open_as_sandbox_user(str(public / "f"))
    try:
        assert os.read(fd, 100) == b"data\n"
    finally:
        os.close(fd)
    os.chmod(public / "f", 0o600)
    with pytest.raises(PermissionError):
        open_as_sandbox_user(str(public / "f"))
    with pytest.raises(FileNotFoundError):
        open_as_sandbox_user(str(public / "missing"))


def test_an_open_file_handed_over_is_the_one_opened_whatever_its_path_names_later(tmp_path, canary):
    path = tmp_path / "image"
    path.write_text("checked\n")
    fd = os.open(path, os.O_RDONLY)
    try:
        os.rename(path, tmp_path / "moved-away")
        os.symlink(canary, path)
        with Sandbox(files={"/source/image": fd}) as box:
            proc = subprocess.run(box.wrap(["cat", "/source/image"]), capture_output=True, timeout=30, pass_fds=(fd,))
    finally:
        os.close(fd)
    assert proc.stdout == b"checked\n"


def test_lending_a_link_is_refused_and_the_file_it_names_keeps_its_owner(tmp_path, canary):
    link = tmp_path / "disk.img"
    os.symlink(canary, link)
    with pytest.raises(OSError):
        with lent(str(link)):
            pass
    st = os.stat(canary)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o600)


def test_tools_only_sandbox_runs_tools_but_holds_no_public_files_of_usr_share():
    assert os.path.isfile("/usr/share/common-licenses/GPL-3")
    with Sandbox(system=TOOLS_ONLY) as box:
        proc = _sh(box, "qemu-img --version >/dev/null && echo tools-run; cat /usr/share/common-licenses/GPL-3")
    assert proc.stdout == b"tools-run\n" and b"No such file" in proc.stderr
