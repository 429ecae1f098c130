"""A VM live-migrates between two node hosts with its disk on one iSCSI LUN (RWX block): tgtd
runs on the storage host's address, each `pvlun launch` in its node's namespace has QEMU log
in to the LUN itself, the stream goes over the migration network, the guest ticks on at the
target, and once the source has quit only the target's initiator is logged in."""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "csi"))
from iscsi_target_support import free_control_port  # noqa: E402

from csi.lun_slots import initiator_for_node, target_iqn  # noqa: E402
from host.command import output  # noqa: E402
from host.netns import MIGRATION_NETWORK, Hosts  # noqa: E402
from host.tgt import TgtDaemon  # noqa: E402
from test_launch_cli import Launch, launch_args, ticks, vmi_file  # noqa: E402
from test_migration_network import launch_migrate  # noqa: E402

CIDR = str(MIGRATION_NETWORK)
PORT = 3260


def logged_in(control_port: int) -> list[str]:
    """The initiator names of the target's sessions (tgtadm's I_T nexus lines)."""
    text = output(["tgtadm", "-C", str(control_port), "--lld", "iscsi", "--mode", "target", "--op", "show"])
    return re.findall(r"^\s+Initiator: (\S+)", text, re.M)


@pytest.fixture
def hosts():
    with Hosts(["storage", "nodeA", "nodeB"], migration=["nodeA", "nodeB"]) as made:
        yield made


@pytest.fixture
def tick_target(hosts, tick_disk, tmp_path):
    """tgtd on the storage host exporting a copy of the tick disk as LUN 1, both nodes in its ACL."""
    lun_file = tmp_path / "tick-lun.img"
    lun_file.write_bytes(tick_disk.read_bytes())
    tgtd = TgtDaemon(f"{hosts['storage'].address}:{PORT}", free_control_port(), str(tmp_path / "tgtd.log"),
                     io_threads=2, prefix=hosts["storage"].prefix)
    tgtd.start()
    try:
        iqn = target_iqn("default", 1)
        tgtd.admin.new_target(1, iqn)
        tgtd.admin.add_lun(1, 1, str(lun_file))
        for node in ("nodeA", "nodeB"):
            tgtd.admin.bind_initiator(1, initiator_for_node(node))
        yield tgtd, f"iscsi://{tgtd.portal}/{iqn}/1"
    finally:
        tgtd.stop()


def test_a_vm_on_an_iscsi_lun_migrates_between_node_namespaces_and_the_source_logs_out(hosts, tick_target, tmp_path):
    tgtd, url = tick_target
    token = tmp_path / "token"
    token.write_text("t" * 32)
    vmi = vmi_file(tmp_path / "vmi.json")
    launches = []
    try:
        source = Launch(tmp_path, "source", launch_args(tmp_path, "src", vmi, "--volume", f"root={url}",
                                                        "--migration-network", CIDR),
                        prefix=hosts["nodeA"].prefix, env={"NODE_NAME": "nodeA"})
        launches.append(source)
        assert source.wait_for("tick 3", timeout=30), source.stderr()
        assert logged_in(tgtd.control_port) == [initiator_for_node("nodeA")]
        target = Launch(tmp_path, "target", launch_args(tmp_path, "dst", vmi, "--volume", f"root={url}",
                                                        "--incoming", "7000", "--migration-network", CIDR,
                                                        "--token-file", str(token)),
                        prefix=hosts["nodeB"].prefix, env={"NODE_NAME": "nodeB"})
        launches.append(target)
        deadline = time.monotonic() + 20
        while not any(e.get("phase") == "Migrating" for e in target.events()) and time.monotonic() < deadline:
            time.sleep(0.05)
        # both QEMUs are logged in to the same LUN while the memory moves (RWX block)
        assert sorted(logged_in(tgtd.control_port)) == sorted(initiator_for_node(n) for n in ("nodeA", "nodeB"))
        code, result = launch_migrate(tmp_path, "src", f"{hosts['nodeB'].migration_address}:7000", token)
        assert code == 0 and result["phase"] == "Succeeded", result
        assert source.proc.wait(15) == 0 and source.events()[-1]["reason"] == "migrated"
        last = ticks(source.stdout())[-1]
        assert target.wait_for(f"tick {last + 3}", timeout=30), target.stderr()
        assert "PVLUN-BOOT" not in target.stdout() and ticks(target.stdout())[:3] == [last + 1, last + 2, last + 3]
        assert logged_in(tgtd.control_port) == [initiator_for_node("nodeB")]  # the source's session is gone
    finally:
        for launch in launches:
            launch.stop()
    assert logged_in(tgtd.control_port) == []
