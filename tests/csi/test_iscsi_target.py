"""The iscsi backend's controller side against a real tgtd on 127.0.0.1 (iscsi_target_support):
volumes are LUNs of targets, publish lets a node's initiator in, full targets open the next,
tgtd killed comes back with the same LUNs, CHAP, expansion, and bytes through libiscsi."""

from __future__ import annotations

import logging
import os
import signal
import time

import grpc
import pytest

from csi.errors import CsiError
from csi.lun_slots import initiator_for_node
from host.tgt import TRANSFER_PARAMS
from iscsi_target_support import BLOCK, MiB, close_rig, iscsi_rig, make_rig, qemu  # noqa: F401 (fixture)

SECRETS = {"node.session.auth.username": "pvuser", "node.session.auth.password": "not-in-any-log-42"}


def luns_of(rig, iqn: str) -> dict:
    return next(t for t in rig.backend.admin.show().values() if t.iqn == iqn).luns


def test_volumes_become_luns_of_one_target(iscsi_rig):
    a, b = iscsi_rig.create("a"), iscsi_rig.create("b")
    target = next(iter(iscsi_rig.backend.admin.show().values()))
    assert target.iqn == "iqn.2026-12.dev.pvlun:default-1"
    assert sorted(target.luns) == [1, 2]
    assert target.luns[1].path == iscsi_rig.backend.volume_path(a.id)
    assert target.luns[2].path == iscsi_rig.backend.volume_path(b.id)
    iscsi_rig.luns.delete_volume(a.id)
    assert sorted(luns_of(iscsi_rig, "iqn.2026-12.dev.pvlun:default-1")) == [2]
    assert not os.path.exists(iscsi_rig.backend.volume_path(a.id))
    c = iscsi_rig.create("c")  # the freed number is taken again
    assert iscsi_rig.backend.publish_context(c.id, "n1")["lun"] == "1"


def test_targets_offer_unsolicited_data_and_large_segments(iscsi_rig):
    iscsi_rig.create("a")
    tid = next(iter(iscsi_rig.backend.admin.show()))
    offered = iscsi_rig.backend.admin.target_params(tid)
    assert {name: offered[name] for name, _ in TRANSFER_PARAMS} == dict(TRANSFER_PARAMS)
    assert offered["InitialR2T"] == "No" and int(offered["MaxRecvDataSegmentLength"]) > 8192


def test_publish_lets_the_node_in_and_unpublish_out(iscsi_rig):
    vol = iscsi_rig.create("v")
    ctx = iscsi_rig.luns.publish(vol.id, "node-a", BLOCK, False)  # node-a never registered here: another host
    assert ctx == {"backend": "iscsi", "portal": iscsi_rig.tgtd.portal, "targetIQN": "iqn.2026-12.dev.pvlun:default-1", "lun": "1",
                   "initiatorName": "iqn.2026-12.dev.pvlun:node.node-a", "volumeID": vol.id}
    target = iscsi_rig.backend.admin.show()[1]
    assert target.acl == ["iqn.2026-12.dev.pvlun:node.node-a"]
    info = qemu(["qemu-img", "info", "--image-opts", iscsi_rig.image_opts(ctx)])
    assert info.returncode == 0 and "4 MiB" in info.stdout, info.stderr
    stranger = qemu(["qemu-img", "info", "--image-opts", iscsi_rig.image_opts(ctx, initiator_for_node("node-b"))])
    assert stranger.returncode != 0
    iscsi_rig.luns.unpublish(vol.id, "node-a")
    assert iscsi_rig.backend.admin.show()[1].acl == []
    assert qemu(["qemu-img", "info", "--image-opts", iscsi_rig.image_opts(ctx)]).returncode != 0


def test_a_node_stays_in_while_another_lun_of_the_target_is_published_there(iscsi_rig):
    a, b = iscsi_rig.create("a"), iscsi_rig.create("b")
    iscsi_rig.luns.publish(a.id, "node-a", BLOCK, False)
    iscsi_rig.luns.publish(b.id, "node-a", BLOCK, False)
    iscsi_rig.luns.unpublish(a.id, "node-a")
    assert iscsi_rig.backend.admin.show()[1].acl == [initiator_for_node("node-a")]
    iscsi_rig.luns.unpublish(b.id, "node-a")
    assert iscsi_rig.backend.admin.show()[1].acl == []


def test_a_full_target_opens_the_next_and_a_full_group_has_no_capacity(iscsi_rig):
    params = {"targetGroup": "gold", "lunsPerTarget": "2", "maxTargets": "2"}
    sc = {"backend": "iscsi", **params}
    warnings = []
    iscsi_rig.luns.on_warning = warnings.append
    vols = [iscsi_rig.create(f"v{i}", params=params) for i in range(3)]
    targets = {t.iqn: sorted(t.luns) for t in iscsi_rig.backend.admin.show().values()}
    assert targets == {"iqn.2026-12.dev.pvlun:gold-1": [1, 2], "iqn.2026-12.dev.pvlun:gold-2": [1]}
    assert warnings == [] and iscsi_rig.luns.available_capacity(sc) > 0
    iscsi_rig.create("v3", params=params)
    assert warnings and "gold uses 4 of its 4 LUN slots" in warnings[-1]
    assert iscsi_rig.luns.available_capacity(sc) == 0
    assert iscsi_rig.luns.available_capacity({"backend": "iscsi"}) > 0  # another group still has room
    with pytest.raises(CsiError) as exc:
        iscsi_rig.create("v4", params=params)
    assert exc.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "target group gold is full" in exc.value.message
    assert iscsi_rig.catalog.volume_by_name("v4") is None  # nothing half-made
    assert len(os.listdir(iscsi_rig.backend.volumes_dir)) == 4
    iscsi_rig.luns.delete_volume(vols[0].id)
    assert iscsi_rig.luns.available_capacity(sc) > 0


