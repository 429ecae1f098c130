"""VirtualMachineExport (export.kubevirt.io/v1beta1) on a real `pvlun serve`: the export server
serves a claim, a stopped VM's claims, over HTTPS with a token; `pvlun vmexport download`
fetches them raw (resumable), gzip or qcow2, byte for byte."""

from __future__ import annotations

import gzip
import http.client
import os
import ssl
import subprocess
from urllib.parse import urlsplit

import pytest

from test_datavolume import dv

MiB = 1 << 20
DISK_MIB = 16


def export_yaml(name: str, kind: str, source: str, extra: str = "") -> str:
    group = {"PersistentVolumeClaim": '""', "VirtualMachine": "kubevirt.io",
             "VirtualMachineSnapshot": "snapshot.kubevirt.io"}[kind]
    return f"""apiVersion: export.kubevirt.io/v1beta1
kind: VirtualMachineExport
metadata:
  name: {name}
spec:
  source:
    apiGroup: {group}
    kind: {kind}
    name: {source}
{extra}"""


def block_dv(name: str, url: str) -> str:
    return dv(name, f"    http:\n      url: {url}", size=f"{DISK_MIB}Mi")


@pytest.fixture(scope="module")
def inst(serve):
    return serve("--accel", "tcg")


@pytest.fixture(scope="module")
def disk(inst, web):
    """A Block DataVolume `src` filled with a marker, random data and holes; its LUN's bytes."""
    raw = os.path.join(web.root, "src.img")
    with open(raw, "wb") as f:
        f.truncate(DISK_MIB * MiB)
        f.write(b"PVLUN-EXPORT" * 100)
        f.seek(5 * MiB)
        f.write(os.urandom(3 * MiB))
    inst.apply(block_dv("src", f"{web.url}/src.img"))
    inst.wait(lambda: (inst.get("DataVolume", "src").get("status") or {}).get("phase") == "Succeeded", 60, "src imported")
    with open(inst.lun_path("src"), "rb") as f:
        return f.read()


def status(inst, name: str) -> dict:
    return (inst.get("VirtualMachineExport", name) or {}).get("status") or {}


def ready(inst, name: str, timeout: float = 30) -> dict:
    try:
        inst.wait(lambda: status(inst, name).get("phase") == "Ready", timeout, f"export {name} Ready")
    except AssertionError:
        raise AssertionError(f"export {name}: {status(inst, name)}") from None
    return status(inst, name)


def token_of(inst, name: str) -> str:
    import base64

    secret = inst.get("Secret", status(inst, name)["tokenSecretRef"])
    return base64.b64decode(secret["data"]["token"]).decode()


def condition(st: dict, type_: str) -> dict:
    return next((c for c in st.get("conditions", []) if c["type"] == type_), {})


