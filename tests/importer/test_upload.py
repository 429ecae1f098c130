"""The HTTPS upload endpoint with per-DataVolume tokens, and the image-upload client."""

from __future__ import annotations

import http.client
import os
import ssl
import time

import pytest

from importer import errors
from importer.errors import ImportFailed
from importer.pipeline import Target
from importer.upload_client import upload_image
from importer.upload_server import InvalidToken, issue_token, verify_token

from importer_support import KEY, MiB, assert_disk, assert_zero, block_target


def test_token_round_trip_and_refusals():
    token = issue_token(KEY, "default/dv1", ttl=60)
    assert verify_token(KEY, token) == "default/dv1"
    with pytest.raises(InvalidToken):
        verify_token(b"other key", token)
    with pytest.raises(InvalidToken):
        verify_token(KEY, issue_token(KEY, "default/dv1", ttl=-1))
    with pytest.raises(InvalidToken):
        verify_token(KEY, token[:-2] + "xx")


@pytest.mark.parametrize("kind", ["qcow2", "raw.gz", "vmdk"])
def test_upload_lands_byte_exact(kind, upload, images, tmp_path):
    srv, control = upload
    lun = block_target(tmp_path)
    key = f"default/up-{kind}"
    control.targets[key] = Target(str(lun), 16 * MiB)
    seen: list[float] = []
    msg = upload_image(srv.url, issue_token(KEY, key), str(images.path(kind)), ca_file=srv.cert_file, progress=seen.append)
    assert "complete" in msg and seen[-1] == 100.0
    assert ("done", key, True, "") in control.events
    assert control.progress[key] == 100.0
    assert_disk(lun, images.expected[kind], 16 * MiB)


def test_upload_refuses_bad_tokens_and_untrusting_clients(upload, images, tmp_path):
    srv, control = upload
    control.targets["default/x"] = Target(str(block_target(tmp_path)), 16 * MiB)
    with pytest.raises(ImportFailed) as info:
        upload_image(srv.url, issue_token(b"forged", "default/x"), str(images.path("raw")), ca_file=srv.cert_file)
    assert info.value.reason == errors.UNAUTHORIZED
    with pytest.raises(ImportFailed) as info:
        upload_image(srv.url, issue_token(KEY, "default/x", ttl=-5), str(images.path("raw")), ca_file=srv.cert_file)
    assert info.value.reason == errors.UNAUTHORIZED and "expired" in info.value.message
    with pytest.raises(ImportFailed) as info:
        upload_image(srv.url, issue_token(KEY, "default/x"), str(images.path("raw")))  # no CA given
    assert info.value.reason == errors.UNTRUSTED_CERTIFICATE


def test_bad_image_upload_fails_and_leaves_nothing(upload, images, tmp_path):
    srv, control = upload
    lun = block_target(tmp_path, 4 * MiB)
    control.targets["default/small"] = Target(str(lun), 4 * MiB)
    with pytest.raises(ImportFailed) as info:
        upload_image(srv.url, issue_token(KEY, "default/small"), str(images.path("qcow2")), ca_file=srv.cert_file)
    assert info.value.reason == errors.IMAGE_TOO_LARGE
    assert control.events[-1][:3] == ("done", "default/small", False)
    assert_zero(lun)


def test_upload_cut_off_halfway_is_ready_again_and_can_be_retried(upload, images, tmp_path):
    srv, control = upload
    lun = block_target(tmp_path)
    key = "default/cut"
    control.targets[key] = Target(str(lun), 16 * MiB)
    data = images.path("raw").read_bytes()
    host, port = srv.server_address[:2]
    ctx = ssl.create_default_context(cafile=srv.cert_file)
    conn = http.client.HTTPSConnection(host, port, context=ctx)
    conn.putrequest("PUT", "/v1beta1/upload")
    conn.putheader("Authorization", f"Bearer {issue_token(KEY, key)}")
    conn.putheader("Content-Length", str(len(data)))
    conn.endheaders()
    conn.send(data[: len(data) // 2])
    conn.sock.close()  # the client goes away
    control.done.clear()
    assert control.done.wait(30)
    assert control.events[-1][:2] == ("interrupted", key)
    assert_zero(lun)
    upload_image(srv.url, issue_token(KEY, key), str(images.path("raw")), ca_file=srv.cert_file)
    assert_disk(lun, images.expected["raw"], 16 * MiB)


def test_certificate_is_generated_once(upload, tmp_path):
    srv, _ = upload
    before = os.path.getmtime(srv.cert_file)
    time.sleep(0.01)
    from importer.upload_server import ensure_certificate

    assert ensure_certificate(os.path.dirname(srv.cert_file))[0] == srv.cert_file
    assert os.path.getmtime(srv.cert_file) == before
