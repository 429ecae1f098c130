"""Hostile: claims that would undo a volume's privacy, through the embedded control plane.

- A snapshot of a Block volume is not restored as a Filesystem volume (nor the reverse)
  unless its VolumeSnapshotContent carries Kubernetes'
  snapshot.storage.kubernetes.io/allow-volume-mode-change annotation. The embedded
  snapshotter records the content as external-snapshotter does (sourceVolumeMode,
  snapshotHandle); the provisioner refuses the mismatched restore with ProvisioningFailed
  saying what to do; `pvlun annotate` allows it.
- A plain claim clone (dataSource: PersistentVolumeClaim) keeps its source's volume mode, as
  the external-provisioner insists; a DataVolume clone still copies across modes.
- A StorageClass's mountOptions reach the volume's mounts (nosuid,nodev kept unless it
  asks suid/dev); dangerous ones fail provisioning with the driver's reason.
"""

from __future__ import annotations

import pytest
import yaml

from manifests import snapshot
from controlplane import kubelet
from controlplane.csi_client import CsiClient

MiB = 1 << 20
ALLOW = "snapshot.storage.kubernetes.io/allow-volume-mode-change"


def claim(name: str, mode: str, snapshot: str | None = None, clone_of: str | None = None) -> str:
    source = f"""  dataSource:
    apiGroup: snapshot.storage.k8s.io
    kind: VolumeSnapshot
    name: {snapshot}
""" if snapshot else ""
    if clone_of:
        source = f"""  dataSource:
    kind: PersistentVolumeClaim
    name: {clone_of}
"""
    return f"""apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: {name}
spec:
  volumeMode: {mode}
  accessModes: [ReadWriteOnce]
  resources:
    requests:
      storage: 16Mi
{source}"""


def condition(instance, claim_name: str) -> dict:
    pvc = instance.get("PersistentVolumeClaim", claim_name) or {}
    return next((c for c in (pvc.get("status") or {}).get("conditions", []) if c["type"] == "Provisioned"), {})


def phase(instance, claim_name: str) -> str:
    return ((instance.get("PersistentVolumeClaim", claim_name) or {}).get("status") or {}).get("phase", "")


@pytest.mark.parametrize("source_mode, other_mode", [("Block", "Filesystem"), ("Filesystem", "Block")])
def test_restoring_a_snapshot_into_another_volume_mode_needs_the_annotation(instance, source_mode, other_mode):
    tag = source_mode.lower()
    src, snap = f"src-{tag}", f"snap-{tag}"
    instance.apply(claim(src, source_mode), "--wait")
    marker = f"PVLUN-{tag}-MARKER".encode()
    with open(instance.lun_path(src), "r+b") as f:
        f.write(marker)
    instance.apply(snapshot(snap, src))
    vs = instance.wait(lambda: (instance.get("VolumeSnapshot", snap).get("status") or {}).get("readyToUse")
                       and instance.get("VolumeSnapshot", snap), what="the snapshot ready")
    content_name = vs["status"]["boundVolumeSnapshotContentName"]

    # the content, as external-snapshotter makes it, for users to see and annotate
    listing = instance.cli("get", "volumesnapshotcontent").stdout
    assert content_name in listing and source_mode in listing
    content = yaml.safe_load(instance.cli("get", "vsc", content_name, "-o", "yaml").stdout)
    assert content["spec"]["sourceVolumeMode"] == source_mode
    assert content["spec"]["volumeSnapshotRef"]["name"] == snap
    assert content["status"]["snapshotHandle"] == vs["status"]["snapshotHandle"] and content["status"]["readyToUse"]

    # the same mode restores; the other mode is refused, saying how to allow it
    instance.apply(claim(f"same-{tag}", source_mode, snap), "--wait")
    with open(instance.lun_path(f"same-{tag}"), "rb") as f:
        assert f.read(len(marker)) == marker
    other = f"other-{tag}"
    instance.apply(claim(other, other_mode, snap))
    refused = instance.wait(lambda: condition(instance, other).get("reason") == "ProvisioningFailed"
                            and condition(instance, other), what="the restore refused")
    assert f"taken of a {source_mode} volume" in refused["message"]
    assert f"pvlun annotate volumesnapshotcontent {content_name} {ALLOW}=true" in refused["message"]
    assert phase(instance, other) == "Pending" and not instance.get("PersistentVolumeClaim", other)["spec"].get("volumeName")
    described = instance.cli("describe", "pvc", other).stdout
    assert "ProvisioningFailed" in described and "allow-volume-mode-change" in described
    assert len([pv for pv in instance.store.list("PersistentVolume")
                if pv["spec"]["claimRef"]["name"] == other]) == 0

    out = instance.cli("annotate", "vsc", content_name, f"{ALLOW}=true")
    assert f"volumesnapshotcontent/{content_name} annotated" in out.stdout
    instance.wait(lambda: phase(instance, other) == "Bound", what="the allowed restore bound")
    with open(instance.lun_path(other), "rb") as f:
        assert f.read(len(marker)) == marker  # the bytes as they were, read the other way

    for name in (other, f"same-{tag}"):
        instance.cli("delete", "pvc", name)
    instance.cli("delete", "volumesnapshot", snap)
    instance.wait(lambda: instance.get("VolumeSnapshotContent", content_name, "") is None,
                  what="the content deleted with its snapshot")
    instance.cli("delete", "pvc", src)