def get(url: str, cert: str, headers: dict | None = None, path: str | None = None) -> tuple[int, bytes, dict]:
    parts = urlsplit(url)
    conn = http.client.HTTPSConnection(parts.hostname, parts.port, context=ssl.create_default_context(cadata=cert),
                                       timeout=30)
    try:
        conn.request("GET", path if path is not None else parts.path + (f"?{parts.query}" if parts.query else ""),
                     headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read(), dict(resp.getheaders())
    finally:
        conn.close()


def gone(inst, name: str) -> bool:
    return inst.get("VirtualMachineExport", name) is None


def delete_export(inst, name: str) -> None:
    inst.cli("vmexport", "delete", name)
    inst.wait(lambda: gone(inst, name), 30, f"export {name} gone")


def test_a_pvc_export_serves_the_claim_raw_and_gzip_byte_exact_with_its_token(inst, disk, tmp_path):
    inst.apply(export_yaml("pvc-export", "PersistentVolumeClaim", "src"))
    st = ready(inst, "pvc-export")
    assert condition(st, "Ready")["reason"] == "PodReady" and condition(st, "PVCReady")["reason"] == "PVCBound"
    assert st["tokenSecretRef"] == "export-token-pvc-export" and st["ttlExpirationTime"]
    link = st["links"]["external"]
    assert link["cert"].startswith("-----BEGIN CERTIFICATE-----") and st["links"]["internal"]["volumes"]
    [volume] = link["volumes"]
    assert volume["name"] == "src"
    formats = {f["format"]: f["url"] for f in volume["formats"]}
    assert formats["raw"].endswith("/volumes/src/disk.img") and formats["gzip"].endswith("/volumes/src/disk.img.gz")
    token = token_of(inst, "pvc-export")

    code, body, headers = get(formats["raw"], link["cert"], {"x-kubevirt-export-token": token})
    assert code == 200 and body == disk and headers["Accept-Ranges"] == "bytes"
    code, body, _ = get(formats["gzip"], link["cert"], {"x-kubevirt-export-token": token})
    assert code == 200 and gzip.decompress(body) == disk
    code, body, headers = get(formats["raw"], link["cert"], {"x-kubevirt-export-token": token,
                                                              "Range": f"bytes={5 * MiB}-{5 * MiB + 99}"})
    assert code == 206 and body == disk[5 * MiB:5 * MiB + 100]
    assert headers["Content-Range"] == f"bytes {5 * MiB}-{5 * MiB + 99}/{len(disk)}"
    code, body, _ = get(formats["raw"] + f"?x-kubevirt-export-token={token}", link["cert"])  # as KubeVirt takes it
    assert code == 200 and body == disk

    out = tmp_path / "src.raw"
    inst.cli("vmexport", "download", "pvc-export", "--output", str(out), "--format", "raw")
    assert out.read_bytes() == disk
    assert out.stat().st_blocks * 512 < len(disk)  # the holes stay holes
    out_gz = tmp_path / "src.img.gz"
    inst.cli("vmexport", "download", "pvc-export", "--output", str(out_gz))  # gzip, virtctl's default
    assert gzip.decompress(out_gz.read_bytes()) == disk
    delete_export(inst, "pvc-export")


def test_wrong_missing_token_and_other_paths_are_refused(inst, disk):
    inst.apply(export_yaml("guarded", "PersistentVolumeClaim", "src"))
    st = ready(inst, "guarded")
    link = st["links"]["external"]
    raw = link["volumes"][0]["formats"][0]["url"]
    token = token_of(inst, "guarded")
    assert get(raw, link["cert"])[0] == 401
    assert get(raw, link["cert"], {"x-kubevirt-export-token": token[:-1] + ("x" if token[-1] != "x" else "y")})[0] == 401
    assert get(raw, link["cert"], {"x-kubevirt-export-token": ""})[0] == 401
    good = {"x-kubevirt-export-token": token}
    for path in ("/volumes/../../etc/passwd", "/volumes/src/../../etc/passwd", "/volumes/%2e%2e/disk.img",
                 "/volumes/other/disk.img", "/volumes/src/disk.qcow2", "/volumes/src/", "/etc/passwd", "/",
                 "/volumes/src/disk.img/x", "/volumes//disk.img", "/volumes/src/disk.img.gz/.."):
        code, body, _ = get(raw, link["cert"], good, path=path)
        assert code == 404, (path, code, body[:100])
    assert get(raw, link["cert"], good)[0] == 200
    # a client that does not trust this export's certificate never talks to it
    with pytest.raises(ssl.SSLCertVerificationError):
        get(raw, _other_cert(), good)
    delete_export(inst, "guarded")


def _other_cert() -> str:
    from importer.upload_server import certificate_pem

    return certificate_pem(("127.0.0.1",))[0].decode()


def test_a_download_cut_off_midway_resumes_with_range_and_ends_byte_exact(inst, disk, tmp_path):
    inst.apply(export_yaml("resumed", "PersistentVolumeClaim", "src"))
    link = ready(inst, "resumed")["links"]["external"]
    raw = link["volumes"][0]["formats"][0]["url"]
    code, _, headers = get(raw, link["cert"], {"x-kubevirt-export-token": token_of(inst, "resumed"),
                                               "Range": "bytes=0-0"})
    assert code == 206 and headers["ETag"].startswith('"')
    out = tmp_path / "resumed.raw"
    with open(str(out) + ".part", "wb") as f:  # what a run cut off at 6 MiB left behind, and its ETag
        f.write(disk[:6 * MiB + 12345])
    with open(str(out) + ".part.etag", "w") as f:
        f.write(headers["ETag"])
    inst.cli("vmexport", "download", "resumed", "--output", str(out), "--format", "raw")
    assert out.read_bytes() == disk and not os.path.exists(str(out) + ".part")
    assert not os.path.exists(str(out) + ".part.etag")
    delete_export(inst, "resumed")


def test_qcow2_download_compares_equal_with_qemu_img(inst, disk, tmp_path):
    out = tmp_path / "src.qcow2"
    inst.cli("vmexport", "download", "made-by-download", "--pvc", "src", "--output", str(out), "--format", "qcow2")
    info = subprocess.run(["qemu-img", "info", "--output=json", str(out)], capture_output=True, text=True, check=True)
    assert '"format": "qcow2"' in info.stdout
    raw = tmp_path / "lun.raw"
    raw.write_bytes(disk)
    subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(raw), str(out)], check=True)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".pvlun-vmexport-") or p.endswith(".raw.part")]
    inst.wait(lambda: gone(inst, "made-by-download"), 30, "the export the download made is deleted")


