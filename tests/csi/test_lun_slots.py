"""LUN accounting rules (csi/lun_slots.py), tgtadm's output and argv checks (host/tgt.py), and
the `pvlun luns` / `pvlun plan luns` tables: pure functions, no tgtd."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from csi.errors import CsiError
from csi.lun_slots import GroupSpec, group_spec, initiator_for_node, near_limit, place, plan, target_iqn
from host.tgt import IQN, MAX_LUNS_PER_TARGET, TgtError, Tgtadm, check_chap, check_iqn, check_portal, parse_show
from pvlun.luns import format_table, report_rows

PVLUN = str(Path(sys.executable).with_name("pvlun"))


def test_place_fills_the_lowest_target_and_number_first():
    spec = GroupSpec("g", 3, 0)
    assert place({}, spec) == (1, 1)
    assert place({1: {1, 3}}, spec) == (1, 2)
    assert place({1: {1, 2, 3}}, spec) == (2, 1)
    assert place({1: {1, 2, 3}, 2: {2}}, spec) == (2, 1)
    assert place({1: {1, 2, 3}, 2: {1, 2, 3}, 3: set()}, spec) == (3, 1)


def test_a_bounded_group_is_exhausted_and_warns_at_90_percent():
    spec = GroupSpec("g", 5, 2)
    with pytest.raises(CsiError) as exc:
        place({1: set(range(1, 6)), 2: set(range(1, 6))}, spec)
    assert exc.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert near_limit({1: set(range(1, 6)), 2: {1, 2, 3}}, spec) == ""  # 8 of 10
    assert "9 of its 10 LUN slots (90%)" in near_limit({1: set(range(1, 6)), 2: {1, 2, 3, 4}}, spec)
    assert near_limit({1: set(range(1, 6)) for _ in range(1)}, GroupSpec("g", 5, 0)) == ""  # unbounded


def test_group_parameters_are_checked():
    assert group_spec({}) == GroupSpec("default", MAX_LUNS_PER_TARGET, 0)
    assert group_spec({"targetGroup": "gold", "lunsPerTarget": "16", "maxTargets": "4"}) == GroupSpec("gold", 16, 4)
    for bad in ({"targetGroup": "Gold"}, {"targetGroup": "a:b"}, {"targetGroup": "-a"},
                {"lunsPerTarget": "0"}, {"lunsPerTarget": str(MAX_LUNS_PER_TARGET + 1)}, {"lunsPerTarget": "١٢"},
                {"maxTargets": "-1"}):
        with pytest.raises(CsiError) as exc:
            group_spec(bad)
        assert exc.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_names_are_iqns():
    assert IQN.fullmatch(target_iqn("gold", 12))
    assert initiator_for_node("Worker-1.example") == "iqn.2026-12.dev.pvlun:node.worker-1.example"
    assert IQN.fullmatch(initiator_for_node("a" * 128))
    for bad in ("", "iqn.2026-13.x:y", "iqn.2026-12.dev.pvlun:a b", "iqn.2026-12.dev:a,b", "-iqn.2026-12.x",
                "iqn.2026-12.dev.pvlun:x\n", "iqn.2026-12.dev.pvlun:" + "a" * 220, "eui.0123456789abcdef",
                "iqn.2026-12.dev.pvlun:A"):
        with pytest.raises(TgtError):
            check_iqn(bad)
    for user, secret in (("", "x" * 12), ("-u", "x" * 12), ("u", "short"), ("u", "has space 12345"),
                         ("u", "comma,123456789"), ("u", "dollar$12345678")):
        with pytest.raises(TgtError) as exc:
            check_chap(user, secret)
        assert secret not in str(exc.value) or not secret
    with pytest.raises(TgtError):
        check_portal("127.0.0.1:0")
    with pytest.raises(TgtError):  # nothing runs: the value is refused first
        Tgtadm(3261).add_lun(1, 1, "/pool/v.img,bstype=sg")
    with pytest.raises(TgtError):
        Tgtadm(3261).add_lun(1, 0, "/pool/v.img")
    with pytest.raises(TgtError):
        Tgtadm(40000)


SHOW = """Target 1: iqn.2026-12.dev.pvlun:default-1
    System information:
        Driver: iscsi
        State: ready
    I_T nexus information:
        I_T nexus: 2
            Initiator: iqn.2026-12.dev.pvlun:node.a alias: none
            Connection: 0
                IP Address: 127.0.0.1
    LUN information:
        LUN: 0
            Type: controller
            Size: 0 MB, Block size: 1
            Backing store type: null
            Backing store path: None
        LUN: 1
            Type: disk
            Size: 21 MB, Block size: 512
            Online: Yes
            Backing store type: rdwr
            Backing store path: /pool/volumes/vol-1.img
            Backing store flags:
    Account information:
        pvuser
    ACL information:
        iqn.2026-12.dev.pvlun:node.a
