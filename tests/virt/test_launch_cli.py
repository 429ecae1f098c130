"""`pvlun launch` and `pvlun launch-migrate` as real processes under TCG: the tick guest on a disk
file and on a loop device, its console on stdout, poweroff, live migration over 127.0.0.1 TCP,
the launcher Pod's capabilities, hostile VMIs."""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from host.sandbox import processes_below
from launch_process import ROOT, Launch, free_port, ticks
from virt.guest_images import build_tick_disk
from virt.pod_migration import ACCEPTED, HEADER
from virt.pods import BLOCK_DIR, LAUNCHER_CAPABILITIES


def vmi_file(path: Path, volume: str = "root", grace: int = 1, **domain) -> Path:
    obj = {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
           "metadata": {"name": "tick", "namespace": "default", "uid": "6f1a8a5e-1c47-4a3e-9a3b-0d6a1c2b3e4f"},
           "spec": {"domain": {"memory": {"guest": "64Mi"}, **domain,
                               "devices": {"disks": [{"name": volume, "disk": {"bus": "virtio"}}],
                                           "autoattachPodInterface": False}},
                    "volumes": [{"name": volume, "persistentVolumeClaim": {"claimName": "tick"}}],
                    "terminationGracePeriodSeconds": grace}}
    path.write_text(json.dumps(obj))
    return path


@pytest.fixture
def launches(tmp_path):
    made: list[Launch] = []

    def start(name: str, *args: str, prefix: list[str] = (), env: dict | None = None) -> Launch:
        made.append(Launch(tmp_path, name, list(args), prefix, env))
        return made[-1]

    yield start
    for launch in made:
        launch.stop()


@pytest.fixture
def disk(tick_disk, tmp_path) -> Path:
    copy = tmp_path / "root.img"
    copy.write_bytes(tick_disk.read_bytes())
    return copy


@pytest.fixture
def pod_block_device(disk):
    """The disk as a loop device, and a node of it where a launcher Pod has a Block claim
    (/dev/pvlun/<volume>); both gone afterwards."""
    volume = f"lp-{secrets.token_hex(4)}"
    loop = subprocess.run(["losetup", "--find", "--show", str(disk)], capture_output=True, text=True,
                          check=True).stdout.strip()
    node = Path(BLOCK_DIR, volume)
    made_dir = not Path(BLOCK_DIR).exists()
    try:
        Path(BLOCK_DIR).mkdir(mode=0o755, exist_ok=True)
        os.mknod(node, stat.S_IFBLK | 0o600, os.stat(loop).st_rdev)
        yield volume, loop
    finally:
        node.unlink(missing_ok=True)
        if made_dir:
            try:
                Path(BLOCK_DIR).rmdir()
            except OSError:
                pass
        subprocess.run(["losetup", "--detach", loop], check=False)


def launch_args(tmp_path: Path, run: str, vmi: Path, *extra: str) -> list[str]:
    return ["launch", "--vmi-file", str(vmi), "--run-dir", str(tmp_path / run), "--disk-dir",
            str(tmp_path / f"{run}-disks"), "--accel", "tcg", *extra]


def test_launch_runs_the_vmi_on_a_disk_file_with_its_console_on_stdout(launches, disk, tmp_path):
    vmi = vmi_file(tmp_path / "vmi.json")
    launch = launches("vm", *launch_args(tmp_path, "run", vmi, "--volume", f"root={disk}"))
    assert launch.wait_for("tick 3"), launch.stderr()
    assert "PVLUN-BOOT" in launch.stdout() and ticks(launch.stdout())[:3] == [1, 2, 3]
    assert stat.S_ISSOCK(os.stat(tmp_path / "run" / "qmp.sock").st_mode)  # QMP in the run directory
    assert stat.S_ISSOCK(os.stat(tmp_path / "run" / "launcher.sock").st_mode)
    assert {"event": "phase", "phase": "Running", "reason": "running"}.items() <= launch.events()[-1].items()
    launch.proc.send_signal(signal.SIGTERM)  # the Pod is deleted: the guest gets its grace period, then QEMU quits
    assert launch.proc.wait(15) == 0
    assert launch.events()[-1]["event"] == "exit" and launch.events()[-1]["phase"] == "Succeeded"
    assert not os.path.exists(tmp_path / "run" / "qmp.sock") and not os.path.exists(tmp_path / "run" / "launcher.sock")
    assert not processes_below(launch.proc.pid)


def test_a_guest_that_powers_off_ends_launch_with_0(launches, tmp_path):
    disk = build_tick_disk(tmp_path / "off.img", "PVLUN-OFF", poweroff_after=2)
    launch = launches("vm", *launch_args(tmp_path, "run", vmi_file(tmp_path / "vmi.json"), "--volume", f"root={disk}"))
    assert launch.proc.wait(20) == 0, launch.stderr()
    assert "PVLUN-OFF" in launch.stdout() and ticks(launch.stdout()) == [1, 2]
    assert launch.events()[-1] == {**launch.events()[-1], "phase": "Succeeded", "reason": "guest-shutdown", "code": 0}