def test_ttl_expiry_terminates_the_export_and_stops_its_server(inst, disk):
    inst.apply(export_yaml("short", "PersistentVolumeClaim", "src", "  ttlDuration: 4s\n"))
    st = ready(inst, "short")
    link = st["links"]["external"]
    url = link["volumes"][0]["formats"][0]["url"]
    inst.wait(lambda: status(inst, "short").get("phase") == "Terminated" or gone(inst, "short"), 30, "Terminated")
    with pytest.raises(OSError):  # the server is gone
        get(url, link["cert"], {"x-kubevirt-export-token": "whatever"})
    inst.wait(lambda: gone(inst, "short"), 30, "the terminated export deleted")
    assert not [a for a in inst.store.list("VolumeAttachment") if a["spec"]["owner"] == "vmexport/default/short"]
    assert inst.get("Secret", "export-token-short") is None


def test_export_deleted_stops_the_server_and_leaves_nothing(inst, disk):
    inst.apply(export_yaml("cleanup", "PersistentVolumeClaim", "src"))
    st = ready(inst, "cleanup")
    link = st["links"]["external"]
    url = link["volumes"][0]["formats"][0]["url"]
    assert [a for a in inst.store.list("VolumeAttachment") if a["spec"]["owner"] == "vmexport/default/cleanup"]
    delete_export(inst, "cleanup")
    with pytest.raises(OSError):
        get(url, link["cert"], {"x-kubevirt-export-token": "whatever"})
    assert not [a for a in inst.store.list("VolumeAttachment") if a["spec"]["owner"] == "vmexport/default/cleanup"]
    inst.wait(lambda: inst.get("Secret", "export-token-cleanup") is None, 30, "the token secret collected")


def test_an_export_with_its_own_token_secret_uses_it(inst, disk):
    inst.apply("""apiVersion: v1
kind: Secret
metadata:
  name: my-token
stringData:
  token: my-own-secret-token
""")
    inst.apply(export_yaml("own-token", "PersistentVolumeClaim", "src", "  tokenSecretRef: my-token\n"))
    st = ready(inst, "own-token")
    assert st["tokenSecretRef"] == "my-token" and inst.get("Secret", "export-token-own-token") is None
    link = st["links"]["external"]
    url = link["volumes"][0]["formats"][0]["url"]
    assert get(url, link["cert"], {"x-kubevirt-export-token": "my-own-secret-token",
                                   "Range": "bytes=0-11"})[1] == b"PVLUN-EXPORT"
    delete_export(inst, "own-token")
    assert inst.get("Secret", "my-token") is not None  # the user's, not the export's


