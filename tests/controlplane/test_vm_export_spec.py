"""A VirtualMachineExport's spec as KubeVirt admits it: the source in its API group, and
ttlDuration written as Go writes a metav1.Duration."""

from __future__ import annotations

from datetime import timedelta

import pytest

from controlplane.admission import Refused, load_documents
from controlplane.vm_export_spec import check_source, parse_duration


@pytest.mark.parametrize("text, seconds", [("2h", 7200), ("1h30m", 5400), ("90s", 90), ("1.5h", 5400),
                                           ("500ms", 0.5), ("1h0m0s", 3600), ("0s", 0)])
def test_durations_are_read_as_go_writes_them(text, seconds):
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "2", "h", "2 h", "2d", "1h-", "soon", "1h30", "--1h"])
def test_anything_else_is_no_duration(text):
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


@pytest.mark.parametrize("source, ok", [
    ({"apiGroup": "", "kind": "PersistentVolumeClaim", "name": "d"}, True),
    ({"kind": "PersistentVolumeClaim", "name": "d"}, True),
    ({"apiGroup": "kubevirt.io", "kind": "VirtualMachine", "name": "vm"}, True),
    ({"apiGroup": "snapshot.kubevirt.io", "kind": "VirtualMachineSnapshot", "name": "s"}, True),
    ({"apiGroup": "cdi.kubevirt.io", "kind": "VirtualMachine", "name": "vm"}, False),
    ({"apiGroup": "", "kind": "Pod", "name": "p"}, False),
    ({"kind": "PersistentVolumeClaim"}, False),
])
def test_the_source_must_be_an_exportable_kind_in_its_group(source, ok):
    if ok:
        check_source({"source": source})
    else:
        with pytest.raises(ValueError, match="spec.source"):
            check_source({"source": source})


def test_apply_refuses_a_bad_export_naming_the_field():
    doc = """apiVersion: export.kubevirt.io/v1beta1
kind: VirtualMachineExport
metadata: {name: e}
spec:
  source: {apiGroup: "", kind: PersistentVolumeClaim, name: "../etc"}
"""
    with pytest.raises(Refused, match=r"spec\.source\.name"):
        load_documents(doc)
    assert load_documents(doc.replace('"../etc"', "disk"))[0]["spec"]["source"]["name"] == "disk"
    with pytest.raises(Refused, match=r"spec\.tokenSecretRef"):
        load_documents(doc.replace('"../etc"', "disk") + "  tokenSecretRef: Not_A_Name\n")
