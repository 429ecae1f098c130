"""`pvlun launch-freeze` against a real guest agent (the linux test guest's qemu-ga), as the
controller runs it in a launcher Pod for a VM snapshot on a cluster: the launcher's order
socket freezes the guest's filesystems through the agent, `--thaw` thaws them, and a freeze
nobody thaws is undone by the launcher itself at its unfreeze timeout."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from kube_fixtures import wait_until
from test_guest_agent import agent_boot_disk, run_agent_vm, runtime  # noqa: F401 - fixtures
from virt.pod_freeze import read_freeze
from virt.pod_migration import ControlServer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def launch_freeze(run_dir: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pvlun.cli", "launch-freeze", "--run-dir", run_dir, *args],
                          capture_output=True, timeout=60, env=dict(os.environ, PYTHONPATH=ROOT))


def test_launch_freeze_freezes_through_the_agent_thaws_and_thaws_by_itself_at_its_deadline(runtime, manifest,
                                                                                          agent_boot_disk, tmp_path):
    vm = run_agent_vm(runtime, manifest, agent_boot_disk, tmp_path, b"frozen for a snapshot\n")
    assert wait_until(vm.agent_connected, 30)
    run_dir = tmp_path / "ctl"
    run_dir.mkdir(mode=0o700)
    control = ControlServer(vm, run_dir)
    control.start()
    agent = vm.agent_link.agent
    try:
        done = launch_freeze(str(run_dir), "--unfreeze-timeout", "60")
        assert done.returncode == 0, done.stderr
        assert read_freeze(done.stdout) == (True, "GuestAgent")
        assert agent.execute("guest-fsfreeze-status") == "frozen"
        assert vm.execute("query-status")["status"] == "running"  # frozen, never paused
        done = launch_freeze(str(run_dir), "--thaw")
        assert (done.returncode, json.loads(done.stdout)) == (0, {"thawed": True})
        assert agent.execute("guest-fsfreeze-status") == "thawed"

        # the controller never comes back: the launcher thaws at the deadline
        done = launch_freeze(str(run_dir), "--unfreeze-timeout", "1")
        assert read_freeze(done.stdout) == (True, "GuestAgent")
        assert agent.execute("guest-fsfreeze-status") == "frozen"
        assert wait_until(lambda: agent.execute("guest-fsfreeze-status") == "thawed", 10)

        refused = launch_freeze(str(run_dir), "--unfreeze-timeout", "301")
        assert refused.returncode == 1 and b"unfreeze timeout must be within" in refused.stdout + refused.stderr
        assert agent.execute("guest-fsfreeze-status") == "thawed"
    finally:
        control.close()
        vm.kill()
