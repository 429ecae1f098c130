"""CDI's `insecureSkipVerify: true` (a server with a self-signed certificate is read anyway)
and `checksum: <md5|sha1|sha256|sha512>:<hex>` (an empty string: none) on http sources."""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import ssl

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from importer import errors
from importer.errors import ImportFailed
from importer.pipeline import Target

from importer_support import MiB, PyServer, assert_disk, assert_zero, block_target, run_import


@pytest.fixture(scope="module")
def self_signed_https(images, tmp_path_factory):
    """Python's http.server over TLS with a certificate that signed itself (no CA at all)."""
    d = tmp_path_factory.mktemp("selfsigned")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .sign(key, hashes.SHA256()))
    (d / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(d / "cert.pem"), str(d / "key.pem"))
    srv = PyServer(images.dir, ctx)
    yield srv
    srv.shutdown()
    srv.server_close()


def lun(tmp_path) -> tuple[Target, object]:
    path = block_target(tmp_path, 16 * MiB)
    return Target(str(path), 16 * MiB), path


@pytest.mark.parametrize("kind", ["raw", "qcow2"])
def test_self_signed_certificate_is_refused_without_insecure_skip_verify(kind, self_signed_https, tmp_path, scratch):
    target, path = lun(tmp_path)
    with pytest.raises(ImportFailed) as info:
        run_import({"http": {"url": f"{self_signed_https.url}/img/{kind}.bin"}}, target, scratch)
    assert info.value.reason == errors.UNTRUSTED_CERTIFICATE
    assert_zero(path)


@pytest.mark.parametrize("kind", ["raw", "qcow2.gz", "qcow2"])
def test_insecure_skip_verify_reads_a_self_signed_server(kind, self_signed_https, images, tmp_path, scratch):
    target, path = lun(tmp_path)
    result, _ = run_import({"http": {"url": f"{self_signed_https.url}/img/{kind}.bin", "insecureSkipVerify": True}},
                           target, scratch)
    assert_disk(path, images.expected[kind.split(".")[0]], 16 * MiB)
    assert result.method in ("stream", "scratch")


def test_insecure_skip_verify_reaches_qemus_in_place_reader(nginx, images, tmp_path, scratch):
    """nginx (range requests, a certificate of a CA nobody trusts): qemu reads the qcow2 in place
    through nbdkit's curl plugin, which must not check the certificate either."""
    target, path = lun(tmp_path)
    result, _ = run_import({"http": {"url": f"{nginx.https_url}/img/qcow2.bin", "insecureSkipVerify": True}},
                           target, scratch)
    assert result.method == "direct"
    assert_disk(path, images.expected["qcow2"], 16 * MiB)


def test_insecure_skip_verify_must_be_a_boolean(self_signed_https, tmp_path, scratch):
    target, path = lun(tmp_path)
    with pytest.raises(ImportFailed) as info:
        run_import({"http": {"url": f"{self_signed_https.url}/img/raw.bin", "insecureSkipVerify": "yes"}}, target, scratch)
    assert info.value.reason == errors.INVALID_SOURCE and "insecureSkipVerify" in info.value.message
    assert_zero(path)


@pytest.mark.parametrize("algo", ["md5", "sha1", "sha256", "sha512"])
@pytest.mark.parametrize("kind", ["raw", "qcow2"])
def test_checksum_of_each_algorithm_is_verified(algo, kind, nginx, images, tmp_path, scratch):
    digest = hashlib.new(algo, images.path(kind).read_bytes()).hexdigest()
    target, path = lun(tmp_path)
    result, _ = run_import({"http": {"url": f"{nginx.url}/img/{kind}.bin", "checksum": f"{algo}:{digest.upper()}"}},
                           target, scratch)
    assert result.method != "direct", "a checksum is verified before qemu converts the image"
    assert_disk(path, images.expected[kind], 16 * MiB)


@pytest.mark.parametrize("algo", ["md5", "sha1", "sha256", "sha512"])
@pytest.mark.parametrize("kind", ["raw", "qcow2"])
def test_checksum_mismatch_fails_and_leaves_nothing(algo, kind, nginx, images, tmp_path, scratch):
    wrong = hashlib.new(algo, b"another image").hexdigest()
    target, path = lun(tmp_path)
    with pytest.raises(ImportFailed) as info:
        run_import({"http": {"url": f"{nginx.url}/img/{kind}.bin", "checksum": f"{algo}:{wrong}"}}, target, scratch)
    assert info.value.reason == errors.CHECKSUM_MISMATCH
    assert f"expected {algo}:{wrong}" in info.value.message
    assert_zero(path)
    assert os.listdir(scratch) == []


def test_empty_checksum_means_none(nginx, images, tmp_path, scratch):
    target, path = lun(tmp_path)
    result, _ = run_import({"http": {"url": f"{nginx.url}/img/qcow2.bin", "checksum": ""}}, target, scratch)
    assert result.method == "direct", "no checksum: qemu reads the image in place"
    assert_disk(path, images.expected["qcow2"], 16 * MiB)


@pytest.mark.parametrize("checksum", ["md5:abc", "sha384:" + "0" * 96, "sha256", "crc32:00000000", "sha1:" + "g" * 40])
def test_malformed_checksums_are_refused(checksum, nginx, tmp_path, scratch):
    target, path = lun(tmp_path)
    with pytest.raises(ImportFailed) as info:
        run_import({"http": {"url": f"{nginx.url}/img/raw.bin", "checksum": checksum}}, target, scratch)
    assert info.value.reason == errors.INVALID_SOURCE and "md5, sha1, sha256 or sha512" in info.value.message
    assert_zero(path)
