"""The HTTPS upload endpoint with per-DataVolume tokens, and the image-upload client."""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import json
import os
import ssl
import stat
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
        verify_token(b"another key of thirty-two bytes!", token)
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
        upload_image(srv.url, issue_token(b"forged".ljust(32, b"!"), "default/x"), str(images.path("raw")),
                     ca_file=srv.cert_file)
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


def _signed_with(key: bytes, dv_key: str) -> str:
    """A token as an attacker would sign it, with a key of their choosing (the empty key)."""
    b64 = lambda data: base64.urlsafe_b64encode(data).rstrip(b"=").decode()  # noqa: E731
    payload = b64(json.dumps({"dv": dv_key, "op": "upload", "exp": time.time() + 60}).encode())
    return f"{payload}.{b64(hmac.new(key, payload.encode(), hashlib.sha256).digest())}"


@pytest.mark.parametrize("left", [b"", b"short key"])
def test_signing_key_cut_short_by_a_crash_is_replaced_and_never_signs(left, tmp_path):
    from importer.upload_gateway import token_key

    key_file = tmp_path / "upload" / "token.key"
    key_file.parent.mkdir()
    key_file.write_bytes(left)  # what a crash while the key was first written could leave
    key = token_key(str(tmp_path))
    assert len(key) >= 32 and key_file.read_bytes() == key and token_key(str(tmp_path)) == key
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600 and os.listdir(key_file.parent) == ["token.key"]
    with pytest.raises(InvalidToken):
        verify_token(key, _signed_with(left, "default/any"))
    for unusable in (b"", left):  # a short key is refused wherever one is used
        with pytest.raises(ValueError):
            issue_token(unusable, "default/any")
        with pytest.raises(InvalidToken):
            verify_token(unusable, _signed_with(unusable, "default/any"))


def test_upload_larger_than_the_volume_is_refused_with_413_and_a_fitting_one_then_lands(upload, images, tmp_path):
    """A Content-Length the volume cannot hold: 413 with the reason, no outcome reported (the
    DataVolume stays UploadReady), the volume untouched; the right image then goes in."""
    srv, control = upload
    lun = block_target(tmp_path, 4 * MiB)
    key = "default/retry-after-413"
    control.targets[key] = Target(str(lun), 4 * MiB)
    data = images.path("raw").read_bytes()  # 6 MiB of disk: more than the 4 MiB volume
    conn = http.client.HTTPSConnection(*srv.server_address[:2], context=ssl.create_default_context(cafile=srv.cert_file))
    conn.putrequest("PUT", "/v1beta1/upload")
    conn.putheader("Authorization", f"Bearer {issue_token(KEY, key)}")
    conn.putheader("Content-Length", str(len(data)))
    conn.endheaders()
    conn.send(data[:1 << 20])
    resp = conn.getresponse()
    body = resp.read().decode()
    conn.close()
    assert resp.status == 413 and body.startswith(errors.IMAGE_TOO_LARGE) and str(len(data)) in body, body
    assert "still ready" in body
    assert not [e for e in control.events if e[1] == key], "no outcome: the DataVolume stays UploadReady"
    assert_zero(lun)
    small = tmp_path / "small.raw"
    small.write_bytes(data[:4 * MiB])
    upload_image(srv.url, issue_token(KEY, key), str(small), ca_file=srv.cert_file)
    assert control.events[-1] == ("done", key, True, "")
    assert_disk(lun, small, 4 * MiB)


def test_stopping_the_server_ends_an_upload_under_way_as_interrupted(images, tmp_path):
    """The daemon stops: an upload whose client is still sending ends now (its connection cut,
    the volume zeroed, reported interrupted), not after the daemon let go of the volume."""
    from importer.upload_server import UploadServer

    from importer_support import Control

    control = Control(tmp_path)
    (tmp_path / "scratch").mkdir()
    srv = UploadServer(cert_dir=str(tmp_path / "certs"), secret_key=KEY, resolve=control.resolve,
                       on_done=control.on_done, on_interrupted=control.on_interrupted,
                       scratch_dir=str(tmp_path / "scratch")).start()
    lun = block_target(tmp_path)
    key = "default/stopped"
    control.targets[key] = Target(str(lun), 16 * MiB)
    data = images.path("raw").read_bytes()
    host, port = srv.server_address[:2]
    conn = http.client.HTTPSConnection(host, port, context=ssl.create_default_context(cafile=srv.cert_file))
    try:
        conn.putrequest("PUT", "/v1beta1/upload")
        conn.putheader("Authorization", f"Bearer {issue_token(KEY, key)}")
        conn.putheader("Content-Length", str(len(data)))
        conn.endheaders()
        conn.send(data[: len(data) // 2])  # and then the client waits, the connection open
        deadline = time.monotonic() + 10
        while key not in srv.busy and time.monotonic() < deadline:
            time.sleep(0.01)
        assert key in srv.busy
        srv.stop()  # returns once the upload was reported
        assert control.done.is_set() and control.events[-1][:2] == ("interrupted", key)
        assert_zero(lun)
    finally:
        conn.close()
