"""A VirtualMachineExport's spec as KubeVirt admits it: the source in its API group, and
ttlDuration written as Go writes a metav1.Duration."""

from __future__ import annotations

import os
import subprocess
import sys
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


@pytest.mark.parametrize("text", ["99999999999999h", "100000000h", "2562048h", "9" * 400 + "h", "-99999999999999h"])
def test_a_duration_longer_than_go_holds_is_refused(text):
    with pytest.raises(ValueError, match="longer than the longest duration"):
        parse_duration(text)


def test_the_longest_duration_is_one_an_export_can_live(tmp_path):
    from importer.vm_export import expiration

    assert parse_duration("2562047h47m16.854775807s") > timedelta(days=106751)
    vme = {"metadata": {"creationTimestamp": "2026-01-01T00:00:00Z"}, "spec": {"ttlDuration": "2562047h"}}
    assert expiration(vme).year == 2318


@pytest.mark.parametrize("ttl", ["99999999999999h", "100000000h"])
def test_admission_and_the_cli_refuse_a_too_long_ttl_in_one_line(tmp_path, ttl):
    doc = f"""apiVersion: export.kubevirt.io/v1beta1
kind: VirtualMachineExport
metadata: {{name: e}}
spec:
  source: {{apiGroup: "", kind: PersistentVolumeClaim, name: disk}}
  ttlDuration: {ttl}
"""
    with pytest.raises(Refused, match=r"spec\.ttlDuration: .* is longer than the longest duration"):
        load_documents(doc)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-m", "pvlun.cli", "vmexport", "create", "e", "--pvc", "disk", "--ttl", ttl,
                           "--data-dir", str(tmp_path)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": root})
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "spec.ttlDuration" in proc.stderr and "longer than" in proc.stderr


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
