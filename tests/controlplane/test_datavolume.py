"""DataVolumes through the embedded control plane: pvlun apply → claim → CSI volume → bytes."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

MiB = 1 << 20


def make_qcow2(path: str, size_mib: int = 32) -> str:
    """A qcow2 holding a marker and random data; returns the raw file it was made from."""
    raw = path + ".raw"
    with open(raw, "wb") as f:
        f.truncate(size_mib * MiB)
        f.seek(MiB)
        f.write(b"PVLUN-DV-MARKER" * 100)
        f.seek(8 * MiB)
        f.write(os.urandom(2 * MiB))
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, path], check=True)
    return raw


def dv(name: str, source: str, size: str = "64Mi", mode: str = "Block", api: str = "storage") -> str:
    return f"""apiVersion: cdi.kubevirt.io/v1beta1
kind: DataVolume
metadata:
  name: {name}
spec:
  source:
{source}
  {api}:
    volumeMode: {mode}
    accessModes: [ReadWriteOnce]
    resources:
      requests:
        storage: {size}
"""


def upload_ready(inst, name: str) -> None:
    inst.wait(lambda: (inst.get("DataVolume", name).get("status") or {}).get("phase") == "UploadReady",
              what=f"{name} UploadReady")


def start_upload(inst, name: str, length: int, first: bytes):
    """An upload by hand into DataVolume `name`: headers declaring `length` bytes and the body's
    first bytes, on a TLS connection left open (the caller sends more, reads the answer, or drops it)."""
    import socket
    import ssl

    from importer.upload_gateway import endpoint, mint_token

    url, ca = endpoint(inst.data_dir)
    host, port = url.removeprefix("https://").split(":")
    conn = ssl.create_default_context(cafile=ca).wrap_socket(socket.create_connection((host, int(port))),
                                                             server_hostname=host)
    conn.sendall((f"PUT /v1beta1/upload HTTP/1.1\r\nHost: {host}\r\n"
                  f"Authorization: Bearer {mint_token(inst.data_dir, 'default', name)}\r\n"
                  f"Content-Length: {length}\r\n\r\n").encode() + first)
    return conn


def same_prefix(raw: str, lun: str) -> bool:
    size = os.path.getsize(raw)
    with open(raw, "rb") as a, open(lun, "rb") as b:
        return a.read() == b.read(size)


def test_http_qcow2_into_block_volume_lands_byte_exact(instance, web):
    raw = make_qcow2(os.path.join(web.root, "a.qcow2"))
    out = instance.apply(dv("http-block", f"    http:\n      url: {web.url}/a.qcow2"), "--wait")
    assert "Succeeded" in out.stdout
    status = instance.get("DataVolume", "http-block")["status"]
    assert status["phase"] == "Succeeded" and status["progress"] == "100.0%" and status["claimName"] == "http-block"
    conditions = {c["type"]: c["status"] for c in status["conditions"]}
    assert conditions == {"Bound": "True", "Ready": "True", "Running": "False"}
    assert same_prefix(raw, instance.lun_path("http-block"))


def test_cdi_documentation_datavolume_works_unchanged_into_filesystem_volume(instance, web):
    raw = make_qcow2(os.path.join(web.root, "doc.qcow2"))
    manifest = f"""apiVersion: cdi.kubevirt.io/v1beta1
kind: DataVolume
metadata:
  name: fedora
spec:
  source:
      http:
         url: "{web.url}/doc.qcow2"
  storage:
    resources:
      requests:
        storage: 64Mi
