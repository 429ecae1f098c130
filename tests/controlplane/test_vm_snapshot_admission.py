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


def patches_yaml(*patches: str) -> str:
    """spec.patches as a user writes them: each a JSON text in a YAML single-quoted string."""
    return RESTORE + "  patches:\n" + "".join(f"  - '{p}'\n" for p in patches)


@pytest.mark.parametrize("patch", [
    # KubeVirt's admission splits on ':' and refuses this one; it is one valid operation
    '{"op": "replace", "path": "/spec/template/spec/domain/devices/interfaces/0/macAddress", '
    '"value": "02:00:00:aa:bb:cc"}',
    '{"op": "replace", "path": "/spec/template/spec/domain/firmware/uuid", '
    '"value": "5d307ca9-b3ef-428c-8861-06e72d69f223"}',
    '{"op": "add", "path": "/metadata/labels/app", "value": "copy"}',
    '{"op": "remove", "path": "/metadata/annotations/note"}',
    '{"op": "test", "path": "/spec/runStrategy", "value": "Halted"}',
    '{"op": "copy", "from": "/metadata/labels/app", "path": "/metadata/labels/tier"}',
    '{"op": "move", "from": "/spec/template/spec/domain/firmware", "path": "/spec/template/spec/domain/fw"}',
    '{"op": "add", "path": "/spec/template/spec/domain/devices/interfaces/-", "value": {"name": "x"}}',
])
def test_a_patch_under_spec_labels_or_annotations_is_admitted(patch):
    (restore,) = load_documents(patches_yaml(patch))
    assert restore["spec"]["patches"] == [patch]


@pytest.mark.parametrize("patch, field", [
    ('{"op": "replace", "path": "/metadata/name", "value": "x"}', "spec.patches[0].path: '/metadata/name' may not"),
    ('{"op": "replace", "path": "/metadata", "value": {}}', "spec.patches[0].path: '/metadata' may not"),
    ('{"op": "replace", "path": "/metadata/labels", "value": {}}', "spec.patches[0].path: '/metadata/labels' may not"),
    ('{"op": "replace", "path": "/kind", "value": "Pod"}', "spec.patches[0].path: '/kind'"),
    ('{"op": "replace", "path": "/apiVersion", "value": "v1"}', "spec.patches[0].path: '/apiVersion'"),
    ('{"op": "add", "path": "/status/ready", "value": true}', "spec.patches[0].path: '/status/ready'"),
    ('{"op": "replace", "path": "/spec", "value": {}}', "spec.patches[0].path: '/spec' may not"),
    ('{"op": "replace", "path": "spec/running", "value": true}', "spec.patches[0].path: 'spec/running'"),
    ('{"op": "replace", "path": "/spec/a~2b", "value": 1}', "spec.patches[0].path: '/spec/a~2b' is not a JSON pointer"),
    ('{"op": "move", "from": "/metadata/name", "path": "/spec/name"}', "spec.patches[0].from: '/metadata/name'"),
    ('{"op": "copy", "from": "/status", "path": "/spec/status"}', "spec.patches[0].from: '/status'"),
    ('{"op": "copy", "path": "/spec/x"}', "spec.patches[0].from is required"),
    ('{"op": "replace", "path": "/spec/running"}', "spec.patches[0].value is required for op replace"),
    ('{"op": "merge", "path": "/spec/running", "value": 1}', "spec.patches[0].op: 'merge' is not one of"),
    ('{"path": "/spec/running", "value": 1}', "spec.patches[0].op: None is not one of"),
    ('{"op": "replace", "value": 1}', "spec.patches[0].path is required"),
    ('{"op": "replace", "path": "/spec/running", "value": tru', "spec.patches[0]: not valid JSON"),
    ('{"op": "replace", "path": "/spec/x", "value": NaN}', "spec.patches[0]: not valid JSON: NaN is not JSON"),
    ('[{"op": "replace", "path": "/spec/running", "value": true}]',
     "spec.patches[0]: must be one JSON patch operation"),
    ('"op"', "spec.patches[0]: must be one JSON patch operation object"),
])
def test_a_patch_outside_spec_labels_or_annotations_or_not_one_operation_is_refused(patch, field):
    with pytest.raises(Refused) as refused:
        load_documents(patches_yaml('{"op": "add", "path": "/metadata/labels/ok", "value": "y"}', patch))
    assert field.replace("[0]", "[1]") in str(refused.value), str(refused.value)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("extra, field", [
    ("  patches: '{\"op\": \"add\"}'\n", "spec.patches: must be a list of strings, not str"),
    ("  patches: [{op: add, path: /spec/x, value: 1}]\n", "spec.patches[0]: must be a string holding one JSON patch"),
    ("  patches: [" + ", ".join(["'{\"op\": \"remove\", \"path\": \"/spec/x\"}'"] * 65) + "]\n",
     "spec.patches: 65 patches; at most 64 are allowed"),
    ("  patches: ['{\"op\": \"add\", \"path\": \"/spec/x\", \"value\": \"" + "a" * 20000 + "\"}']\n",
     "spec.patches[0] is 20045 characters long; at most 16384"),
])
def test_patches_are_a_bounded_list_of_bounded_strings(extra, field):
    with pytest.raises(Refused) as refused:
        load_documents(RESTORE + extra)
    assert field in str(refused.value), str(refused.value)
    assert len(str(refused.value)) < 500


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
