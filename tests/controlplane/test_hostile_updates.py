"""`pvlun apply` of objects that exist, as `kubectl apply` against an API server: what the
controllers set and the manifest leaves out is kept (a re-applied claim stays bound to its
volume), a field the manifest stops setting goes, and what may not change (a claim's class,
access modes or a smaller size, a DataVolume's spec, a snapshot's source, a StorageClass's
parameters, ...) is refused in one line naming the field, with nothing stored. Sources that
would wait on themselves are refused too, and a new object never shows the events of a
deleted namesake."""

from __future__ import annotations

import hashlib
import os
import time

import pytest
import yaml
from test_datavolume import dv, make_qcow2
from test_hostile_claims import claim, snapshot
from test_hostile_yaml import assert_one_line_refusal

from controlplane.object_update import LAST_APPLIED


def refused(inst, manifest: str, fragment: str) -> None:
    """Applying `manifest` is one line naming `fragment`, exit 1, and stores nothing."""
    before = inst.store.version()
    proc = inst.apply(manifest, check=False)
    assert_one_line_refusal(proc, 0.0, fragment)
    assert inst.store.version() == before


def lun_digest(inst, name: str) -> str:
    with open(inst.lun_path(name), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_reapplying_an_unchanged_claim_keeps_its_volume_so_snapshots_and_deletion_work(instance):
    manifest = claim("kept", "Block")
    instance.apply(manifest, "--wait")
    bound = instance.get("PersistentVolumeClaim", "kept")
    volume, lun = bound["spec"]["volumeName"], instance.lun_path("kept")
    assert instance.apply(manifest).stdout.strip() == "persistentvolumeclaim/kept unchanged"
    labelled = manifest.replace("  name: kept\n", "  name: kept\n  labels: {tier: gold}\n")
    assert instance.apply(labelled).stdout.strip() == "persistentvolumeclaim/kept configured"
    again = instance.get("PersistentVolumeClaim", "kept")
    assert again["spec"]["volumeName"] == volume and again["spec"]["storageClassName"] == "pvlun"
    assert again["metadata"]["labels"] == {"tier": "gold"} and again["status"]["phase"] == "Bound"
    instance.apply(snapshot("kept-snap", "kept"))
    instance.wait(lambda: (instance.get("VolumeSnapshot", "kept-snap").get("status") or {}).get("readyToUse"), 30,
                  "the snapshot of the re-applied claim ready")
    instance.cli("delete", "volumesnapshot", "kept-snap")
    instance.cli("delete", "pvc", "kept")
    instance.wait(lambda: instance.get("PersistentVolume", volume) is None and not os.path.exists(lun), 30,
                  "the claim's volume and LUN deleted with it")


def test_a_field_the_manifest_stops_setting_goes_and_one_it_never_set_stays(instance):
    def config_map(labels: str) -> str:
        return f"apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: merged, labels: {{{labels}}}}}\ndata: {{a: '1'}}\n"

    instance.apply(config_map("a: x, b: y"))
    instance.cli("annotate", "configmap", "merged", "note=kept")  # set by someone else, never in the manifest
    instance.apply(config_map("a: z"))
    meta = instance.get("ConfigMap", "merged")["metadata"]
    assert meta["labels"] == {"a": "z"}
    assert meta["annotations"]["note"] == "kept"
    assert yaml.safe_load(meta["annotations"][LAST_APPLIED])["metadata"]["labels"] == {"a": "z"}


@pytest.fixture(scope="module")
def existing(instance, web):
    """One object of each kind with update rules, as applied (and made ready) before the tests."""
    make_qcow2(os.path.join(web.root, "first.qcow2"), 16)
    make_qcow2(os.path.join(web.root, "second.qcow2"), 16)
    manifests = {
        "class": "apiVersion: storage.k8s.io/v1\nkind: StorageClass\nmetadata: {name: fixed}\n"
                 "provisioner: csi.pvlun.dev\nparameters: {fsType: ext4}\nallowVolumeExpansion: true\n",
        "claim": claim("rules", "Block"),
        "dv": dv("imported", f"    http:\n      url: {web.url}/first.qcow2", size="32Mi"),
        "snapshot": snapshot("rules-snap", "rules"),
        "attributes": "apiVersion: storage.k8s.io/v1beta1\nkind: VolumeAttributesClass\nmetadata: {name: fixed-qos}\n"
                      "driverName: csi.pvlun.dev\nparameters: {maxIOPS: '100'}\n",
        "configmap": "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: sealed}\nimmutable: true\ndata: {a: '1'}\n",
    }
    instance.apply(manifests["class"])
    instance.apply(manifests["claim"] + "---\n" + manifests["dv"], "--wait")
    instance.apply(manifests["snapshot"] + "---\n" + manifests["attributes"] + "---\n" + manifests["configmap"])
    instance.wait(lambda: (instance.get("VolumeSnapshot", "rules-snap").get("status") or {}).get("readyToUse"), 30,
                  "the snapshot ready")
    return manifests


# (case, which manifest, (old, new) text replacement, the field the refusal must name)
IMMUTABLE = [
    ("claim class", "claim", ("spec:\n", "spec:\n  storageClassName: fixed\n"), "spec.storageClassName: field is immutable"),
    ("claim access modes", "claim", ("[ReadWriteOnce]", "[ReadWriteMany]"), "spec.accessModes: field is immutable"),
    ("claim volume mode", "claim", ("volumeMode: Block", "volumeMode: Filesystem"), "spec.volumeMode: field is immutable"),
    ("claim shrinking", "claim", ("storage: 16Mi", "storage: 8Mi"),
     "spec.resources.requests.storage: field can not be less than previous value"),
    ("DataVolume source", "dv", ("first.qcow2", "second.qcow2"), "spec.source.http.url: a DataVolume's spec cannot"),
    ("DataVolume size", "dv", ("storage: 32Mi", "storage: 64Mi"), "spec.storage.resources.requests.storage: a Data"),
    ("snapshot source", "snapshot", ("ClaimName: rules", "ClaimName: other"),
     "spec.source.persistentVolumeClaimName: field is immutable"),
    ("class parameters", "class", ("fsType: ext4", "fsType: xfs"), "parameters.fsType: field is immutable"),
    ("class provisioner", "class", ("csi.pvlun.dev", "other.example.com"), "provisioner: field is immutable"),
    ("attributes parameters", "attributes", ("'100'", "'900'"), "parameters.maxIOPS: field is immutable"),
    ("immutable ConfigMap", "configmap", ("a: '1'", "a: '2'"), "data.a: field is immutable"),
]


@pytest.mark.parametrize("case,which,change,fragment", IMMUTABLE, ids=[c[0] for c in IMMUTABLE])
def test_an_update_to_an_immutable_field_is_one_line_naming_it_and_stores_nothing(instance, existing, case, which,
                                                                                 change, fragment):
    old, new = change
    assert old in existing[which]
    refused(instance, existing[which].replace(old, new), fragment)


def test_a_succeeded_datavolume_applied_again_with_another_source_keeps_its_data(instance, existing, web):
    before = instance.get("DataVolume", "imported")
    digest = lun_digest(instance, "imported")
    refused(instance, existing["dv"].replace("first.qcow2", "second.qcow2"), "delete it and create it again")
    assert instance.apply(existing["dv"]).stdout.strip() == "datavolume/imported unchanged"
    time.sleep(2)  # time for an import to start over, were one to
    after = instance.get("DataVolume", "imported")
    assert after["status"]["phase"] == "Succeeded" and after["status"] == before["status"]
    assert lun_digest(instance, "imported") == digest  # no second import ran over it


def test_what_may_change_does(instance, existing):
    grown = existing["claim"].replace("storage: 16Mi", "storage: 32Mi")
    assert "configured" in instance.apply(grown).stdout
    instance.wait(lambda: instance.get("PersistentVolumeClaim", "rules")["status"]["capacity"]["storage"]
                  == str(32 << 20), 30, "the claim grown")
    qos = grown.replace("spec:\n", "spec:\n  volumeAttributesClassName: fixed-qos\n")
    assert "configured" in instance.apply(qos).stdout
    instance.wait(lambda: instance.get("PersistentVolumeClaim", "rules")["status"].get(
        "currentVolumeAttributesClassName") == "fixed-qos", 30, "the claim's attributes class applied")
    expanding = existing["class"].replace("allowVolumeExpansion: true", "allowVolumeExpansion: false")
    assert "configured" in instance.apply(expanding).stdout


def test_a_virtual_machine_spec_may_change(instance):
    from test_hostile_yaml import vm

    instance.apply(vm("mutable"))
    changed = vm("mutable").replace("memory: 64Mi", "memory: 96Mi")
    assert instance.apply(changed).stdout.strip() == "virtualmachine/mutable configured"
    spec = instance.get("VirtualMachine", "mutable")["spec"]
    assert spec["template"]["spec"]["domain"]["resources"]["requests"]["memory"] == "96Mi"
    instance.cli("delete", "vm", "mutable")


def test_a_source_that_comes_back_to_its_own_claim_is_refused(instance):
    """A claim waiting on a source that does not exist yet; the source, applied later, would
    be cloned from the claim: both would wait forever."""
    waiting = claim("loop-a", "Block").replace("spec:\n", "spec:\n  dataSource: {kind: PersistentVolumeClaim, "
                                                         "name: loop-b}\n")
    instance.apply(waiting)
    closing = dv("loop-b", "    pvc: {name: loop-a}", size="16Mi")
    refused(instance, closing, "spec.source: its volume would be filled from itself "
                               "(claim default/loop-b → claim default/loop-a → claim default/loop-b)")
    instance.cli("delete", "pvc", "loop-a")


def test_a_new_object_never_shows_the_events_of_a_deleted_namesake(instance):
    instance.apply(dv("reborn", "    blank: {}", size="8Mi"), "--wait")
    first = instance.get("DataVolume", "reborn")
    assert "ImportSucceeded" in {e["reason"] for e in instance.store.events(first)}
    instance.cli("delete", "dv", "reborn")
    instance.wait(lambda: instance.get("DataVolume", "reborn") is None, 10, "the DataVolume gone")
    instance.store.add_event(first, "Warning", "LateNews", "written after the old one was deleted")
    instance.apply(dv("reborn", "    upload: {}", size="8Mi"))
    instance.wait(lambda: (instance.get("DataVolume", "reborn").get("status") or {}).get("phase") == "UploadReady",
                  what="the new DataVolume UploadReady")
    shown = instance.cli("describe", "dv", "reborn").stdout
    assert "UploadReady" in shown
    assert "ImportSucceeded" not in shown and "LateNews" not in shown
    instance.cli("delete", "dv", "reborn")