"""
    instance.apply(manifest, "--wait")
    export = os.path.join(web.root, "fedora.raw")
    instance.cli("export", "pvc", "fedora", "-o", export)
    assert same_prefix(raw, export)
    assert os.path.getsize(export) == 64 * MiB  # spec.storage: the disk has the size asked for


def test_http_404_fails_with_reason_and_leaves_no_claim(instance, web):
    out = instance.apply(dv("missing", f"    http:\n      url: {web.url}/nope.qcow2"), "--wait", check=False)
    assert out.returncode == 1
    assert "404" in out.stderr
    obj = instance.get("DataVolume", "missing")
    assert obj["status"]["phase"] == "Failed"
    running = next(c for c in obj["status"]["conditions"] if c["type"] == "Running")
    assert running["reason"] == "NotFound" and "404" in running["message"]
    instance.wait(lambda: instance.get("PersistentVolumeClaim", "missing") is None, what="claim removed")
    described = instance.cli("describe", "dv", "missing").stdout
    assert "NotFound" in described and "Events:" in described


def test_apply_refuses_bad_datavolume_naming_the_field(instance):
    out = instance.apply(dv("bad-size", "    blank: {}", size="lots"), check=False)
    assert out.returncode == 1
    assert "spec.storage.resources.requests.storage" in out.stderr
    assert instance.get("DataVolume", "bad-size") is None


def test_blank_filesystem_datavolume_gets_a_disk_image(instance):
    instance.apply(dv("blank-fs", "    blank: {}", size="32Mi", mode="Filesystem"), "--wait")
    assert instance.get("DataVolume", "blank-fs")["status"]["phase"] == "Succeeded"


def test_image_upload_creates_datavolume_and_lands_byte_exact(instance, tmp_path):
    image = str(tmp_path / "up.qcow2")
    raw = make_qcow2(image, 16)
    out = instance.cli("image-upload", "--dv", "uploaded", "--image-path", image, "--size", "32Mi", "--block-volume")
    assert "complete" in out.stdout
    assert same_prefix(raw, instance.lun_path("uploaded"))


def test_upload_token_request_as_cdi_documents_it_then_a_plain_https_upload(instance, tmp_path):
    """CDI's flow: a DataVolume with an upload source, an UploadTokenRequest for its claim (the
    token printed, never stored), then the image sent with any HTTPS client (curl in CDI's
    docs) to the upload endpoint, -async path included."""
    import http.client
    import re
    import ssl
    from urllib.parse import urlsplit

    image = str(tmp_path / "token.qcow2")
    raw = make_qcow2(image, 16)
    instance.apply(dv("by-token", "    upload: {}", size="32Mi"))
    upload_ready(instance, "by-token")
    out = instance.apply("""apiVersion: upload.cdi.kubevirt.io/v1beta1
kind: UploadTokenRequest
metadata:
  name: by-token
  namespace: default
spec:
  pvcName: by-token