Target 2: iqn.2026-12.dev.pvlun:default-2
    System information:
        Driver: iscsi
        State: ready
    I_T nexus information:
    LUN information:
        LUN: 0
            Type: controller
    Account information:
    ACL information:
"""


def test_parse_show():
    targets = parse_show(SHOW)
    assert sorted(targets) == [1, 2]
    one = targets[1]
    assert one.iqn == "iqn.2026-12.dev.pvlun:default-1" and list(one.luns) == [1]
    assert one.luns[1].path == "/pool/volumes/vol-1.img" and one.luns[1].size_bytes == 21_000_000
    assert one.acl == ["iqn.2026-12.dev.pvlun:node.a"] and one.accounts == ["pvuser"] and one.sessions == 1
    assert targets[2].luns == {} and targets[2].acl == []


def test_plan():
    p = plan(1000, 3)
    assert (p.luns, p.targets, p.last_target_luns) == (3000, 6, 3000 - 5 * MAX_LUNS_PER_TARGET)
    assert plan(10, 2, 5).targets == 4 and plan(0, 2).targets == 0
    with pytest.raises(ValueError):
        plan(1, 1, MAX_LUNS_PER_TARGET + 1)
    with pytest.raises(ValueError):
        plan(1, 0)
    # the plan agrees with how the driver places LUNs
    spec, used = GroupSpec("g", 7, 0), {}
    for _ in range(10 * 4):
        index, lun = place(used, spec)
        used.setdefault(index, set()).add(lun)
    assert len(used) == plan(10, 4, 7).targets and len(used[len(used)]) == plan(10, 4, 7).last_target_luns


def test_plan_luns_command():
    out = subprocess.run([PVLUN, "plan", "luns", "--vms", "200", "--disks-per-vm", "3", "--limit", "128"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "200 VMs x 3 disks = 600 LUNs" in out.stdout and "5 targets of at most 128 LUNs (the last holds 88)" in out.stdout
    bad = subprocess.run([PVLUN, "plan", "luns", "--vms", "2", "--limit", "9999"], capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "509" in bad.stderr


def test_report_table():
    rows = [{"group": "gold", "target": "iqn.2026-12.dev.pvlun:gold-1", "tid": 1, "used": 2, "limit": 2,
             "nodes": {"a": 2}},
            {"group": "gold", "target": "iqn.2026-12.dev.pvlun:gold-2", "tid": 2, "used": 1, "limit": 2,
             "nodes": {"a": 1, "b": 1}}]
    lines = report_rows(rows)
    assert ("target", "iqn.2026-12.dev.pvlun:gold-2", "1/2", "a:1,b:1") in lines
    assert ("node", "a", "3", "-") in lines and ("node", "b", "1", "-") in lines
    assert ("group", "gold", "3/4", "2 targets") in lines
    assert format_table(lines).splitlines()[0].split() == ["KIND", "NAME", "LUNS", "NODES"]