def test_an_invalid_export_is_refused_naming_the_field(inst):
    proc = inst.apply(export_yaml("bad", "PersistentVolumeClaim", "src", "  ttlDuration: soon\n"), check=False)
    assert proc.returncode == 1 and "spec.ttlDuration" in proc.stderr and "Traceback" not in proc.stderr
    bad_kind = export_yaml("bad", "PersistentVolumeClaim", "src").replace("kind: PersistentVolumeClaim", "kind: Pod")
    proc = inst.apply(bad_kind, check=False)
    assert proc.returncode == 1 and "spec.source.kind" in proc.stderr


def two_disk_vm(name: str, image_url: str, strategy: str, claim: str) -> str:
    from virt.guest_images import tick_vm_manifest

    vm = tick_vm_manifest(name, image_url, strategy=strategy, access="ReadWriteOnce")
    return vm.replace("          - name: root\n            bootOrder: 1\n            disk:\n              bus: virtio\n",
                      "          - name: root\n            bootOrder: 1\n            disk:\n              bus: virtio\n"
                      "          - name: data\n            disk:\n              bus: virtio\n") + \
        f"      - name: data\n        persistentVolumeClaim:\n          claimName: {claim}\n"


def test_a_stopped_vm_export_lists_and_serves_each_of_its_volumes(inst, disk, tick_image, tmp_path):
    inst.apply(two_disk_vm("halted", tick_image, "Halted", "src"))
    inst.wait(lambda: (inst.get("DataVolume", "halted-root") or {}).get("status", {}).get("phase") == "Succeeded",
              60, "halted-root imported")
    inst.apply(export_yaml("vm-export", "VirtualMachine", "halted"))
    st = ready(inst, "vm-export")
    assert st["virtualMachineName"] == "halted"
    assert sorted(v["name"] for v in st["links"]["external"]["volumes"]) == ["halted-root", "src"]
    proc = inst.cli("vmexport", "download", "vm-export", "--output", str(tmp_path / "x"), check=False)
    assert proc.returncode == 1 and "--volume" in proc.stderr and "Traceback" not in proc.stderr
    out = tmp_path / "data.raw"
    inst.cli("vmexport", "download", "vm-export", "--volume", "src", "--output", str(out), "--raw")
    assert out.read_bytes() == disk
    root = tmp_path / "root.raw"
    inst.cli("vmexport", "download", "vm-export", "--volume", "halted-root", "--output", str(root), "--raw")
    with open(inst.lun_path("halted-root"), "rb") as f:
        assert root.read_bytes() == f.read()
    delete_export(inst, "vm-export")
    inst.cli("delete", "vm", "halted")


def test_a_claim_a_running_vm_uses_waits_until_the_vm_stops(inst, tick_image):
    out = inst.apply(tick_vm_yaml_for("busy", tick_image), "--wait")
    assert "virtualmachine/busy Running" in out.stdout, out.stdout + out.stderr
    inst.apply(export_yaml("busy-disk", "PersistentVolumeClaim", "busy-root"))
    inst.apply(export_yaml("busy-vm", "VirtualMachine", "busy"))
    inst.wait(lambda: condition(status(inst, "busy-disk"), "Ready").get("reason") == "InUse", 30, "busy-disk InUse")
    inst.wait(lambda: condition(status(inst, "busy-vm"), "Ready").get("reason") == "InUse", 30, "busy-vm InUse")
    assert "busy-root is in use" in condition(status(inst, "busy-disk"), "Ready")["message"]
    assert "busy is running" in condition(status(inst, "busy-vm"), "Ready")["message"]
    import time

    time.sleep(4)  # looked at again meanwhile: still waiting, nothing served
    for name in ("busy-disk", "busy-vm"):
        assert status(inst, name)["phase"] == "Pending" and "links" not in status(inst, name)
    assert not [a for a in inst.store.list("VolumeAttachment") if a["spec"]["owner"].startswith("vmexport/")]
    inst.cli("vm", "stop", "busy", "--wait", "--timeout", "60")
    # stopped: one export gets the claim; the other waits for it, as KubeVirt waits for another exporter Pod
    first = inst.wait(lambda: next((n for n in ("busy-disk", "busy-vm") if status(inst, n).get("phase") == "Ready"), None),
                      30, "one export Ready")
    second = "busy-vm" if first == "busy-disk" else "busy-disk"
    inst.wait(lambda: f"attached for vmexport/default/{first}" in condition(status(inst, second), "Ready").get("message", ""),
              30, f"{second} waiting for {first}")
    delete_export(inst, first)
    st = ready(inst, second)
    assert [v["name"] for v in st["links"]["external"]["volumes"]] == ["busy-root"]
    delete_export(inst, second)
    inst.cli("delete", "vm", "busy")


