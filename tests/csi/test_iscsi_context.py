"""Pure parts of the iscsi node side: publish_context and secret checks, the node's initiator
name, the daemon's argv, and the kernel path's choice and iscsiadm command lines."""

from __future__ import annotations

import json

import grpc
import pytest

from csi.errors import CsiError
from csi.iscsi_context import (
    SECRET_PASSWORD, SECRET_USER, IscsiLun, chap_from, initiator_name, is_iscsi, parse_lun,
)
from csi.iscsi_kernel import (
    KERNEL, USERSPACE, HostFacts, by_path_device, chap_update_argvs, choose_path, discovery_argv, login_argv,
    logout_argv, probe_host, rescan_argv,
)
from csi.iscsi_userspace import UserspaceInitiator

GOOD = {"backend": "iscsi", "portal": "198.18.0.1:3260", "targetIQN": "iqn.2024-01.dev.pvlun:sc-fast.0", "lun": "12"}
VOL = "vol-" + "ab" * 16


def code_of(call, *args) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(CsiError) as err:
        call(*args)
    return err.value.code, err.value.message


def test_publish_context_is_parsed():
    assert is_iscsi(GOOD) and not is_iscsi({"lunPath": "/x"})
    lun = parse_lun(GOOD | {"chapUser": "alice"})
    assert lun == IscsiLun("198.18.0.1:3260", "iqn.2024-01.dev.pvlun:sc-fast.0", 12, "alice")
    assert (lun.host, lun.port) == ("198.18.0.1", 3260)
    v6 = parse_lun(GOOD | {"portal": "[fd00::1]:3260"})
    assert (v6.host, v6.port) == ("fd00::1", 3260)


def test_a_publish_context_of_another_volume_is_refused_naming_volume_id():
    other = "vol-" + "cd" * 16
    assert parse_lun(GOOD | {"volumeID": VOL}, VOL).lun == 12
    code, message = code_of(parse_lun, GOOD | {"volumeID": other}, VOL)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "volumeID" in message and VOL in message


@pytest.mark.parametrize("key,value", [
    ("portal", "198.18.0.1"), ("portal", "198.18.0.1:0"), ("portal", "198.18.0.1:99999"),
    ("portal", "host.example:3260"), ("portal", "198.18.0.1:3260,x"), ("portal", ""),
    ("targetIQN", "IQN.2024-01.DEV:x"), ("targetIQN", "iqn.2024-01.dev:a b"), ("targetIQN", "iqn.2024-01.dev:\"x"),
    ("targetIQN", ""), ("lun", "-1"), ("lun", "1024"), ("lun", "1e3"), ("lun", ""),
    ("chapUser", "a b"), ("chapUser", "x" * 65),
])
def test_bad_publish_context_names_the_key(key, value):
    code, message = code_of(parse_lun, GOOD | {key: value})
    assert code == grpc.StatusCode.INVALID_ARGUMENT and key in message


def test_chap_comes_from_the_node_stage_secret_and_is_never_shown():
    lun = parse_lun(GOOD | {"chapUser": "alice"})
    chap = chap_from(lun, {SECRET_PASSWORD: "twelve-chars-or-more"})
    assert (chap.user, chap.password) == ("alice", "twelve-chars-or-more")
    assert "twelve" not in repr(chap)
    assert chap_from(parse_lun(GOOD), {}) is None
    assert chap_from(parse_lun(GOOD), {SECRET_USER: "bob", SECRET_PASSWORD: "twelve-chars-or-more"}).user == "bob"
    code, message = code_of(chap_from, lun, {})
    assert code == grpc.StatusCode.FAILED_PRECONDITION and SECRET_PASSWORD in message
    code, message = code_of(chap_from, lun, {SECRET_PASSWORD: "short pw"})
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "short pw" not in message


def test_initiator_name_is_made_from_the_node_id_as_the_controller_makes_it():
    from csi.lun_slots import initiator_for_node

    assert initiator_name("Node-A") == "iqn.2026-12.dev.pvlun:node.node-a" == initiator_for_node("Node-A")
    assert initiator_name("worker_1.eu") == "iqn.2026-12.dev.pvlun:node.worker_1.eu"


def test_daemon_argv_holds_no_password_and_only_checked_values():
    ini = UserspaceInitiator("/run/pvlun/iscsi", initiator_name("n1"))
    lun = parse_lun(GOOD | {"chapUser": "alice"})
    chap = chap_from(lun, {SECRET_PASSWORD: "twelve-chars-or-more"})
    argv = ini.argv(VOL, lun, chap)
    assert "twelve-chars-or-more" not in " ".join(argv)
    blockdev = json.loads(argv[argv.index("--blockdev") + 1])
    assert blockdev | {} == {"driver": "iscsi", "node-name": "lun", "transport": "tcp", "portal": lun.portal,
                             "target": lun.target, "lun": 12, "initiator-name": "iqn.2026-12.dev.pvlun:node.n1",
                             "timeout": 0, "user": "alice", "password-secret": "chap"}
    secret = json.loads(argv[argv.index("--object") + 1])
    assert secret == {"qom-type": "secret", "id": "chap", "file": f"/run/pvlun/iscsi/{VOL}/secret"}
    assert "--object" not in ini.argv(VOL, parse_lun(GOOD), None)
    with pytest.raises(ValueError):
        ini.export_path("../../etc")
    with pytest.raises(ValueError):
        UserspaceInitiator("/run/a,b", "iqn.2024-01.dev.pvlun:n1")


def test_kernel_path_only_with_tool_module_and_initiator_name():
    yes = HostFacts(iscsiadm=True, iscsi_tcp_loaded=False, iscsi_tcp_available=True, initiator_name_file=True)
    assert choose_path(yes) == KERNEL
    assert choose_path(yes.__class__(True, True, False, True)) == KERNEL
    for missing in ("iscsiadm", "initiator_name_file"):
        assert choose_path(HostFacts(**{**yes.__dict__, missing: False})) == USERSPACE
    assert choose_path(HostFacts(True, False, False, True)) == USERSPACE  # no iscsi_tcp anywhere
    assert probe_host().iscsi_tcp_loaded is False and choose_path(probe_host()) == USERSPACE  # these machines


def test_iscsiadm_command_lines():
    lun = parse_lun(GOOD)
    node = ["iscsiadm", "--mode", "node", "--targetname", lun.target, "--portal", lun.portal]
    assert discovery_argv(lun.portal) == ["iscsiadm", "--mode", "discovery", "--type", "sendtargets",
                                          "--portal", "198.18.0.1:3260"]
    assert login_argv(lun) == node + ["--login"]
    assert logout_argv(lun) == node + ["--logout"]
    assert rescan_argv(lun) == node + ["--rescan"]
    assert by_path_device(lun) == "/dev/disk/by-path/ip-198.18.0.1:3260-iscsi-iqn.2024-01.dev.pvlun:sc-fast.0-lun-12"
    assert all("password" not in " ".join(a) for a in chap_update_argvs(lun, "alice"))