def test_tgtd_killed_comes_back_with_the_same_luns(iscsi_rig):
    a, b = iscsi_rig.create("a"), iscsi_rig.create("b", secrets=SECRETS)
    iscsi_rig.luns.publish(b.id, "node-a", BLOCK, False)
    before = iscsi_rig.backend.admin.show()
    old = iscsi_rig.tgtd.pid()
    os.kill(old, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (iscsi_rig.backend.restarts < 1):
        time.sleep(0.1)
    assert iscsi_rig.tgtd.pid() != old and iscsi_rig.tgtd.alive()
    after = iscsi_rig.backend.admin.show()
    assert {t: (x.iqn, sorted(x.luns), x.acl, x.accounts) for t, x in after.items()} == \
        {t: (x.iqn, sorted(x.luns), x.acl, x.accounts) for t, x in before.items()}
    assert after[1].luns[2].path == iscsi_rig.backend.volume_path(b.id)
    assert after[1].accounts == ["pvuser"] and after[1].acl == [initiator_for_node("node-a")]


def test_restart_of_pvlun_re_exports_from_the_catalog(tmp_path):
    rig = make_rig(tmp_path, default="iscsi")
    try:
        vol = rig.luns.create_volume("v", 4 * MiB, 0, [BLOCK], {}, {})  # the serve default: iscsi
        number = rig.backend.publish_context(vol.id, "n")["lun"]
    finally:
        close_rig(rig)
    rig = make_rig(tmp_path)  # a new pvlun, a new tgtd: everything comes back
    try:
        target = rig.backend.admin.show()[1]
        assert target.iqn == "iqn.2026-12.dev.pvlun:default-1" and str(sorted(target.luns)[0]) == number
    finally:
        close_rig(rig)


def test_chap_account_is_bound_and_required_and_never_logged(iscsi_rig, caplog, tmp_path):
    caplog.set_level(logging.DEBUG)
    vol = iscsi_rig.create("v", secrets=SECRETS)
    ctx = iscsi_rig.luns.publish(vol.id, "node-a", BLOCK, False)
    assert ctx["chapUser"] == "pvuser" and "not-in-any-log-42" not in repr(ctx)
    assert iscsi_rig.backend.admin.show()[1].accounts == ["pvuser"]
    assert qemu(["qemu-img", "info", "--image-opts", iscsi_rig.image_opts(ctx)]).returncode != 0  # no CHAP: refused
    secret = tmp_path / "chap"
    secret.write_text(SECRETS["node.session.auth.password"])
    ok = qemu(["qemu-img", "info", "--object", f"secret,id=chap0,file={secret}", "--image-opts",
               iscsi_rig.image_opts(ctx, secret_id="chap0")])
    assert ok.returncode == 0, ok.stderr
    with pytest.raises(CsiError) as exc:  # the same user with another secret
        iscsi_rig.create("w", secrets={**SECRETS, "node.session.auth.password": "another-secret-99"})
    assert exc.value.code == grpc.StatusCode.FAILED_PRECONDITION and "another-secret" not in exc.value.message
    with pytest.raises(CsiError) as exc:
        iscsi_rig.create("x", secrets={"node.session.auth.username": "u"})
    assert exc.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "not-in-any-log-42" not in caplog.text and "another-secret-99" not in caplog.text


def test_expansion_updates_the_lun_size(iscsi_rig):
    vol = iscsi_rig.create("v")
    ctx = iscsi_rig.luns.publish(vol.id, "node-a", BLOCK, False)
    iscsi_rig.luns.expand_volume(vol.id, 12 * MiB, 0)
    assert iscsi_rig.backend.admin.show()[1].luns[1].size_bytes == round(12 * MiB / 1e6) * 10**6  # shown in MB
    info = qemu(["qemu-img", "info", "--image-opts", iscsi_rig.image_opts(ctx)])
    assert "virtual size: 12 MiB" in info.stdout, info.stderr


def test_bytes_written_over_iscsi_land_in_the_lun_file(iscsi_rig):
    vol = iscsi_rig.create("v")
    ctx = iscsi_rig.luns.publish(vol.id, "node-a", BLOCK, False)
    write = qemu(["qemu-io", "--image-opts", iscsi_rig.image_opts(ctx), "-c", "write -P 0xa5 1M 64k"])
    assert write.returncode == 0 and "wrote 65536" in write.stdout, write.stderr
    with open(iscsi_rig.backend.volume_path(vol.id), "rb") as f:
        f.seek(MiB)
        assert f.read(65536) == b"\xa5" * 65536
        f.seek(0)
        assert f.read(MiB) == bytes(MiB)


def test_file_volumes_beside_iscsi_ones_stay_file_volumes(iscsi_rig):
    vol = iscsi_rig.luns.create_volume("f", 4 * MiB, 0, [BLOCK], {"backend": "file"}, {})
    assert iscsi_rig.backend.admin.show() == {}
    iscsi_rig.catalog.register_node("local")
    assert iscsi_rig.luns.publish(vol.id, "local", BLOCK, False) == {
        "lunPath": iscsi_rig.backend.volume_path(vol.id)}
