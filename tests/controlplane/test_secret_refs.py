"""The secrets a StorageClass names (csi.storage.k8s.io/<op>-secret-name/-namespace), resolved as
the external-provisioner does: templates, deprecated keys, and refusals that name the parameter."""

from __future__ import annotations

import pytest

from controlplane.secret_refs import SecretRefError, resolve, secret_data, split_parameters
from controlplane.store import SQLiteStore

PVC = {"metadata": {"name": "db", "namespace": "team-a", "annotations": {"chap.example/secret": "db-chap"}}}


def test_secret_parameters_are_taken_out_and_the_rest_stays():
    rest, found = split_parameters({
        "qemuDirect": "true", "csi.storage.k8s.io/fstype": "xfs",
        "csi.storage.k8s.io/provisioner-secret-name": "chap", "csi.storage.k8s.io/provisioner-secret-namespace": "infra",
        "csiNodeStageSecretName": "${pvc.name}-chap", "csiNodeStageSecretNamespace": "${pvc.namespace}"})
    assert rest == {"qemuDirect": "true", "csi.storage.k8s.io/fstype": "xfs"}
    assert found == {"provisioner": ("chap", "infra"), "node-stage": ("${pvc.name}-chap", "${pvc.namespace}")}


def test_templates_resolve_from_the_claim_and_the_volume():
    assert resolve("node-stage", ("${pvc.name}-chap", "${pvc.namespace}"), PVC, "pvc-1") == \
        {"name": "db-chap", "namespace": "team-a"}
    assert resolve("node-publish", ("${pvc.annotations['chap.example/secret']}", "${pv.name}"), PVC, "pvc-1") == \
        {"name": "db-chap", "namespace": "pvc-1"}


@pytest.mark.parametrize("params, said", [
    ({"csi.storage.k8s.io/node-stage-secret-name": "x"}, "node-stage-secret-namespace is missing"),
    ({"csi.storage.k8s.io/snapshotter-secret-name": "x"}, "names no CSI operation"),
])
def test_a_half_or_unknown_secret_parameter_is_refused_by_name(params, said):
    with pytest.raises(SecretRefError, match=said):
        split_parameters(params)


@pytest.mark.parametrize("op, templates, said", [
    ("provisioner", ("${pvc.annotations['chap.example/secret']}", "x"), "not a template it may use"),
    ("node-stage", ("${pvc.name}", "${pvc.name}"), "not a template it may use"),
    ("node-stage", ("${pvc.annotations['missing']}", "x"), "no annotation 'missing'"),
    ("node-stage", ("../../etc", "x"), "resolve to no Secret name"),
    ("node-stage", ("ok", "Bad_NS"), "resolve to no Secret name"),
])
def test_templates_it_may_not_use_and_names_that_are_no_names_are_refused(op, templates, said):
    with pytest.raises(SecretRefError, match=said):
        resolve(op, templates, PVC, "pvc-1")


def test_secret_data_decodes_and_a_missing_secret_is_named_without_values(tmp_path):
    store = SQLiteStore(str(tmp_path / "c.db"))
    store.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "chap", "namespace": "infra"},
                 "data": {"node.session.auth.username": "Y2hhcA=="},
                 "stringData": {"node.session.auth.password": "a-secret-of-16ch"}})
    assert secret_data(store, "chap", "infra") == {"node.session.auth.username": "chap",
                                                   "node.session.auth.password": "a-secret-of-16ch"}
    with pytest.raises(SecretRefError, match="node-stage secret infra/gone not found"):
        secret_data(store, "gone", "infra", "node-stage secret")
