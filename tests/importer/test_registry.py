"""containerDisk images from Debian's docker-registry (TLS, htpasswd basic auth), pushed by
skopeo from an OCI layout built here; the disk under disk/ lands byte-exact."""

from __future__ import annotations

import hashlib
import warnings

import pytest

from importer import errors
from importer.errors import ImportFailed
from importer.pipeline import Target

from importer_support import MiB, assert_disk, assert_zero, block_target, run_import, stop
from registry_support import build_oci_layout, push_image, serve_registry

CREDS = {"reg": {"accessKeyId": "puller", "secretKey": "reg-Pa55"}}


@pytest.fixture(scope="module")
def registry(images, pki, tmp_path_factory):
    d = tmp_path_factory.mktemp("registry")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt  # bcrypt for htpasswd (Python 3.11's crypt, backed by libxcrypt)

        hashed = crypt.crypt("reg-Pa55", crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16))
    (d / "htpasswd").write_text(f"puller:{hashed}\n")
    proc, host = serve_registry(d, pki, f"auth:\n  htpasswd: {{realm: pvlun-test, path: {d / 'htpasswd'}}}\n")
    qcow2 = images.path("qcow2").read_bytes()
    raw = images.path("raw").read_bytes()
    pushes = {
        "vm/qcow2:v1": [({"disk/disk.img": qcow2}, "gzip")],
        "vm/raw:v1": [({"disk/disk.raw": raw}, "zstd"), ({"etc/motd": b"hello\n"}, "gzip")],
        "vm/nodisk:v1": [({"etc/motd": b"hello\n"}, "gzip")],
    }
    for ref, layers in pushes.items():
        layout = d / ref.replace("/", "_").replace(":", "_")
        build_oci_layout(layout, "v1", layers)
        push_image(layout, "v1", pki, f"docker://{host}/{ref}", "puller:reg-Pa55")
    yield host
    stop(proc)


def reg_source(host: str, ref: str, **extra) -> dict:
    return {"registry": {"url": f"docker://{host}/{ref}", "secretRef": "reg", "certConfigMap": "ca", **extra}}


@pytest.mark.parametrize("ref,kind", [("vm/qcow2:v1", "qcow2"), ("vm/raw:v1", "raw")])
def test_container_disk_lands_byte_exact(ref, kind, registry, images, pki, tmp_path, scratch):
    lun = block_target(tmp_path)
    result, progress = run_import(reg_source(registry, ref), Target(str(lun), 16 * MiB), scratch,
                                  secrets=CREDS, configmaps={"ca": {"ca.pem": pki.ca_pem}})
    assert result.format == kind and result.method == ("scratch" if kind == "qcow2" else "stream")
    assert_disk(lun, images.expected[kind], 16 * MiB)
    assert progress[-1] == 100.0


def test_registry_checksum_is_of_the_disk_file(registry, images, pki, tmp_path, scratch):
    good = hashlib.sha256(images.path("qcow2").read_bytes()).hexdigest()
    cms = {"ca": {"ca.pem": pki.ca_pem}}
    lun = block_target(tmp_path)
    run_import(reg_source(registry, "vm/qcow2:v1", checksum=f"sha256:{good}"), Target(str(lun), 16 * MiB), scratch,
               secrets=CREDS, configmaps=cms)
    assert_disk(lun, images.expected["qcow2"])
    lun2 = block_target(tmp_path, name="other.img")
    with pytest.raises(ImportFailed) as info:
        run_import(reg_source(registry, "vm/qcow2:v1", checksum="sha256:" + "0" * 64), Target(str(lun2), 16 * MiB),
                   scratch, secrets=CREDS, configmaps=cms)
    assert info.value.reason == errors.CHECKSUM_MISMATCH
    assert_zero(lun2)


@pytest.mark.parametrize("ref,secrets,cms,reason", [
    ("vm/missing:v1", CREDS, True, errors.NOT_FOUND),
    ("vm/qcow2:nope", CREDS, True, errors.NOT_FOUND),
    ("vm/nodisk:v1", CREDS, True, errors.INVALID_SOURCE),
    ("vm/qcow2:v1", {"reg": {"accessKeyId": "puller", "secretKey": "wrong-Pa55"}}, True, errors.UNAUTHORIZED),
    ("vm/qcow2:v1", CREDS, False, errors.UNTRUSTED_CERTIFICATE),
])
def test_registry_failures(ref, secrets, cms, reason, registry, pki, tmp_path, scratch):
    lun = block_target(tmp_path)
    with pytest.raises(ImportFailed) as info:
        run_import(reg_source(registry, ref) if cms else {"registry": {"url": f"docker://{registry}/{ref}", "secretRef": "reg"}},
                   Target(str(lun), 16 * MiB), scratch, secrets=secrets, configmaps={"ca": {"ca.pem": pki.ca_pem}})
    assert info.value.reason == reason, info.value
    assert "Pa55" not in str(info.value)
    assert_zero(lun)


def test_registry_insecure_skip_verify_needs_no_ca(registry, images, tmp_path, scratch):
    """`insecureSkipVerify: true`: a registry whose CA nobody gave is pulled from anyway (the
    same source without it is UntrustedCertificate, test_registry_failures)."""
    lun = block_target(tmp_path)
    source = {"registry": {"url": f"docker://{registry}/vm/qcow2:v1", "secretRef": "reg", "insecureSkipVerify": True}}
    result, _ = run_import(source, Target(str(lun), 16 * MiB), scratch, secrets=CREDS)
    assert result.format == "qcow2"
    assert_disk(lun, images.expected["qcow2"], 16 * MiB)