def tick_vm_yaml_for(name: str, image_url: str) -> str:
    from virt.guest_images import tick_vm_manifest

    return tick_vm_manifest(name, image_url, access="ReadWriteOnce")


def test_a_vm_snapshot_export_serves_its_volumes_restored_from_their_volume_snapshots(inst, disk, tmp_path):
    """The snapshot's VirtualMachineSnapshotContent (KubeVirt's shape, written here as its
    controller would) names a VolumeSnapshot per volume; the export restores each into a
    claim it owns, serves it, and deletes it with itself."""
    from manifests import snapshot

    inst.apply(snapshot("src-snap", "src"))
    inst.wait(lambda: (inst.get("VolumeSnapshot", "src-snap").get("status") or {}).get("readyToUse"), 30, "src-snap")
    claim_spec = {k: v for k, v in inst.get("PersistentVolumeClaim", "src")["spec"].items() if k != "volumeName"}
    inst.store.apply({"apiVersion": "snapshot.kubevirt.io/v1beta1", "kind": "VirtualMachineSnapshotContent",
                      "metadata": {"name": "vmsnapshot-content-snap", "namespace": "default"},
                      "spec": {"source": {"virtualMachine": {"metadata": {"name": "halted"}}},
                               "volumeBackups": [{"volumeName": "data", "volumeSnapshotName": "src-snap",
                                                  "persistentVolumeClaim": {"metadata": {"name": "src"},
                                                                            "spec": claim_spec}}]},
                      "status": {"readyToUse": True}})
    inst.store.apply({"apiVersion": "snapshot.kubevirt.io/v1beta1", "kind": "VirtualMachineSnapshot",
                      "metadata": {"name": "snap", "namespace": "default"},
                      "spec": {"source": {"apiGroup": "kubevirt.io", "kind": "VirtualMachine", "name": "halted"}},
                      "status": {"readyToUse": True, "virtualMachineSnapshotContentName": "vmsnapshot-content-snap"}})
    inst.apply(export_yaml("snap-export", "VirtualMachineSnapshot", "snap"))
    st = ready(inst, "snap-export", 60)
    assert [v["name"] for v in st["links"]["external"]["volumes"]] == ["src"] and st["virtualMachineName"] == "halted"
    restored = inst.get("PersistentVolumeClaim", "snap-export-src")
    assert restored["spec"]["dataSource"] == {"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot",
                                              "name": "src-snap"}
    out = tmp_path / "snap.raw"
    inst.cli("vmexport", "download", "snap-export", "--output", str(out), "--raw")
    assert out.read_bytes() == disk
    delete_export(inst, "snap-export")
    inst.wait(lambda: inst.get("PersistentVolumeClaim", "snap-export-src") is None, 30, "the restored claim deleted")