""").stdout
    assert "uploadtokenrequest/by-token created" in out
    token = re.search(r"valid \d+ minutes\): (\S+)", out).group(1)
    ca, url = re.search(r"--cacert (\S+) .* (https://\S+)", out).groups()
    assert instance.cli("get", "uploadtokenrequest", "by-token", check=False).returncode != 0  # never stored
    parts = urlsplit(url)
    assert parts.path == "/v1beta1/upload"  # the command printed is the one to run

    def post(path: str) -> http.client.HTTPResponse:
        conn = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=120,
                                           context=ssl.create_default_context(cafile=ca))
        with open(image, "rb") as f:
            conn.request("POST", path, body=f, headers={"Authorization": f"Bearer {token}",
                                                        "Content-Length": str(os.path.getsize(image))})
            return conn.getresponse()

    resp = post("/v1beta1/upload-async")
    assert resp.status == 200, resp.read()
    instance.wait(lambda: instance.get("DataVolume", "by-token")["status"]["phase"] == "Succeeded", what="upload done")
    assert same_prefix(raw, instance.lun_path("by-token"))
    bad = instance.apply(dv("x", "    blank: {}") + "---\napiVersion: upload.cdi.kubevirt.io/v1beta1\n"
                         "kind: UploadTokenRequest\nmetadata: {name: t}\nspec: {pvcName: ../etc}\n", check=False)
    assert bad.returncode == 1 and "spec.pvcName '../etc' is not a valid name" in bad.stderr
    assert instance.get("DataVolume", "x") is None  # a refused manifest applies nothing


def test_pvc_source_clones_through_csi(instance, web):
    raw = make_qcow2(os.path.join(web.root, "c.qcow2"))
    instance.apply(dv("clone-src", f"    http:\n      url: {web.url}/c.qcow2"), "--wait")
    instance.apply(dv("clone-dst", "    pvc:\n      name: clone-src\n      namespace: default"), "--wait")
    assert instance.get("DataVolume", "clone-dst")["status"]["phase"] == "Succeeded"
    assert same_prefix(raw, instance.lun_path("clone-dst"))


def test_deleting_datavolume_deletes_its_claim_and_volume(instance):
    instance.apply(dv("short-lived", "    blank: {}", size="16Mi"), "--wait")
    lun = instance.lun_path("short-lived")
    assert os.path.exists(lun)
    instance.cli("delete", "dv", "short-lived")
    instance.wait(lambda: instance.get("PersistentVolumeClaim", "short-lived") is None, what="claim gone")
    instance.wait(lambda: not os.path.exists(lun), what="LUN deleted")


def test_commands_needing_the_daemon_say_so_plainly(tmp_path):
    import sys

    proc = subprocess.run([sys.executable, "-m", "pvlun.cli", "apply", "-f", "-", "--data-dir", str(tmp_path)],
                          input=dv("x", "    blank: {}"), capture_output=True, text=True)
    assert proc.returncode == 1
    assert "no pvlun serve is running" in proc.stderr and "Traceback" not in proc.stderr


def test_pvc_clone_across_volume_modes_copies_the_disk_host_assisted(instance, web):
    raw = make_qcow2(os.path.join(web.root, "x.qcow2"))
    instance.apply(dv("fs-src", f"    http:\n      url: {web.url}/x.qcow2", mode="Filesystem"), "--wait")
    instance.apply(dv("blk-dst", "    pvc:\n      name: fs-src", size="64Mi", mode="Block"), "--wait")
    obj = instance.get("DataVolume", "blk-dst")
    assert obj["status"]["phase"] == "Succeeded"
    assert "host-assisted" in instance.cli("describe", "dv", "blk-dst").stdout
    assert same_prefix(raw, instance.lun_path("blk-dst"))  # the disk itself, not the source's filesystem


def test_upload_cut_off_halfway_is_upload_ready_again_on_a_fresh_volume_and_can_be_sent_again(instance, tmp_path):
    import socket
    import ssl

    from importer.upload_gateway import endpoint, mint_token

    image = str(tmp_path / "cut.qcow2")
    raw = make_qcow2(image, 16)
    instance.apply(dv("cut", "    upload: {}", size="32Mi"))
    instance.wait(lambda: (instance.get("DataVolume", "cut").get("status") or {}).get("phase") == "UploadReady",
                  what="UploadReady")
    first_lun = instance.lun_path("cut")
    url, ca = endpoint(instance.data_dir)
    host, port = url.removeprefix("https://").split(":")
    body = open(image, "rb").read()
    tls = ssl.create_default_context(cafile=ca)
    with socket.create_connection((host, int(port))) as raw_sock, tls.wrap_socket(raw_sock, server_hostname=host) as s:
        s.sendall((f"POST /v1beta1/upload HTTP/1.1\r\nHost: {host}\r\n"
                   f"Authorization: Bearer {mint_token(instance.data_dir, 'default', 'cut')}\r\n"
                   f"Content-Length: {len(body)}\r\n\r\n").encode() + body[: len(body) // 2])
    instance.wait(lambda: any(e["reason"] == "UploadInterrupted"
                              for e in instance.store.events(instance.get("DataVolume", "cut"))), what="interrupted event")
    instance.wait(lambda: instance.get("DataVolume", "cut")["status"].get("phase") == "UploadReady"
                  and instance.get("DataVolume", "cut")["status"].get("restartCount") == 1, what="UploadReady again")
    assert not os.path.exists(first_lun)  # the half-written volume is gone, not reused
    out = instance.cli("image-upload", "--dv", "cut", "--image-path", image)
    assert "complete" in out.stdout
    assert same_prefix(raw, instance.lun_path("cut"))


def test_upload_larger_than_its_volume_is_refused_with_413_and_the_datavolume_stays_upload_ready(instance, tmp_path):
    instance.apply(dv("too-big", "    upload: {}", size="16Mi"))
    upload_ready(instance, "too-big")
    lun = instance.lun_path("too-big")
    with start_upload(instance, "too-big", 1 << 30, os.urandom(64 * 1024)) as conn:
        answer = b"".join(iter(lambda: conn.recv(4096), b"")).decode()
    assert answer.startswith("HTTP/1.1 413") and "ImageTooLarge" in answer and str(1 << 30) in answer
    status = instance.get("DataVolume", "too-big")["status"]
    assert status["phase"] == "UploadReady" and status.get("restartCount", 0) == 0
    assert instance.lun_path("too-big") == lun and instance.get("PersistentVolumeClaim", "too-big") is not None
    image = tmp_path / "fits.raw"
    image.write_bytes(os.urandom(MiB) + bytes(3 * MiB))
    assert "complete" in instance.cli("image-upload", "--dv", "too-big", "--image-path", str(image)).stdout
    assert same_prefix(str(image), lun)


def test_archive_datavolume_with_a_link_chain_out_of_its_volume_fails_and_writes_nothing_outside(instance, web,
                                                                                                  tmp_path):
    """CVE-2025-4517's link chain in a contentType archive tar: Failed with the reason, nothing
    created outside the volume (the chain climbs to / from wherever the volume is mounted)."""
    import tarfile

    from hostile_tar import link_chain_escape, tar_entries

    outside = tmp_path / "outside"
    outside.mkdir()
    chain, escape = link_chain_escape()
    tar_entries(Path(web.root) / "escape.tar", chain + [(f"{escape}{outside}/pwned.txt", tarfile.REGTYPE, "pwned")])
    manifest = dv("escape", f"    http:\n      url: {web.url}/escape.tar", size="32Mi", mode="Filesystem")
    manifest = manifest.replace("spec:\n", "spec:\n  contentType: archive\n")
    out = instance.apply(manifest, "--wait", check=False)
    assert out.returncode == 1
    running = next(c for c in instance.get("DataVolume", "escape")["status"]["conditions"] if c["type"] == "Running")
    assert running["reason"] == "InvalidImage" and "archive" in running["message"], running
    assert "Traceback" not in running["message"] and "Errno" not in running["message"]
    assert list(outside.iterdir()) == []


def test_names_that_could_reach_a_path_are_refused(instance):
    for bad in ("../../etc", "UPPER", "a/b", "-dash"):
        out = instance.apply(dv(bad, "    blank: {}"), check=False)
        assert out.returncode == 1 and "metadata.name" in out.stderr, (bad, out.stderr)
    out = instance.cli("apply", "-f", "-", "-n", "../x", input=dv("fine", "    blank: {}"), check=False)
    assert out.returncode == 2 and "--namespace" in out.stderr


def test_catalog_holding_secrets_is_readable_by_its_owner_only(instance):
    import stat

    instance.apply("apiVersion: v1\nkind: Secret\nmetadata:\n  name: creds\nstringData:\n  accessKeyId: u\n  secretKey: p\n")
    for name in ("catalog.db", "catalog.db-wal"):
        mode = stat.S_IMODE(os.stat(os.path.join(instance.data_dir, name)).st_mode)
        assert mode == 0o600, (name, oct(mode))


def test_clones_applied_together_with_their_source_wait_for_it_and_get_its_size(instance, web):
    raw = make_qcow2(os.path.join(web.root, "together.qcow2"))
    manifest = dv("tog-src", f"    http:\n      url: {web.url}/together.qcow2", size="48Mi") + "---\n" + """\
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshot
metadata:
  name: tog-snap