def test_launch_finds_a_block_claim_where_the_pod_puts_it(pod_block_device, launches, tmp_path):
    volume, loop = pod_block_device
    launch = launches("vm", *launch_args(tmp_path, "run", vmi_file(tmp_path / "vmi.json", volume)))  # no --volume
    assert launch.wait_for("tick 2"), launch.stderr()
    qemu = [p for p in processes_below(launch.proc.pid) if Path(f"/proc/{p}/comm").read_text().strip() ==
            "qemu-system-x86"]
    assert qemu and f'"driver":"host_device","filename":"{BLOCK_DIR}/{volume}"' in \
        Path(f"/proc/{qemu[0]}/cmdline").read_bytes().decode()
    launch.stop()
    assert launch.proc.returncode == 0


def test_launch_runs_with_only_the_launcher_pods_capabilities(pod_block_device, launches, tmp_path):
    """The compute container's bounding set (virt/pods.py) is enough for a Block claim, and
    QEMU inside it still ends up with no capability at all; without SYS_ADMIN nothing starts."""
    volume, _ = pod_block_device
    vmi = vmi_file(tmp_path / "vmi.json", volume)
    caps = "-all," + ",".join(f"+{c.lower()}" for c in LAUNCHER_CAPABILITIES)
    launch = launches("vm", *launch_args(tmp_path, "run", vmi), prefix=["setpriv", f"--bounding-set={caps}", "--"])
    assert launch.wait_for("tick 2"), launch.stderr()
    qemu = [p for p in processes_below(launch.proc.pid) if Path(f"/proc/{p}/comm").read_text().strip() ==
            "qemu-system-x86"]
    status = Path(f"/proc/{qemu[0]}/status").read_text()
    assert re.search(r"CapBnd:\s+0+\n", status) and re.search(r"CapEff:\s+0+\n", status), status
    launch.stop()
    assert launch.proc.returncode == 0
    fewer = caps.replace(",+sys_admin", "")
    refused = launches("refused", *launch_args(tmp_path, "run2", vmi),
                       prefix=["setpriv", f"--bounding-set={fewer}", "--"])
    assert refused.proc.wait(20) == 1
    assert refused.stderr().splitlines()[-1].startswith("pvlun launch: QEMU failed to start: bwrap:")


def test_migration_between_two_launch_processes_over_tcp_keeps_the_guest_ticking(launches, disk, tmp_path):
    vmi = vmi_file(tmp_path / "vmi.json")
    token = tmp_path / "token"
    token.write_text(secrets.token_urlsafe(32) + "\n")
    port = free_port()
    source = launches("source", *launch_args(tmp_path, "src", vmi, "--volume", f"root={disk}"),
                      env={"NODE_NAME": "node-a"})
    target = launches("target", *launch_args(tmp_path, "dst", vmi, "--volume", f"root={disk}", "--incoming", str(port),
                                             "--listen-address", "127.0.0.1", "--token-file", str(token)))
    assert source.wait_for("tick 3"), source.stderr()
    deadline = time.monotonic() + 20
    while not any(e.get("phase") == "Migrating" for e in target.events()) and time.monotonic() < deadline:
        time.sleep(0.05)
    with socket.create_connection(("127.0.0.1", port)) as stranger:  # a wrong token never reaches QEMU
        stranger.sendall(HEADER + b"x" * 43 + b"\n" + os.urandom(4096))
        try:
            closed = stranger.recv(1) == b""
        except ConnectionResetError:  # closed on us with our bytes unread
            closed = True
        assert closed
    migrate = subprocess.run([sys.executable, "-m", "pvlun.cli", "launch-migrate", "--run-dir", str(tmp_path / "src"),
                              "--to", f"127.0.0.1:{port}", "--token-file", str(token)],
                             capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                             timeout=60)
    assert migrate.returncode == 0, migrate.stderr
    lines = migrate.stdout.splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert result["phase"] == "Succeeded" and result["qemuStatus"] == "completed" and result["error"] is None
    assert result["totalTimeMs"] > 0 and 0 <= result["downtimeMs"] < 1000 and result["dataRemaining"] == 0
    assert result["targetAddress"] == f"127.0.0.1:{port}" and result["sourceNode"] == "node-a"
    assert source.proc.wait(15) == 0  # the source launcher ends once the target has the guest
    assert source.events()[-1]["reason"] == "migrated"
    assert any("refused: wrong header or token" in e.get("message", "") for e in target.events())
    last = ticks(source.stdout())[-1]
    assert target.wait_for(f"tick {last + 3}"), target.stderr()
    carried_on = ticks(target.stdout())
    assert "PVLUN-BOOT" not in target.stdout()  # no reboot: the same guest, counting on
    assert carried_on[:3] == [last + 1, last + 2, last + 3]
    assert target.proc.poll() is None


