"""CDI's DataVolume behaviour users meet first: a StorageClass made after its DataVolume, a
clone with `storage: {}`, and a source given in the wrong shape refused at apply."""

from __future__ import annotations

import os
import time

from test_datavolume import dv, make_qcow2, same_prefix

MiB = 1 << 20


def status(inst, name: str) -> dict:
    return (inst.get("DataVolume", name) or {}).get("status") or {}


def test_a_datavolume_waits_pending_for_its_storage_class_and_imports_once_it_exists(instance, web):
    raw = make_qcow2(os.path.join(web.root, "later.qcow2"), 16)
    instance.apply(f"""apiVersion: cdi.kubevirt.io/v1beta1
kind: DataVolume
metadata:
  name: later
spec:
  source:
    http:
      url: {web.url}/later.qcow2
  storage:
    storageClassName: made-later
    volumeMode: Block
    resources:
      requests:
        storage: 16Mi
""")
    instance.wait(lambda: status(instance, "later").get("phase") == "Pending"
                  and any(c["type"] == "Bound" for c in status(instance, "later").get("conditions", [])), 30,
                  "the DataVolume Pending")
    instance.wait(lambda: ((instance.get("PersistentVolumeClaim", "later") or {}).get("status") or {}).get("phase")
                  == "Pending", 30, "its claim Pending")
    time.sleep(2)  # a few reconciles later it still waits, not Failed
    st = status(instance, "later")
    bound = next(c for c in st["conditions"] if c["type"] == "Bound")
    assert st["phase"] == "Pending" and bound["status"] == "False" and "StorageClass made-later" in bound["message"]
    assert instance.get("PersistentVolumeClaim", "later") is not None
    events = instance.store.events(instance.get("DataVolume", "later"))
    assert any(e["reason"] == "StorageClassNotFound" and "made-later" in e["message"] for e in events)
    described = instance.cli("describe", "dv", "later").stdout
    assert "StorageClassNotFound" in described
    instance.apply("""apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: made-later
provisioner: csi.pvlun.dev
""")
    instance.wait(lambda: status(instance, "later").get("phase") == "Succeeded", 60, "the import once the class exists")
    assert same_prefix(raw, instance.lun_path("later"))


def test_clones_with_empty_storage_get_the_source_size_and_volume_mode(instance, web):
    raw = make_qcow2(os.path.join(web.root, "empty-src.qcow2"), 40)
    instance.apply(dv("empty-src", f"    http:\n      url: {web.url}/empty-src.qcow2", size="40Mi"), "--wait")
    instance.apply("""apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshot
metadata:
  name: empty-snap
spec:
  source:
    persistentVolumeClaimName: empty-src
---
apiVersion: cdi.kubevirt.io/v1beta1
kind: DataVolume
metadata:
  name: empty-clone
spec:
  source:
    pvc:
      name: empty-src
  storage: {}
---
apiVersion: cdi.kubevirt.io/v1beta1
kind: DataVolume
metadata:
  name: empty-restore
spec:
  source:
    snapshot:
      name: empty-snap
  storage: {}
""", "--wait")
    for name in ("empty-clone", "empty-restore"):
        assert status(instance, name)["phase"] == "Succeeded"
        claim = instance.get("PersistentVolumeClaim", name)
        assert claim["spec"]["volumeMode"] == "Block", name  # the source's, not Filesystem
        assert int(claim["status"]["capacity"]["storage"]) == 40 * MiB, name
        assert same_prefix(raw, instance.lun_path(name))


def test_a_source_given_as_a_string_is_refused_at_apply_naming_the_field(instance):
    for kind, url in (("registry", "docker://127.0.0.1:5000/vm/disk:v1"), ("http", "https://127.0.0.1/disk.img")):
        out = instance.apply(dv(f"wrong-shape-{kind}", f'    {kind}: "{url}"', size="16Mi"), check=False)
        assert out.returncode != 0
        assert f"spec.source.{kind}: must be an object, not a string" in out.stderr, out.stderr
        assert instance.get("DataVolume", f"wrong-shape-{kind}") is None


def test_a_url_of_another_sources_scheme_is_refused_at_apply_saying_which_source_reads_it(instance):
    for kind, url, said in (("http", "docker://quay.io/kubevirt/alpine-container-disk-demo", "use spec.source.registry.url"),
                            ("registry", "https://127.0.0.1/disk.img", "docker://HOST/REPO:TAG"),
                            ("s3", "ftp://127.0.0.1/b/k", "s3://, http://, https://")):
        out = instance.apply(dv(f"wrong-scheme-{kind}", f'    {kind}:\n      url: "{url}"', size="16Mi"), check=False)
        assert out.returncode != 0
        assert f"spec.source.{kind}.url: scheme" in out.stderr and said in out.stderr, out.stderr
        assert instance.get("DataVolume", f"wrong-scheme-{kind}") is None


def test_a_cdi_source_pvlun_leaves_out_is_refused_naming_it_and_what_to_use(instance):
    out = instance.apply("""apiVersion: cdi.kubevirt.io/v1beta1
kind: DataVolume
metadata:
  name: from-vmware
spec:
  source:
    vddk:
      backingFile: "[iSCSI_Datastore] vm/vm_1.vmdk"
      url: "https://vcenter.example.com"
      uuid: "52260566-b032-36cb-55b1-79bf29e30490"
      thumbprint: "20:6C:8A:5D:44:40:B3:79:4B:93:68:4D:5A:4F:5A:A1:0E:3B:C0:DE"
      secretRef: "vddk-credentials"
  storage:
    resources:
      requests:
        storage: 16Mi
""", check=False)
    assert out.returncode != 0
    assert "spec.source.vddk: VMware VDDK imports are not supported" in out.stderr and "spec.source.http" in out.stderr