def test_a_datavolume_imports_the_exported_url_with_the_cert_and_token_as_cdi_takes_them(inst, disk):
    """The round trip KubeVirt documents: CDI's http source on the export's gzip URL, its
    certificate in a ConfigMap (ca.pem), its token as a secretExtraHeaders header."""
    import base64
    import json

    inst.apply(export_yaml("for-cdi", "PersistentVolumeClaim", "src"))
    st = ready(inst, "for-cdi")
    link = st["links"]["external"]
    url = next(f["url"] for f in link["volumes"][0]["formats"] if f["format"] == "gzip")
    header = base64.b64encode(f"x-kubevirt-export-token:{token_of(inst, 'for-cdi')}".encode()).decode()
    inst.apply(json.dumps({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "export-ca"},
                           "data": {"ca.pem": link["cert"]}}))
    inst.apply(json.dumps({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "export-header"},
                           "data": {"token": header}}))
    inst.apply(block_dv("copy", url).replace(f"      url: {url}\n", f"      url: {url}\n      certConfigMap: export-ca\n"
                                             "      secretExtraHeaders: [export-header]\n"))
    inst.wait(lambda: (inst.get("DataVolume", "copy").get("status") or {}).get("phase") in ("Succeeded", "Failed"), 60,
              "copy imported")
    assert inst.get("DataVolume", "copy")["status"]["phase"] == "Succeeded", inst.get("DataVolume", "copy")["status"]
    with open(inst.lun_path("copy"), "rb") as f:
        assert f.read() == disk
    delete_export(inst, "for-cdi")
    inst.cli("delete", "dv", "copy")


def test_a_filesystem_claim_is_exported_as_the_disk_img_it_holds(inst, web, tmp_path):
    raw = os.path.join(web.root, "fs.img")
    with open(raw, "wb") as f:
        f.truncate(4 * MiB)
        f.write(b"PVLUN-FS-EXPORT")
        f.seek(2 * MiB)
        f.write(os.urandom(MiB))
    inst.apply(dv("fs-src", f"    http:\n      url: {web.url}/fs.img", size="32Mi", mode="Filesystem"))
    inst.wait(lambda: (inst.get("DataVolume", "fs-src").get("status") or {}).get("phase") == "Succeeded", 60, "fs-src")
    inst.apply(export_yaml("fs-export", "PersistentVolumeClaim", "fs-src"))
    ready(inst, "fs-export")
    out = tmp_path / "fs.raw"
    inst.cli("vmexport", "download", "fs-export", "--output", str(out), "--raw")
    data, source = out.read_bytes(), open(raw, "rb").read()
    assert data[:len(source)] == source and data[len(source):].count(0) == len(data) - len(source)
    delete_export(inst, "fs-export")


def test_after_a_daemon_restart_the_export_is_served_again(daemons, web, tmp_path_factory, tmp_path):
    """Nothing that ran is assumed to run after a restart: the export's attachment was undone
    with the others, and the export is served again by a new server (new port, new certificate)."""
    start, stop = daemons
    data_dir = str(tmp_path_factory.mktemp("pvlun-restart"))
    first = start(data_dir)
    try:
        raw = os.path.join(web.root, "restart.img")
        with open(raw, "wb") as f:
            f.write(os.urandom(MiB))
        first.apply(block_dv("again", f"{web.url}/restart.img"))
        first.wait(lambda: (first.get("DataVolume", "again").get("status") or {}).get("phase") == "Succeeded", 60,
                   "imported")
        first.apply(export_yaml("again", "PersistentVolumeClaim", "again"))
        before = ready(first, "again")["links"]["external"]
    finally:
        stop(first)
    second = start(data_dir)
    try:
        second.wait(lambda: status(second, "again").get("phase") == "Ready"
                    and status(second, "again")["links"]["external"]["cert"] != before["cert"], 30, "served again")
        out = tmp_path / "again.raw"
        second.cli("vmexport", "download", "again", "--output", str(out), "--raw")
        with open(second.lun_path("again"), "rb") as f:
            assert out.read_bytes() == f.read()
        delete_export(second, "again")
    finally:
        stop(second)
