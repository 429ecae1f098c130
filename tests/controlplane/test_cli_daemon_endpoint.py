"""The CLI against a daemon started as the README shows it, with its own `--endpoint` and
`--node-id`: every command finds it from the data dir, `export` attaches on the daemon's
first node, and a command that fails leaves no object behind."""

from __future__ import annotations

import os

import pytest
from test_datavolume import dv, make_qcow2, same_prefix

MiB = 1 << 20


@pytest.fixture(scope="module")
def custom(serve, tmp_path_factory):
    sock = tmp_path_factory.mktemp("run") / "pvlun" / "csi.sock"
    return serve("--endpoint", f"unix://{sock}", "--node-id", "lab-host")


def attachments(inst) -> list[dict]:
    return inst.store.list("VolumeAttachment")


def one_line_error(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr and "_InactiveRpcError" not in proc.stderr
    return lines[0]


def test_export_finds_a_daemon_with_its_own_endpoint_and_node_id_and_the_claim_deletes_cleanly(custom, web, tmp_path):
    raw = make_qcow2(os.path.join(web.root, "custom.qcow2"))
    custom.apply(dv("custom", f"    http:\n      url: {web.url}/custom.qcow2"), "--wait")
    out = str(tmp_path / "custom.raw")
    custom.cli("export", "pvc", "custom", "-o", out)
    assert same_prefix(raw, out)
    assert attachments(custom) == []
    lun = custom.lun_path("custom")
    custom.cli("delete", "dv", "custom")
    custom.wait(lambda: custom.get("PersistentVolumeClaim", "custom") is None and not os.path.exists(lun), 30,
                "the claim and its volume gone")


def test_a_failed_export_leaves_nothing_attached(custom, tmp_path):
    custom.apply(dv("kept", "    blank: {}", size="8Mi"), "--wait")
    err = one_line_error(custom.cli("export", "pvc", "kept", "-o", str(tmp_path / "x.raw"), "--node-id", "nowhere",
                                    check=False))
    assert "'nowhere' is not served" in err and "lab-host" in err
    one_line_error(custom.cli("export", "pvc", "missing", "-o", str(tmp_path / "y.raw"), check=False))
    unwritable = str(tmp_path / "no-such-dir" / "z.raw")
    one_line_error(custom.cli("export", "pvc", "kept", "-o", unwritable, check=False))  # fails after attaching
    assert attachments(custom) == []
    assert not os.path.exists(os.path.dirname(unwritable))


def test_a_failed_image_upload_deletes_the_datavolume_it_made(custom, tmp_path):
    image = tmp_path / "big.raw"
    with open(image, "wb") as f:
        f.write(os.urandom(12 * MiB))  # more than the 8Mi asked for
    proc = custom.cli("image-upload", "--dv", "too-big", "--size", "8Mi", "--block-volume",
                      "--image-path", str(image), check=False)
    assert "ImageTooLarge" in one_line_error(proc)
    assert custom.get("DataVolume", "too-big") is None
    custom.wait(lambda: custom.get("PersistentVolumeClaim", "too-big") is None, 30, "its claim gone")
    assert attachments(custom) == []
