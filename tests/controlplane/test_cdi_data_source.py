"""CDI's DataSource and a DataVolume's spec.sourceRef through `pvlun serve`: the DataSource
names a golden image's claim, and what refers to it (a DataVolume, a VM's dataVolumeTemplates)
gets a clone of it, byte for byte."""

from __future__ import annotations

import os

from manifests import clone_grant
from test_datavolume import dv, make_qcow2, same_prefix


def data_source(name: str, namespace: str, source: str) -> str:
    return f"""apiVersion: cdi.kubevirt.io/v1beta1
kind: DataSource
metadata:
  name: {name}
  namespace: {namespace}
spec:
  source:
{source}
"""


def by_ref(name: str, ds: str, ds_namespace: str | None = None) -> str:
    ns_line = f"\n    namespace: {ds_namespace}" if ds_namespace else ""
    return f"""apiVersion: cdi.kubevirt.io/v1beta1
kind: DataVolume
metadata:
  name: {name}
spec:
  sourceRef:
    kind: DataSource
    name: {ds}{ns_line}
  storage:
    volumeMode: Block
    accessModes: [ReadWriteOnce]
    resources:
      requests:
        storage: 64Mi
"""


def ready(inst, name: str, namespace: str = "default") -> tuple[str, str]:
    ds = inst.get("DataSource", name, namespace) or {}
    cond = next((c for c in (ds.get("status") or {}).get("conditions", []) if c["type"] == "Ready"), {})
    return cond.get("status", ""), cond.get("reason", "")


def test_data_source_follows_its_claim_and_a_source_ref_clones_it_byte_exact(instance, web):
    raw = make_qcow2(os.path.join(web.root, "golden.qcow2"))
    instance.apply(clone_grant("os-images", "default"))  # CDI asks the source namespace's grant for a clone
    instance.apply(data_source("fedora", "os-images", "    pvc:\n      name: fedora-golden"))
    instance.wait(lambda: ready(instance, "fedora", "os-images") == ("False", "NotFound"), 20, "DataSource NotFound")
    # a DataVolume referring to a DataSource not there yet waits (Pending), then goes on
    instance.apply(by_ref("early", "fedora-later", "os-images"))
    instance.wait(lambda: any(e["reason"] == "DataSourceNotFound"
                              for e in instance.store.events(instance.get("DataVolume", "early"))), 20, "the wait told")
    assert instance.get("DataVolume", "early")["status"]["phase"] == "Pending"
    instance.apply(data_source("fedora-later", "os-images", "    pvc:\n      name: fedora-golden"))
    golden = dv("fedora-golden", f"    http:\n      url: {web.url}/golden.qcow2").replace(
        "metadata:\n  name: fedora-golden", "metadata:\n  name: fedora-golden\n  namespace: os-images")
    instance.apply(golden, "--wait")
    instance.wait(lambda: ready(instance, "fedora", "os-images") == ("True", "Ready"), 20, "DataSource Ready")
    out = instance.apply(by_ref("from-ref", "fedora", "os-images"), "--wait")
    assert "Succeeded" in out.stdout
    for name in ("from-ref", "early"):
        instance.wait(lambda: (instance.get("DataVolume", name).get("status") or {}).get("phase") == "Succeeded",
                      60, f"{name} Succeeded")
        assert same_prefix(raw, instance.lun_path(name))
    pvc = instance.get("PersistentVolumeClaim", "from-ref")
    assert pvc["spec"]["dataSource"] == {"kind": "PersistentVolumeClaim", "name": "fedora-golden",
                                         "namespace": "os-images"}


def test_data_source_of_a_missing_or_empty_source_is_not_ready(instance):
    instance.apply(data_source("nothing", "default", "    {}"))
    instance.wait(lambda: ready(instance, "nothing") == ("False", "NoSource"), 20, "DataSource NoSource")
    instance.apply(data_source("snap", "default", "    snapshot:\n      name: no-such-snapshot"))
    instance.wait(lambda: ready(instance, "snap") == ("False", "NotFound"), 20, "snapshot DataSource NotFound")


def test_source_ref_is_checked_at_apply(instance):
    both = by_ref("both", "fedora").replace("spec:\n", "spec:\n  source:\n    blank: {}\n", 1)
    out = instance.apply(both, check=False)
    assert out.returncode != 0 and "spec.source and spec.sourceRef" in out.stderr
    wrong = by_ref("wrong-kind", "fedora").replace("kind: DataSource", "kind: PersistentVolumeClaim")
    out = instance.apply(wrong, check=False)
    assert out.returncode != 0 and "spec.sourceRef.kind: must be DataSource" in out.stderr
    out = instance.apply(data_source("two", "default", "    pvc:\n      name: a\n    snapshot:\n      name: b"), check=False)
    assert out.returncode != 0 and "spec.source: name one of pvc, snapshot" in out.stderr


def test_vm_data_volume_template_with_source_ref_boots_the_golden_image(instance, tick_image, tick_vm_yaml):
    instance.apply(dv("tick-golden", f"    http:\n      url: {tick_image}", size="8Mi"), "--wait")
    instance.apply(data_source("tick", "default", "    pvc:\n      name: tick-golden"))
    vm = tick_vm_yaml("golden-vm", tick_image).replace(
        f"      source:\n        http:\n          url: {tick_image}\n",
        "      sourceRef:\n        kind: DataSource\n        name: tick\n")
    assert "sourceRef" in vm
    instance.apply(vm)
    instance.wait(lambda: "PVLUN-BOOT" in instance.all_serial_logs("golden-vm"), 90, "golden-vm boots")
    pvc = instance.get("PersistentVolumeClaim", "golden-vm-root")
    assert pvc["spec"]["dataSource"]["name"] == "tick-golden"
    instance.cli("delete", "vm", "golden-vm")


def test_a_snapshot_data_source_restores_byte_exact_once_the_snapshot_is_ready(instance, web):
    raw = make_qcow2(os.path.join(web.root, "snapgold.qcow2"))
    instance.apply(data_source("snap-golden", "default", "    snapshot:\n      name: gold-snap"))
    instance.apply(dv("gold-src", f"    http:\n      url: {web.url}/snapgold.qcow2"), "--wait")
    instance.wait(lambda: ready(instance, "snap-golden")[1] in ("NotFound", "SnapshotNotReady"), 20, "not ready yet")
    instance.apply("""apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshot
metadata:
  name: gold-snap
spec:
  source:
    persistentVolumeClaimName: gold-src
""")
    instance.wait(lambda: ready(instance, "snap-golden") == ("True", "Ready"), 30, "snapshot DataSource Ready")
    instance.apply(by_ref("from-snap", "snap-golden"), "--wait")
    pvc = instance.get("PersistentVolumeClaim", "from-snap")
    assert pvc["spec"]["dataSource"]["kind"] == "VolumeSnapshot" and pvc["spec"]["dataSource"]["name"] == "gold-snap"
    assert same_prefix(raw, instance.lun_path("from-snap"))