def test_a_failed_migration_leaves_the_source_running(launches, disk, tmp_path):
    source = launches("source", *launch_args(tmp_path, "src", vmi_file(tmp_path / "vmi.json"), "--volume",
                                             f"root={disk}"))
    assert source.wait_for("tick 2"), source.stderr()
    migrate = subprocess.run([sys.executable, "-m", "pvlun.cli", "launch-migrate", "--run-dir", str(tmp_path / "src"),
                              "--to", f"127.0.0.1:{free_port()}"], capture_output=True, text=True, cwd=ROOT,
                             env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert migrate.returncode == 1
    result = json.loads(migrate.stdout)
    assert result["phase"] == "Failed" and "refused" in result["error"].lower()
    now = ticks(source.stdout())[-1]
    assert source.wait_for(f"tick {now + 2}") and source.proc.poll() is None


@pytest.mark.parametrize("hostile, said", [
    ({"machine": {"type": "q35,kernel=/etc/shadow"}},
     "pvlun launch: spec.domain.machine.type: 'q35,kernel=/etc/shadow' is not a machine type"),
    ({"firmware": {"serial": "x,kernel=/etc/shadow"}}, "pvlun launch: spec.domain.firmware.serial:"),
])
def test_a_hostile_vmi_is_one_line_and_exit_1(hostile, said, disk, tmp_path):
    vmi = vmi_file(tmp_path / "vmi.json", **hostile)
    done = subprocess.run([sys.executable, "-m", "pvlun.cli", *launch_args(tmp_path, "run", vmi, "--volume",
                                                                           f"root={disk}")],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          timeout=30)
    assert done.returncode == 1 and done.stdout == ""
    assert len(done.stderr.splitlines()) == 1 and done.stderr.startswith(said), done.stderr
    assert not (tmp_path / "run").exists()  # nothing ran


def test_unreadable_vmi_files_are_one_line(tmp_path):
    deep, big = tmp_path / "deep.json", tmp_path / "big.json"
    deep.write_text("[" * 100_000)
    big.write_text(json.dumps({"x": "y" * (200 << 10)}))
    unknown = vmi_file(tmp_path / "vmi.json")
    for args, said in [(["--vmi-file", str(deep)], "not a JSON VirtualMachineInstance"),
                       (["--vmi-file", str(big)], "the VMI is larger than 131072 bytes"),
                       (["--vmi-file", str(unknown), "--volume", "other=/dev/null"],
                        "--volume other: the VMI has no dataVolume or persistentVolumeClaim volume"),
                       (["--vmi-file", str(unknown), "--volume", "root=/nowhere/disk.img"],
                        "volume root (claim tick): nothing at /nowhere/disk.img")]:
        done = subprocess.run([sys.executable, "-m", "pvlun.cli", "launch", "--run-dir", str(tmp_path / "run"),
                               "--accel", "tcg", *args], capture_output=True, text=True, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=30)
        assert done.returncode == 1 and len(done.stderr.splitlines()) == 1 and said in done.stderr, done.stderr


def test_a_migration_in_flight_is_cancelled_and_the_source_runs_on(launches, disk, tmp_path):
    """`launch-migrate --cancel` (what the controller runs when a migration is deleted): the
    source QEMU aborts the stream to a target that takes nothing, and runs on."""
    source = launches("source", *launch_args(tmp_path, "src", vmi_file(tmp_path / "vmi.json"), "--volume",
                                             f"root={disk}"))
    assert source.wait_for("tick 2"), source.stderr()
    idle = socket.create_server(("127.0.0.1", 0))  # takes the stream, never reads it: the stream stalls
    cli = [sys.executable, "-m", "pvlun.cli", "launch-migrate", "--run-dir", str(tmp_path / "src")]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    nothing = subprocess.run(cli + ["--cancel"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=30)
    assert (nothing.returncode, json.loads(nothing.stdout)) == (1, {"cancelled": False})
    with idle:
        migrating = subprocess.Popen(cli + ["--to", f"127.0.0.1:{idle.getsockname()[1]}"], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
        try:
            conn, _ = idle.accept()
            with conn:
                conn.sendall(ACCEPTED)  # then nothing is read
                time.sleep(1.0)
                assert migrating.poll() is None  # stalled, not finished
                cancel = subprocess.run(cli + ["--cancel"], capture_output=True, text=True, cwd=ROOT, env=env,
                                        timeout=30)
                assert (cancel.returncode, json.loads(cancel.stdout)) == (0, {"cancelled": True}), cancel.stderr
                out, err = migrating.communicate(timeout=30)
        finally:
            if migrating.poll() is None:
                migrating.kill()
                migrating.wait()
    result = json.loads(out)
    assert migrating.returncode == 1 and result["phase"] == "Failed" and "cancelled" in result["error"], err
    now = ticks(source.stdout())[-1]
    assert source.wait_for(f"tick {now + 2}") and source.proc.poll() is None
