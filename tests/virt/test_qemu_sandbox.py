"""A running QEMU sees nothing of the host but what its VM needs: looked at from the host,
through /proc/<QEMU's pid>, while the tick guest boots, pauses and resumes under it."""

from __future__ import annotations

import os
import re
import subprocess

from host.sandbox import Sandbox, sandbox_ids
from virt.qemu_args import DiskAttachment, Throttle, SECCOMP
from controlplane.vm_spec import parse_virtual_machine


def alive(pid: int) -> bool:
    """A process that exists and is not a zombie."""
    try:
        return status_fields(pid)["State"].split()[0] != "Z"
    except FileNotFoundError:
        return False


def status_fields(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.split(":", 1) for line in f.read().splitlines() if ":" in line)


def test_qemu_runs_unprivileged_with_seccomp_and_sees_only_its_own_volumes(launchers, manifest, tick_disk, tmp_path):
    # two VMs' worth of volumes on the host, and a root-only secret beside them
    secret = tmp_path / "secret"
    secret.write_text("host secret\n")
    secret.chmod(0o600)
    mine, other = tmp_path / "mine.img", tmp_path / "other.img"
    for disk in (mine, other):
        disk.write_bytes(tick_disk.read_bytes())
    obj = manifest(disks=[{"name": "root", "disk": {}, "bootOrder": 1}],
                   volumes=[{"name": "root", "persistentVolumeClaim": {"claimName": "r"}},
                            {"name": "scratch", "emptyDisk": {"capacity": "1Mi"}}],
                   machine={"type": ""})  # KubeVirt's examples: empty means the default
    spec = parse_virtual_machine(obj).template
    from virt.local_volumes import local_attachments

    run = tmp_path / "run"
    disks = {**local_attachments(spec, run), "root": DiskAttachment.for_path(str(mine), throttle=Throttle())}
    before = mine.stat()
    vm = launchers(spec, disks, run)
    vm.start()
    assert vm.wait_for_serial("PVLUN-BOOT", timeout=15)
    pid = vm.pid
    assert mine.stat().st_uid == 0  # never handed to the sandbox user: QEMU got it open
    assert pid is not None and pid != vm.proc.pid
    root = f"/proc/{pid}/root"

    # who it runs as, and what it may do
    fields = status_fields(pid)
    uid, gid = sandbox_ids()
    assert fields["Uid"].split() == [str(uid)] * 4 and fields["Gid"].split() == [str(gid)] * 4
    assert fields["CapEff"].strip() == fields["CapPrm"].strip() == "0000000000000000"
    assert fields["NoNewPrivs"].strip() == "1" and fields["Seccomp"].strip() == "2"  # -sandbox's filter
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        argv = f.read().split(b"\0")
    assert argv[argv.index(b"-sandbox") + 1].decode() == SECCOMP == \
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"

    # what its mount namespace holds: /usr and nothing of the host's files, not even its own
    # volumes or run dir (it holds them open), nor the host's network
    for absent in ("/etc", "/root", "/home", "/var/lib", str(secret), str(other), str(mine), str(run),
                   "/dev/kvm", "/dev/sda", "/dev/loop0"):
        assert not os.path.lexists(root + absent), absent
    assert set(os.listdir(root)) == {"bin", "dev", "lib", "lib64", "proc", "sbin", "tmp", "usr"}
    held = {os.path.realpath(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
    assert {str(mine), str(run / "serial.log"), str(run / "scratch.empty.img")} <= held
    assert os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")

    # QMP, the console and the machine all work from inside: pause, resume, the default machine type
    assert vm.execute("qom-get", {"path": "/machine", "property": "type"}) == "pc-q35-7.2-machine"
    vm.pause()
    vm.unpause()
    assert vm.wait_for_serial("tick 3", timeout=10)
    assert secret.read_text() == "host secret\n" and other.read_bytes() == tick_disk.read_bytes()
    vm.kill()
    assert not alive(pid)
    assert "exited -9" in vm.reason
    after = mine.stat()  # given back as it was
    assert (after.st_uid, after.st_gid, after.st_mode) == (before.st_uid, before.st_gid, before.st_mode)


def test_a_published_block_device_is_a_private_node_the_host_node_keeps_its_owner(launchers, make_tick_vm,
                                                                                   tick_disk, tmp_path):
    copy = tmp_path / "root.img"
    copy.write_bytes(tick_disk.read_bytes())
    loop = subprocess.run(["losetup", "--find", "--show", str(copy)], capture_output=True, text=True,
                          check=True).stdout.strip()
    try:
        before = os.stat(loop)
        vm = launchers(make_tick_vm(), {"root": DiskAttachment.for_path(loop)}, tmp_path / "run")
        vm.start()
        assert vm.wait_for_serial("PVLUN-BOOT", timeout=15)
        inside = os.stat(f"/proc/{vm.pid}/root{loop}")
        assert (inside.st_rdev, inside.st_uid) == (before.st_rdev, sandbox_ids()[0])
        # the private node lives only in QEMU's namespace: nothing of it is left on the host (nor after a crash)
        with open(f"/proc/{vm.pid}/mountinfo") as f:
            (mount,) = [line.split() for line in f if line.split()[4] == loop]
        assert mount[3].startswith("/.pvlun-sandbox/") and mount[3].endswith("//deleted")
        assert vm.wait_for_serial("tick 2", timeout=10)
        others = [d for d in os.listdir(f"/proc/{vm.pid}/root/dev") if re.fullmatch(r"loop\d+", d)]
        assert others == [os.path.basename(loop)]
        after = os.stat(loop)
        assert (after.st_uid, after.st_mode) == (before.st_uid, before.st_mode)
        vm.stop(grace=0)
    finally:
        subprocess.run(["losetup", "-d", loop], check=False)


def test_kvm_is_handed_over_as_a_private_character_device(tmp_path):
    """What a KVM QEMU gets: /dev/kvm usable by the sandbox user (here: its API version ioctl)."""
    probe = "import fcntl, os; print(fcntl.ioctl(os.open('/dev/kvm', os.O_RDWR), 0xAE00))"
    assert os.path.exists("/dev/kvm"), "this host has no /dev/kvm to hand over"
    before = os.stat("/dev/kvm")
    with Sandbox() as box:
        without = subprocess.run(box.wrap(["python3", "-c", probe]), capture_output=True, text=True, timeout=30)
    with Sandbox(devices=["/dev/kvm"]) as box:
        given = subprocess.run(box.wrap(["python3", "-c", probe]), capture_output=True, text=True, timeout=30)
    assert without.returncode != 0 and "No such file" in without.stderr
    assert given.returncode == 0 and given.stdout.strip() == "12", given.stderr  # KVM_API_VERSION
    after = os.stat("/dev/kvm")
    assert (after.st_uid, after.st_gid, after.st_mode) == (before.st_uid, before.st_gid, before.st_mode)


def test_a_read_only_file_volume_is_inherited_open_never_bound_nor_handed_over(launchers, manifest, tick_disk,
                                                                                 tmp_path):
    """A read-only Filesystem claim's disk.img may be root's 0600 file on a read-only mount:
    QEMU gets it already open for reading, so it boots from it and can never write it."""
    image = tmp_path / "disk.img"
    image.write_bytes(tick_disk.read_bytes())
    image.chmod(0o600)
    spec = parse_virtual_machine(manifest(disks=[{"name": "root", "disk": {}, "bootOrder": 1}],
                                          volumes=[{"name": "root", "persistentVolumeClaim": {
                                              "claimName": "r", "readOnly": True}}])).template
    vm = launchers(spec, {"root": DiskAttachment.for_path(str(image), readonly=True)}, tmp_path / "run")
    vm.start()
    assert vm.wait_for_serial("PVLUN-BOOT", timeout=15)
    node = next(n for n in vm.execute("query-named-block-nodes") if n["node-name"] == "file-root")
    assert node["ro"] is True and node["file"].startswith("/dev/fdset/")
    assert not os.path.exists(f"/proc/{vm.pid}/root{image}")
    fds = [fd for fd in os.listdir(f"/proc/{vm.pid}/fd") if os.path.realpath(f"/proc/{vm.pid}/fd/{fd}") == str(image)]
    assert fds
    for fd in fds:
        with open(f"/proc/{vm.pid}/fdinfo/{fd}") as f:
            flags = int(next(line for line in f if line.startswith("flags:")).split()[1], 8)
        assert flags & os.O_ACCMODE == os.O_RDONLY
    st = image.stat()
    assert (st.st_uid, st.st_mode & 0o777) == (0, 0o600) and image.read_bytes() == tick_disk.read_bytes()
