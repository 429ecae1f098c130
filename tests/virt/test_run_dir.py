"""A compromised QEMU finds nothing of root's to redirect: its run directory (serial log,
stderr, firmware variables, emptyDisks, seeds, sockets, the console offset) is root's and not
even in its mount namespace, so the links it would plant there (to a root-only victim, to the
pool image) cannot be made — neither inside its namespace nor as its user on the host. A run
directory an older pvlun handed to the sandbox user, links and all, is made anew on restart
without following one: the victim and the pool keep owner, mode and bytes, and QEMU's stderr
and the console history never show the victim's text."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

from virt.console_history import ConsoleHistory
from virt.local_volumes import local_attachments
from virt.qemu_args import DiskAttachment
from controlplane.vm_spec import parse_virtual_machine

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
VICTIM = b"VICTIM: root's own file\n"
# every name root opens (or a follower reads) in a run directory, and what a hostile QEMU would link it to
PLANTED = {"qemu.stderr": "victim", "serial.log": "victim", "serial.offset": "offset", "OVMF_VARS.fd": "victim",
           "data.empty.img": "pool", "cidata.cidata.iso": "victim", "cidata.cidata.iso.part": "victim",
           "data.empty.img.part": "pool", "qmp.sock": "victim", "console.sock": "victim", "passt.log": "victim",
           "org.qemu.guest_agent.0": "victim"}


def private_file(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    path.chmod(0o600)
    return path


def as_before(path: Path, data: bytes) -> bool:
    st = os.lstat(path)
    return (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o600) and path.read_bytes() == data


def test_a_compromised_qemu_cannot_redirect_what_root_opens_in_its_run_dir(launchers, manifest, tick_disk, tmp_path):
    victim = private_file(tmp_path / "victim", VICTIM)
    pool_bytes = os.urandom(1 << 20)
    pool = private_file(tmp_path / "pool.img", pool_bytes)
    offset = tmp_path / "offset"
    offset.write_text("0")
    targets = {"victim": victim, "pool": pool, "offset": offset}
    spec = parse_virtual_machine(manifest(
        "evil", disks=[{"name": "root", "disk": {}, "bootOrder": 1}, {"name": "data", "disk": {}},
                       {"name": "cidata", "disk": {}}],
        volumes=[{"name": "root", "persistentVolumeClaim": {"claimName": "r"}},
                 {"name": "data", "emptyDisk": {"capacity": "1Mi"}},
                 {"name": "cidata", "cloudInitNoCloud": {"userData": "#cloud-config\n"}}],
        firmware={"bootloader": {"efi": {"secureBoot": False}}})).template
    run = tmp_path / "vms" / "default" / "evil" / "node-a"
    root = tmp_path / "root.img"
    root.write_bytes(tick_disk.read_bytes())
    history = ConsoleHistory(tmp_path / "console.log")

    def start():
        disks = {**local_attachments(spec, run), "root": DiskAttachment.for_path(str(root))}
        vm = launchers(spec, disks, run, console=True, history=history)
        vm.start()
        return vm

    vm = start()
    assert stat.S_IMODE(os.lstat(run).st_mode) == 0o700 and os.lstat(run).st_uid == 0
    for name, target in PLANTED.items():
        inside = subprocess.run(["nsenter", "-t", str(vm.pid), "-m", "-S", "65534", "-G", "65534", "--",
                                 "ln", "-sf", str(targets[target]), str(run / name)], capture_output=True, text=True)
        assert inside.returncode != 0, f"QEMU could link {name} in its mount namespace"
        outside = subprocess.run([*NOBODY, "ln", "-sf", str(targets[target]), str(run / name)],
                                 capture_output=True, text=True)
        assert outside.returncode != 0, f"QEMU's user could link {name} on the host"
    vm.kill()  # kill -9: the next start reuses the run dir

    # the run dir as an older pvlun left it: the sandbox user's, with links in every place
    os.chown(run, 65534, 65534)
    for name in PLANTED:
        if os.path.lexists(run / name):
            os.unlink(run / name)
    for name, target in PLANTED.items():  # as QEMU made them inside its namespace
        os.symlink(targets[target], run / name)
        os.lchown(run / name, 65534, 65534)
    again = start()
    assert again.running()
    again.take_over_console()
    again.kill()
    assert as_before(victim, VICTIM) and as_before(pool, pool_bytes)
    st = os.lstat(run)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o700)
    empty = os.lstat(run / "data.empty.img")
    assert stat.S_ISREG(empty.st_mode) and empty.st_size == 1 << 20
    assert b"VICTIM" not in history.read() and "VICTIM" not in again.stderr_text()
    assert "VICTIM" not in again.reason


def test_sockets_of_a_long_run_dir_are_where_no_local_user_can_reach_first(launchers, make_tick_vm, tick_copy,
                                                                           tmp_path):
    run = tmp_path / ("very-long-directory-name-" * 5) / "vms" / "default" / "tick" / "node-a"
    # a local user prepares the predictable place an older pvlun put such sockets in
    digest = hashlib.sha256(str(run.resolve()).encode()).hexdigest()[:16]
    shared = Path(tempfile.gettempdir(), "pvlun-sockets")
    made = not shared.exists()
    prepared = shared / digest
    prepared.mkdir(parents=True, exist_ok=True)
    for path in (shared, prepared) if made else (prepared,):
        os.chown(path, 65534, 65534)
        path.chmod(0o777)
    try:
        vm = launchers(make_tick_vm(), tick_copy, run, console=True)
        vm.start()
        assert vm.wait_for_serial("PVLUN-BOOT", timeout=15)
        for sock in (vm.qmp_path, vm.console_path):
            assert len(sock) < 108 and stat.S_ISSOCK(os.lstat(sock).st_mode)
            for directory in Path(sock).parents:  # nobody but root may change any directory above it
                st = os.lstat(directory)
                assert st.st_uid == 0 and not st.st_mode & 0o022, (sock, str(directory))
            assert (run / os.path.basename(sock)).is_symlink()  # `pvlun console` finds it in the run dir
        vm.stop(grace=0)
        assert not os.path.lexists(vm.qmp_path)
    finally:
        shutil.rmtree(shared if made else prepared, ignore_errors=True)
