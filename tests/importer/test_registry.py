"""containerDisk images from Debian's docker-registry (TLS, htpasswd basic auth), pushed by
skopeo from an OCI layout built here; the disk under disk/ lands byte-exact."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import tarfile
import warnings
from pathlib import Path

import pytest
import zstandard

from importer import errors
from importer.errors import ImportFailed
from importer.pipeline import Target

from importer_support import MiB, assert_disk, assert_zero, block_target, free_port, run_import, stop, wait_port

CREDS = {"reg": {"accessKeyId": "puller", "secretKey": "reg-Pa55"}}


def _tar_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted({str(Path(n).parent) for n in files} - {"."}):
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def build_oci_layout(root: Path, tag: str, layers: list[tuple[dict[str, bytes], str]]) -> None:
    """An OCI image layout with one manifest; each layer is (files, "gzip"|"zstd")."""
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)

    def put(data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return "sha256:" + digest

    descs, diff_ids = [], []
    for files, comp in layers:
        raw = _tar_bytes(files)
        diff_ids.append("sha256:" + hashlib.sha256(raw).hexdigest())
        blob = gzip.compress(raw, 1) if comp == "gzip" else zstandard.ZstdCompressor().compress(raw)
        descs.append({"mediaType": f"application/vnd.oci.image.layer.v1.tar+{comp}", "digest": put(blob), "size": len(blob)})
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": diff_ids},
                         "config": {}}).encode()
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": put(config),
                                      "size": len(config)},
                           "layers": descs}).encode()
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": put(manifest), "size": len(manifest),
        "annotations": {"org.opencontainers.image.ref.name": tag}}]}))


@pytest.fixture(scope="module")
def registry(images, pki, tmp_path_factory):
    d = tmp_path_factory.mktemp("registry")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt  # bcrypt for htpasswd (Python 3.11's crypt, backed by libxcrypt)

        hashed = crypt.crypt("reg-Pa55", crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16))
    (d / "htpasswd").write_text(f"puller:{hashed}\n")
    port = free_port()
    (d / "config.yml").write_text(f"""
version: 0.1
log: {{level: error}}
storage:
  filesystem: {{rootdirectory: {d / 'data'}}}
http:
  addr: 127.0.0.1:{port}
  tls: {{certificate: {pki.cert_file}, key: {pki.key_file}}}
auth:
  htpasswd: {{realm: pvlun-test, path: {d / 'htpasswd'}}}
""")
    proc = subprocess.Popen(["docker-registry", "serve", str(d / "config.yml")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_port(port, proc)
    host = f"127.0.0.1:{port}"
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
        subprocess.run(["skopeo", "--insecure-policy", "copy", "-q", "--dest-cert-dir", pki.cert_dir,
                        "--dest-creds", "puller:reg-Pa55", f"oci:{layout}:v1", f"docker://{host}/{ref}"],
                       check=True, capture_output=True)
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