spec:
  source:
    persistentVolumeClaimName: tog-src
---
apiVersion: cdi.kubevirt.io/v1beta1
kind: DataVolume
metadata:
  name: tog-clone
spec:
  source:
    pvc:
      name: tog-src
  storage:
    volumeMode: Block
---
apiVersion: cdi.kubevirt.io/v1beta1
kind: DataVolume
metadata:
  name: tog-restore
spec:
  source:
    snapshot:
      name: tog-snap
  storage:
    volumeMode: Block
"""
    instance.apply(manifest, "--wait")
    for name in ("tog-clone", "tog-restore"):
        assert instance.get("DataVolume", name)["status"]["phase"] == "Succeeded"
        capacity = int(instance.get("PersistentVolumeClaim", name)["status"]["capacity"]["storage"])
        assert capacity == 48 * MiB  # no size given: the source's
        assert same_prefix(raw, instance.lun_path(name))


def test_clone_smaller_than_its_source_is_refused(instance, web):
    instance.apply(dv("big-src", "    blank: {}", size="64Mi"), "--wait")
    out = instance.apply(dv("small-clone", "    pvc:\n      name: big-src", size="32Mi"), "--wait", "--timeout", "30",
                         check=False)
    assert out.returncode == 1 and "smaller than the source" in out.stderr


def test_failed_datavolume_shows_its_claim_gone_and_the_reason_in_ready(instance, web):
    instance.apply(dv("gone", f"    http:\n      url: {web.url}/absent.qcow2"), "--wait", check=False)
    conditions = {c["type"]: c for c in instance.get("DataVolume", "gone")["status"]["conditions"]}
    assert conditions["Bound"]["status"] == "False" and conditions["Bound"]["reason"] == "ClaimDeleted"
    assert conditions["Ready"]["reason"] == "NotFound" and "404" in conditions["Ready"]["message"]


def test_datavolume_volume_attributes_class_reaches_its_claim_and_volume(instance):
    instance.apply("""apiVersion: storage.k8s.io/v1beta1
