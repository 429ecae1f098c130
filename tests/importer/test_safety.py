"""The safety list of the importer issue, one test (or more) per line: each ends in
ImportFailed with an actionable reason, and nothing of the import is left in the volume."""

from __future__ import annotations

import gzip
import hashlib
import logging
import lzma
import os
import subprocess

import pytest

from importer import errors
from importer.errors import ImportFailed
from importer.pipeline import Target

from importer_support import MiB, assert_zero, block_target, free_port, qemu_img, run_import


@pytest.fixture(scope="module")
def bad(images, tmp_path_factory):
    """Hostile and broken images, served by the same servers as the good ones."""
    d = images.dir
    work = tmp_path_factory.mktemp("bad")
    host_file = work / "host-secret.raw"
    host_file.write_bytes(b"host data " * 100_000)
    qemu_img("create", "-f", "qcow2", "-b", str(host_file), "-F", "raw", str(d / "bad-backing.bin"))
    qemu_img("create", "-f", "qcow2", "-o", f"data_file={work / 'data.raw'}", str(d / "bad-datafile.bin"), "8M")
    qemu_img("create", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentFlat", str(work / "desc.vmdk"), "8M")
    (d / "bad-vmdk-descriptor.bin").write_bytes((work / "desc.vmdk").read_bytes())
    qemu_img("create", "-f", "qcow2", str(d / "bad-huge.bin"), "1G")
    data = images.path("qcow2").read_bytes()
    (d / "bad-truncated-qcow2.bin").write_bytes(data[: len(data) // 2])
    vhd = images.path("vhd").read_bytes()
    (d / "bad-truncated-vhd.bin").write_bytes(vhd[: len(vhd) // 2])
    (d / "bad-garbage-qcow2.bin").write_bytes(b"QFI\xfb" + os.urandom(200_000))
    gz = images.path("raw.gz").read_bytes()
    (d / "bad-truncated-gz.bin").write_bytes(gz[: len(gz) // 2])
    (d / "bad-bomb-zeros.gz.bin").write_bytes(gzip.compress(bytes(256 * MiB), 1))
    (d / "bad-bomb-ones.xz.bin").write_bytes(lzma.compress(b"\x01" * (64 * MiB), preset=0))
    subprocess.run(["tar", "-C", str(work), "-czf", str(d / "bad-backing.tar.gz.bin"), "--transform", "s,^,disk/,",
                    "bad.qcow2"], check=False)  # (replaced below when tar lacks the file)
    (work / "disk").mkdir()
    (work / "disk" / "x.img").write_bytes((d / "bad-backing.bin").read_bytes())
    subprocess.run(["tar", "-C", str(work), "-czf", str(d / "bad-backing.tar.gz.bin"), "disk/x.img"], check=True)
    return {"host_file": host_file}


def expect_failure(reason: str, source: dict, target: Target, scratch: str, **kw) -> ImportFailed:
    with pytest.raises(ImportFailed) as info:
        run_import(source, target, scratch, **kw)
    assert info.value.reason == reason, info.value
    assert os.listdir(scratch) == [], "scratch space is cleaned up"
    return info.value


def lun_target(tmp_path, size: int = 16 * MiB) -> tuple[Target, object]:
    lun = block_target(tmp_path, size)
    return Target(str(lun), size), lun


# -- schemes -------------------------------------------------------------------------------------
@pytest.mark.parametrize("source", [
    {"http": {"url": "ftp://127.0.0.1/disk.img"}},
    {"http": {"url": "file:///etc/passwd"}},           # only with the embedded mode's flag
    {"http": {"url": "gopher://127.0.0.1/x"}},
    {"registry": {"url": "https://127.0.0.1/repo:tag"}},
    {"s3": {"url": "ftp://127.0.0.1/bucket/key"}},
    {"http": {"url": "http://127.0.0.1/x", "checksum": "md5:abc"}},
    {"nfs": {"url": "nfs://x"}},
])
def test_unsupported_schemes_and_specs_are_refused(source, tmp_path, scratch):
    target, lun = lun_target(tmp_path)
    expect_failure(errors.INVALID_SOURCE, source, target, scratch)
    assert_zero(lun)


@pytest.mark.parametrize("kind", ["pvc", "snapshot"])
def test_clone_sources_are_not_supported_yet(kind, tmp_path, scratch):
    target, _ = lun_target(tmp_path)
    err = expect_failure(errors.NOT_SUPPORTED, {kind: {"name": "x"}}, target, scratch)
    assert "not supported yet" in err.message


# -- 404, unreachable, untrusted -----------------------------------------------------------------
@pytest.mark.parametrize("server", ["nginx", "py_http"])
def test_404_is_not_found(server, request, tmp_path, scratch):
    target, lun = lun_target(tmp_path)
    expect_failure(errors.NOT_FOUND, {"http": {"url": f"{request.getfixturevalue(server).url}/img/nope.bin"}}, target, scratch)
    assert_zero(lun)


def test_unreachable_host(tmp_path, scratch):
    target, lun = lun_target(tmp_path)
    err = expect_failure(errors.UNREACHABLE, {"http": {"url": f"http://127.0.0.1:{free_port()}/disk.img"}}, target, scratch)
    assert "127.0.0.1" in err.message
    assert_zero(lun)


@pytest.mark.parametrize("configmaps", [None, "other"])
@pytest.mark.parametrize("server", ["nginx", "py_https"])
def test_untrusted_certificate(server, configmaps, request, nginx, pki, tmp_path, scratch):
    base = nginx.https_url if server == "nginx" else request.getfixturevalue(server).url
    spec: dict = {"url": f"{base}/img/qcow2.bin"}
    cms = None
    if configmaps:
        spec["certConfigMap"] = "ca"
        cms = {"ca": {"ca.pem": pki.other_ca_pem}}
    target, lun = lun_target(tmp_path)
    err = expect_failure(errors.UNTRUSTED_CERTIFICATE, {"http": spec}, target, scratch, configmaps=cms)
    assert "certConfigMap" in err.message
    assert_zero(lun)


# -- checksum ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["raw.gz", "qcow2", "raw.tar"])
def test_checksum_mismatch_leaves_nothing(kind, nginx, images, tmp_path, scratch):
    wrong = hashlib.sha256(b"something else").hexdigest()
    target, lun = lun_target(tmp_path)
    expect_failure(errors.CHECKSUM_MISMATCH, {"http": {"url": f"{nginx.url}/img/{kind}.bin", "checksum": f"sha256:{wrong}"}},
                   target, scratch)
    assert_zero(lun)


# -- sizes and bombs -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["bad-bomb-zeros.gz", "bad-bomb-ones.xz"])
def test_decompression_stops_at_the_target_size(name, bad, py_http, tmp_path, scratch):
    target, lun = lun_target(tmp_path)
    err = expect_failure(errors.IMAGE_TOO_LARGE, {"http": {"url": f"{py_http.url}/img/{name}.bin"}}, target, scratch)
    assert str(16 * MiB) in err.message
    assert_zero(lun)


def test_raw_larger_than_the_volume(py_http, tmp_path, scratch):
    target, lun = lun_target(tmp_path, 4 * MiB)
    expect_failure(errors.IMAGE_TOO_LARGE, {"http": {"url": f"{py_http.url}/img/raw.bin"}}, target, scratch)
    assert_zero(lun)


@pytest.mark.parametrize("server", ["nginx", "py_http"])
def test_virtual_size_larger_than_the_volume(server, bad, request, tmp_path, scratch):
    target, lun = lun_target(tmp_path)
    err = expect_failure(errors.IMAGE_TOO_LARGE, {"http": {"url": f"{request.getfixturevalue(server).url}/img/bad-huge.bin"}},
                         target, scratch)
    assert str(1 << 30) in err.message
    assert_zero(lun)


def test_virtual_size_larger_than_the_usable_space_after_filesystem_overhead(nginx, tmp_path, scratch):
    vol = tmp_path / "mnt"
    vol.mkdir()
    # 6 MiB image, 6 MiB volume: 5.5% overhead leaves 5 MiB
    err = expect_failure(errors.IMAGE_TOO_LARGE, {"http": {"url": f"{nginx.url}/img/qcow2.bin"}},
                         Target(str(vol), 6 * MiB, mode="Filesystem"), scratch)
    assert "filesystem overhead" in err.message
    assert os.listdir(vol) == []


# -- redirects ---------------------------------------------------------------------------------------
def test_redirect_loop_is_bounded(py_http, tmp_path, scratch):
    target, _ = lun_target(tmp_path)
    expect_failure(errors.TOO_MANY_REDIRECTS, {"http": {"url": f"{py_http.url}/loop"}}, target, scratch)
    expect_failure(errors.TOO_MANY_REDIRECTS, {"http": {"url": f"{py_http.url}/redirect/11/raw.bin"}}, target, scratch)


def test_redirect_to_a_local_file_is_refused(py_http, tmp_path, scratch):
    target, lun = lun_target(tmp_path)
    expect_failure(errors.INVALID_SOURCE, {"http": {"url": f"{py_http.url}/to-file"}}, target, scratch)
    assert_zero(lun)


# -- images that would read host files -------------------------------------------------------------
@pytest.mark.parametrize("name,reason", [
    ("bad-backing", errors.BACKING_FILE),
    ("bad-datafile", errors.DATA_FILE),
    ("bad-vmdk-descriptor", errors.BACKING_FILE),
    ("bad-backing.tar.gz", errors.BACKING_FILE),
])
@pytest.mark.parametrize("server", ["nginx", "py_http"])
def test_backing_files_and_external_data_are_refused(name, reason, server, bad, request, tmp_path, scratch):
    target, lun = lun_target(tmp_path)
    err = expect_failure(reason, {"http": {"url": f"{request.getfixturevalue(server).url}/img/{name}.bin"}}, target, scratch)
    assert "self-contained" in err.message or "monolithic" in err.message
    assert_zero(lun)


# -- truncated and corrupt -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["bad-truncated-qcow2", "bad-truncated-vhd", "bad-garbage-qcow2", "bad-truncated-gz"])
@pytest.mark.parametrize("server", ["nginx", "py_http"])
def test_truncated_or_corrupt_images_fail_with_the_tools_text(name, server, bad, request, tmp_path, scratch):
    target, lun = lun_target(tmp_path)
    err = expect_failure(errors.INVALID_IMAGE, {"http": {"url": f"{request.getfixturevalue(server).url}/img/{name}.bin"}}, target, scratch)
    assert err.message
    assert_zero(lun)


def test_connection_cut_mid_transfer(py_http, tmp_path, scratch):
    target, lun = lun_target(tmp_path)
    expect_failure(errors.TRANSFER_FAILED, {"http": {"url": f"{py_http.url}/cut/raw.bin"}}, target, scratch)
    assert_zero(lun)


def test_failed_filesystem_import_removes_disk_img(py_http, tmp_path, scratch):
    vol = tmp_path / "mnt"
    vol.mkdir()
    expect_failure(errors.INVALID_IMAGE, {"http": {"url": f"{py_http.url}/img/bad-truncated-gz.bin"}},
                   Target(str(vol), 16 * MiB, mode="Filesystem"), scratch)
    assert os.listdir(vol) == []


# -- credentials -------------------------------------------------------------------------------------
def test_credentials_never_appear_in_messages_or_logs(py_http, nginx, tmp_path, scratch, caplog):
    caplog.set_level(logging.DEBUG)
    target, _ = lun_target(tmp_path)
    port = py_http.url.rsplit(":", 1)[1]
    e1 = expect_failure(errors.NOT_FOUND, {"http": {"url": f"http://user:Pa55-in-url@127.0.0.1:{port}/img/nope.bin"}},
                        target, scratch)
    e2 = expect_failure(errors.UNAUTHORIZED, {"http": {"url": f"{py_http.url}/auth/raw.bin", "secretRef": "s"}}, target,
                        scratch, secrets={"s": {"accessKeyId": "user", "secretKey": "wrong-Pa55word"}})
    e3 = expect_failure(errors.UNAUTHORIZED, {"http": {"url": f"{nginx.url}/auth/qcow2.bin", "secretRef": "s"}}, target,
                        scratch, secrets={"s": {"accessKeyId": "user", "secretKey": "wrong-Pa55word"}})
    e4 = expect_failure(errors.UNREACHABLE, {"http": {"url": f"http://127.0.0.1:{free_port()}/x?token=T0ken-val&x-amz-signature=S1g"}},
                        target, scratch)
    text = " ".join(str(e) for e in (e1, e2, e3, e4)) + caplog.text
    for secret in ("Pa55-in-url", "wrong-Pa55word", "T0ken-val", "S1g"):
        assert secret not in text
    assert "user" not in e1.message  # userinfo is stripped from the URL before anything else


def test_scrub_removes_userinfo_tokens_and_auth_headers():
    text = errors.scrub("GET https://u:p4ss@h/x?X-Amz-Signature=abc&a=1 Authorization: Bearer eyJhbGc.x.y")
    assert "p4ss" not in text and "abc" not in text and "eyJhbGc" not in text and "a=1" in text
