"""What `pvlun apply` admits of snapshot.kubevirt.io/v1beta1, as KubeVirt's webhook would: the
offending field named in one line, nothing stored."""

from __future__ import annotations

import pytest

from controlplane.admission import Refused, admit_update, known_kind, load_documents
from controlplane.vm_snapshot_spec import parse_duration, restore_claim_name

SNAPSHOT = """apiVersion: snapshot.kubevirt.io/v1beta1
kind: VirtualMachineSnapshot
metadata: {name: s1}
spec:
  source: {apiGroup: kubevirt.io, kind: VirtualMachine, name: vm1}
"""
RESTORE = """apiVersion: snapshot.kubevirt.io/v1beta1
kind: VirtualMachineRestore
metadata: {name: r1}
spec:
  target: {apiGroup: kubevirt.io, kind: VirtualMachine, name: vm1}
  virtualMachineSnapshotName: s1
"""


def test_kubevirt_yaml_is_admitted_with_its_short_names():
    (snap,) = load_documents(SNAPSHOT + "  deletionPolicy: Retain\n  failureDeadline: 1m30s\n")
    assert snap["spec"]["failureDeadline"] == "1m30s"
    (restore,) = load_documents(RESTORE + "  targetReadinessPolicy: StopTarget\n  volumeRestorePolicy: PrefixTargetName\n")
    assert restore["spec"]["targetReadinessPolicy"] == "StopTarget"
    assert [known_kind(k) for k in ("vmsnapshot", "vmsnapshotcontents", "vmrestore")] == [
        "VirtualMachineSnapshot", "VirtualMachineSnapshotContent", "VirtualMachineRestore"]


@pytest.mark.parametrize("doc, field", [
    (SNAPSHOT.replace("kind: VirtualMachine,", "kind: Pod,"), "spec.source.kind"),
    (SNAPSHOT.replace(", name: vm1", ""), "spec.source.name is required"),
    (SNAPSHOT.replace("apiGroup: kubevirt.io", "apiGroup: apps"), "spec.source.apiGroup"),
    (SNAPSHOT + "  deletionPolicy: Keep\n", "spec.deletionPolicy"),
    (SNAPSHOT + "  failureDeadline: soon\n", "spec.failureDeadline"),
    (SNAPSHOT + "  snapshotMode: External\n", "spec.snapshotMode"),
    (RESTORE.replace("  virtualMachineSnapshotName: s1\n", ""), "spec.virtualMachineSnapshotName is required"),
    (RESTORE + "  targetReadinessPolicy: Never\n", "spec.targetReadinessPolicy"),
    (RESTORE + "  volumeRestorePolicy: InPlace\n", "spec.volumeRestorePolicy"),
    (RESTORE + "  patches: ['{\"op\": \"replace\"}']\n", "spec.patches"),
    (RESTORE.replace("kind: VirtualMachine,", "kind: VirtualMachineInstance,"), "spec.target.kind"),
    (RESTORE.replace("name: vm1", "name: Vm_1"), "spec.target.name"),
    (RESTORE.replace("name: vm1", "name: vm1.example"), "spec.target.name"),
    (RESTORE + "  volumeRestoreOverrides: [{volumeName: a, restoreName: ../etc}]\n",
     "spec.volumeRestoreOverrides[0].restoreName"),
    (RESTORE + "  volumeRestoreOverrides: [{restoreName: x}]\n", "spec.volumeRestoreOverrides[0].volumeName"),
    (RESTORE + "  volumeRestoreOverrides: [{volumeName: a, restoreName: one}, {volumeName: b, restoreName: one}]\n",
     "spec.volumeRestoreOverrides[1].restoreName: 'one' is also spec.volumeRestoreOverrides[0].restoreName"),
    (RESTORE + "  volumeRestoreOverrides: [{volumeName: a}, {volumeName: a, restoreName: x}]\n",
     "spec.volumeRestoreOverrides[1].volumeName: 'a' is overridden twice"),
    (RESTORE + "  volumeRestoreOverrides: [{volumeName: a, labels: abc}]\n", "spec.volumeRestoreOverrides[0].labels"),
    (RESTORE + "  volumeRestoreOverrides: [{volumeName: a, labels: {x: [1, 2]}}]\n",
     "spec.volumeRestoreOverrides[0].labels.x: must be a string"),
    (RESTORE + "  volumeRestoreOverrides: [{volumeName: a, labels: {x: 'not a value!'}}]\n",
     "spec.volumeRestoreOverrides[0].labels.x"),
    (RESTORE + "  volumeRestoreOverrides: [{volumeName: a, labels: {'-x': y}}]\n",
     "spec.volumeRestoreOverrides[0].labels: key '-x'"),
    (RESTORE + "  volumeRestoreOverrides: [{volumeName: a, annotations: {'Bad_Prefix/x': y}}]\n",
     "spec.volumeRestoreOverrides[0].annotations: key 'Bad_Prefix/x' has an invalid prefix"),
    (RESTORE + "  volumeRestoreOverrides: [{volumeName: a, annotations: {x: 1}}]\n",
     "spec.volumeRestoreOverrides[0].annotations.x: must be a string"),
])
def test_a_wrong_field_is_refused_by_name(doc, field):
    with pytest.raises(Refused) as refused:
        load_documents(doc)
    assert field in str(refused.value) and "\n" not in str(refused.value)


def test_override_labels_and_annotations_of_kubernetes_syntax_are_admitted():
    (restore,) = load_documents(RESTORE + "  volumeRestoreOverrides: [{volumeName: a, restoreName: x, labels: "
                                "{app.example.com/tier: db, empty: ''}, annotations: {note: 'any text at all!'}}]\n")
    assert restore["spec"]["volumeRestoreOverrides"][0]["labels"] == {"app.example.com/tier": "db", "empty": ""}


def test_the_spec_of_a_snapshot_or_restore_does_not_change():
    (old,) = load_documents(SNAPSHOT)
    (new,) = load_documents(SNAPSHOT.replace("name: vm1", "name: vm2"))
    with pytest.raises(Refused, match="spec"):
        admit_update(old, new)
    (old,) = load_documents(RESTORE)
    (new,) = load_documents(RESTORE.replace("s1\n", "s2\n"))
    with pytest.raises(Refused, match="spec"):
        admit_update(old, new)


def test_durations_and_restored_claim_names_are_kubevirts():
    assert parse_duration("5m", "f") == 300 and parse_duration("1h2m3.5s", "f") == 3723.5
    assert parse_duration("250ms", "f") == 0.25 and parse_duration("0s", "f") == 0
    for bad in ("", "5", "m5", "5m junk", "-5m"):
        with pytest.raises(ValueError, match="f"):
            parse_duration(bad, "f")
    restore = {"metadata": {"uid": "u-1"}, "spec": {}}
    assert restore_claim_name(restore, "root", "vm2") == "restore-u-1-root"
    restore["spec"] = {"volumeRestorePolicy": "PrefixTargetName",
                       "volumeRestoreOverrides": [{"volumeName": "data", "restoreName": "mine"}]}
    assert restore_claim_name(restore, "root", "vm2") == "vm2-root"
    assert restore_claim_name(restore, "data", "vm2") == "mine"