kind: VolumeAttributesClass
metadata:
  name: dv-qos
driverName: csi.pvlun.dev
parameters:
  maxIOPS: "300"
""")
    manifest = dv("qos-dv", "    blank: {}", size="16Mi").replace("    volumeMode: Block\n",
                                                                   "    volumeMode: Block\n    volumeAttributesClassName: dv-qos\n")
    instance.apply(manifest, "--wait")
    pvc = instance.get("PersistentVolumeClaim", "qos-dv")
    assert pvc["spec"]["volumeAttributesClassName"] == "dv-qos"
    pv = instance.get("PersistentVolume", pvc["spec"]["volumeName"])
    assert pv["spec"]["csi"]["volumeAttributes"]["maxIOPS"] == "300"


def test_data_dir_goes_before_or_after_the_command_and_an_empty_dir_is_not_an_instance(instance, tmp_path):
    import sys

    instance.apply(dv("where", "    blank: {}", size="8Mi"), "--wait")
    before = subprocess.run([sys.executable, "-m", "pvlun.cli", "--data-dir", instance.data_dir, "get", "dv", "where"],
                            capture_output=True, text=True)
    assert before.returncode == 0 and "where" in before.stdout and "Succeeded" in before.stdout
    empty = subprocess.run([sys.executable, "-m", "pvlun.cli", "get", "dv", "--data-dir", str(tmp_path)],
                           capture_output=True, text=True)
    assert empty.returncode == 1 and "not a pvlun instance" in empty.stderr
    assert not os.path.exists(tmp_path / "catalog.db")