@pytest.mark.parametrize("source_mode, other_mode", [("Block", "Filesystem"), ("Filesystem", "Block")])
def test_cloning_a_claim_into_another_volume_mode_is_provisioning_failed(instance, source_mode, other_mode):
    tag = source_mode.lower()
    src = f"clone-src-{tag}"
    instance.apply(claim(src, source_mode), "--wait")
    marker = f"PVLUN-GUEST-{tag}".encode()  # what a guest (or a filesystem) wrote
    with open(instance.lun_path(src), "r+b") as f:
        f.write(marker)

    other = f"clone-other-{tag}"
    instance.apply(claim(other, other_mode, clone_of=src))
    refused = instance.wait(lambda: condition(instance, other).get("reason") == "ProvisioningFailed"
                            and condition(instance, other), what="the clone refused")
    assert f"claim default/{src} is a {source_mode} volume" in refused["message"]
    assert f"must be volumeMode {source_mode}, not {other_mode}" in refused["message"]
    assert phase(instance, other) == "Pending" and not instance.get("PersistentVolumeClaim", other)["spec"].get("volumeName")
    assert not [pv for pv in instance.store.list("PersistentVolume") if pv["spec"]["claimRef"]["name"] == other]
    assert "ProvisioningFailed" in instance.cli("describe", "pvc", other).stdout

    same = f"clone-same-{tag}"  # the same mode clones, bytes and all
    instance.apply(claim(same, source_mode, clone_of=src), "--wait")
    with open(instance.lun_path(same), "rb") as f:
        assert f.read(len(marker)) == marker

    for name in (other, same):
        instance.cli("delete", "pvc", name)
    instance.cli("delete", "pvc", src)


def test_a_datavolume_still_clones_a_block_claim_into_a_filesystem_volume(instance):
    """A DataVolume with a pvc source of another volume mode copies the disk across
    (host-assisted: a blank claim of its own mode, no CSI content source)."""
    src, dv = "guest-disk", "guest-disk-file"
    instance.apply(claim(src, "Block"), "--wait")
    marker = b"PVLUN-GUEST-DISK"
    with open(instance.lun_path(src), "r+b") as f:
        f.write(marker)
    instance.apply(f"""apiVersion: cdi.kubevirt.io/v1beta1
kind: DataVolume
metadata: {{name: {dv}}}
spec:
  source: {{pvc: {{name: {src}}}}}
  storage: {{volumeMode: Filesystem, resources: {{requests: {{storage: 64Mi}}}}}}
""")
    done = instance.wait(lambda: (instance.get("DataVolume", dv).get("status") or {}).get("phase")
                         in ("Succeeded", "Failed") and instance.get("DataVolume", dv), 120, "the DataVolume clone")
    assert done["status"]["phase"] == "Succeeded", done["status"]
    assert "host-assisted" in instance.cli("describe", "dv", dv).stdout
    instance.cli("delete", "dv", dv)
    instance.cli("delete", "pvc", src)