def test_metrics_drop_the_progress_series_of_a_deleted_datavolume(instance, web):
    import urllib.request

    with open(os.path.join(instance.data_dir, "metrics.url")) as f:
        url = f.read().strip()

    def series(name: str) -> list[str]:
        with urllib.request.urlopen(url, timeout=10) as resp:
            text = resp.read().decode()
        return [ln for ln in text.splitlines()
                if ln.startswith("pvlun_import_progress{") and f'name="{name}"' in ln and 'namespace="default"' in ln]

    make_qcow2(os.path.join(web.root, "metered.qcow2"), 16)
    instance.apply(dv("metered", f"    http:\n      url: {web.url}/metered.qcow2", size="16Mi"), "--wait")
    assert series("metered") and series("metered")[0].endswith(" 100.0")
    instance.cli("delete", "dv", "metered")
    instance.wait(lambda: instance.get("DataVolume", "metered") is None, 30, "the DataVolume gone")
    assert series("metered") == []


def test_a_malformed_checksum_is_refused_at_apply_and_an_empty_one_is_none(instance, web):
    out = instance.apply(dv("bad-sum", f"    http:\n      url: {web.url}/x.qcow2\n      checksum: sha384:{'0' * 96}",
                            size="16Mi"), check=False)
    assert out.returncode != 0
    assert "spec.source.http.checksum: must be <algorithm>:<hex digest> with md5, sha1, sha256 or sha512" in out.stderr
    assert instance.get("DataVolume", "bad-sum") is None
    raw = make_qcow2(os.path.join(web.root, "nosum.qcow2"), 16)
    instance.apply(dv("no-sum", f"    http:\n      url: {web.url}/nosum.qcow2\n      checksum: \"\"", size="16Mi"), "--wait")
    assert same_prefix(raw, instance.lun_path("no-sum"))


def test_a_url_python_cannot_parse_or_holding_a_control_character_is_refused_at_apply_naming_the_field(instance):
    for i, (kind, url, said) in enumerate((("http", "http://[::1", "Invalid IPv6 URL"),
                                           ("http", "http://u:p@127.0.0.1:99999/x", "out of range"),
                                           ("s3", "https://[::1/b/k", "Invalid IPv6 URL"),
                                           ("http", "http://127.0.0.1/d.qcow2\\nHost: x", "control characters"))):
        out = instance.apply(dv(f"bad-url-{i}", f'    {kind}:\n      url: "{url}"', size="16Mi"), check=False)
        assert out.returncode != 0
        assert f"spec.source.{kind}.url:" in out.stderr and said in out.stderr, out.stderr
        assert "Traceback" not in out.stderr and instance.get("DataVolume", f"bad-url-{i}") is None


def test_extra_headers_are_refused_at_apply_as_the_importer_would_refuse_them(instance):
    for i, line in enumerate(("X-A: b\\rHost: evil", "X-A: b\\nHost: evil", "Bad Name: x", "X-Tab\\t: x")):
        source = f'    http:\n      url: http://127.0.0.1/d.qcow2\n      extraHeaders: ["X-Fine: yes", "{line}"]'
        out = instance.apply(dv(f"bad-header-{i}", source, size="16Mi"), check=False)
        assert out.returncode != 0
        assert "spec.source.http.extraHeaders[1]:" in out.stderr, out.stderr
        assert instance.get("DataVolume", f"bad-header-{i}") is None


def test_names_the_api_server_would_refuse_are_refused_at_apply_naming_the_field(instance):
    """A class, a clone source, a DataSource and a label key are names: the API server refuses
    what is no DNS-1123 name (or no qualified name), and so does pvlun apply."""
    pvc = """apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: {name}
{labels}spec:
  storageClassName: {sc}
  accessModes: [ReadWriteOnce]
  resources:
    requests:
      storage: 16Mi
"""
    cases = [
        (pvc.format(name="bad-class", labels="", sc='"../../etc"'), "spec.storageClassName"),
        (pvc.format(name="bad-label", labels='  labels:\n    "a/b/c": "x"\n', sc="pvlun"), 'metadata.labels'),
        (pvc.format(name="bad-label-value", labels='  labels:\n    "app": "../x"\n', sc="pvlun"), "metadata.labels.app"),
        (dv("bad-dv-class", "    blank: {}").replace("    volumeMode:", '    storageClassName: "../../etc"\n    volumeMode:'),
         "spec.storage.storageClassName"),
        (dv("bad-clone-ns", '    pvc: {namespace: "../etc", name: src}'), "spec.source.pvc.namespace"),
        (dv("bad-clone-name", '    pvc: {name: "../../x"}'), "spec.source.pvc.name"),
        (dv("bad-restore", '    snapshot: {name: "x\\0y"}'), "spec.source.snapshot.name"),
        (dv("bad-ref", "    blank: {}").replace("  source:\n    blank: {}\n", "  sourceRef: {kind: DataSource, name: a/b}\n"),
         "spec.sourceRef.name"),
    ]
    for manifest, field in cases:
        out = instance.apply(manifest, check=False)
        assert out.returncode != 0 and field in out.stderr and "Traceback" not in out.stderr, (field, out.stderr)
    for manifest, _field in cases:
        name = manifest.split("name: ", 1)[1].split("\n", 1)[0]
        assert instance.get("PersistentVolumeClaim", name) is None and instance.get("DataVolume", name) is None
    fine = pvc.format(name="fine-labels", labels='  labels:\n    "example.com/tier": "gold_1.x"\n    empty: ""\n',
                      sc='""')
    instance.apply(fine)
    assert instance.get("PersistentVolumeClaim", "fine-labels")["metadata"]["labels"]["example.com/tier"] == "gold_1.x"
    instance.cli("delete", "pvc", "fine-labels")