def test_annotate_refuses_malformed_keys_and_unknown_objects(instance):
    bad = instance.cli("annotate", "vsc", "snapcontent-x", "no value", check=False)
    assert bad.returncode == 1 and "KEY=VALUE" in bad.stderr and "Traceback" not in bad.stderr
    missing = instance.cli("annotate", "vsc", "snapcontent-absent", f"{ALLOW}=true", check=False)
    assert missing.returncode == 1 and "not found" in missing.stderr
    assert instance.get("VolumeSnapshotContent", "snapcontent-absent") is None  # nothing made by the failure


def test_storage_class_mount_options_reach_the_mounts_and_dangerous_ones_fail_provisioning(instance):
    instance.apply("""apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: noexec
provisioner: csi.pvlun.dev
mountOptions: [noexec, noatime]
---
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: sneaky
provisioner: csi.pvlun.dev
mountOptions: ["logdev=/dev/vda"]
""")
    instance.apply(claim("opts", "Filesystem").replace("spec:\n", "spec:\n  storageClassName: noexec\n"), "--wait")
    pv = instance.get("PersistentVolume", instance.get("PersistentVolumeClaim", "opts")["spec"]["volumeName"])
    assert pv["spec"]["mountOptions"] == ["noexec", "noatime"]
    node = instance.nodes()[0]
    csi = CsiClient(instance.data_dir, [node])
    attached = kubelet.attach(instance.store, csi, instance.data_dir, "opts", "default", node, "test/opts")
    try:
        options = next(line.split()[5] for line in open("/proc/self/mountinfo") if line.split()[4] == attached.path)
        assert {"noexec", "noatime", "nosuid", "nodev"} <= set(options.split(","))
    finally:
        kubelet.detach(instance.store, csi, attached.volume_id, node, "test/opts")
        csi.close()
    instance.cli("delete", "pvc", "opts")

    instance.apply(claim("sneaky", "Filesystem").replace("spec:\n", "spec:\n  storageClassName: sneaky\n"))
    refused = instance.wait(lambda: condition(instance, "sneaky").get("reason") == "ProvisioningFailed"
                            and condition(instance, "sneaky"), what="the claim refused")
    assert refused["message"].startswith("INVALID_ARGUMENT: mount flag 'logdev=/dev/vda' is not allowed")
    instance.cli("delete", "pvc", "sneaky")


def test_a_claim_with_cdis_import_annotations_is_bound_empty_with_a_warning_naming_the_annotation(instance):
    """CDI's older API (a claim annotated with an endpoint, as its registry-image-pvc example) fills
    nothing here: the claim binds, and a Warning event says so and what to use instead."""
    instance.apply("""apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: annotated
  annotations:
    cdi.kubevirt.io/storage.import.endpoint: "docker://127.0.0.1:5000/vm/disk"
    cdi.kubevirt.io/storage.import.source: "registry"
spec:
  accessModes: [ReadWriteOnce]
  resources:
    requests:
      storage: 16Mi
""", "--wait")
    pvc = instance.get("PersistentVolumeClaim", "annotated")
    said = [e["message"] for e in instance.store.events(pvc) if e["reason"] == "AnnotationIgnored"]
    assert len(said) == 2 and said[0].startswith("metadata.annotations[cdi.kubevirt.io/storage.import.endpoint]")
    assert all("use a DataVolume" in m for m in said)


def test_a_namespace_applies_and_is_deleted_only_once_empty(instance):
    """Manifests that start with their Namespace (CDI's vddk example, KubeVirt's DRA one) apply
    unchanged; pvlun serve does not delete a namespace's contents with it, so it says so."""
    out = instance.apply("""apiVersion: v1
kind: Namespace
metadata:
  name: team-ns
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: settings
  namespace: team-ns
data: {a: b}
""")
    assert "namespace/team-ns created" in out.stdout
    assert instance.get("Namespace", "team-ns", "") is not None
    refused = instance.cli("delete", "namespace", "team-ns", check=False)
    assert refused.returncode == 1 and "still holds configmap objects" in refused.stderr
    instance.cli("delete", "cm", "settings", "-n", "team-ns")
    instance.cli("delete", "ns", "team-ns")
    assert instance.get("Namespace", "team-ns", "") is None
    bad = instance.apply("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: Team.NS\n", check=False)
    assert bad.returncode != 0 and "metadata.name" in bad.stderr
