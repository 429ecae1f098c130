"""RBAC as the API server's authorizer evaluates it (controlplane/rbac.py), over a real SQLite
store: what may clone from another namespace in embedded mode. Each case is one binding and
one role; the answer must be the authorizer's."""

from __future__ import annotations

import pytest

from controlplane.rbac import Request, allowed, may_clone_from, rule_allows, service_account_user
from controlplane.store import SQLiteStore

SOURCE = Request("create", "cdi.kubevirt.io", "datavolumes", "source", "images", "golden")


@pytest.mark.parametrize("rule, want", [
    ({"apiGroups": ["cdi.kubevirt.io"], "resources": ["datavolumes/source"], "verbs": ["create"]}, True),
    ({"apiGroups": ["cdi.kubevirt.io"], "resources": ["datavolumes/source"], "verbs": ["*"]}, True),
    ({"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}, True),
    ({"apiGroups": ["cdi.kubevirt.io"], "resources": ["*/source"], "verbs": ["create"]}, True),
    ({"apiGroups": ["cdi.kubevirt.io"], "resources": ["datavolumes"], "verbs": ["create"]}, False),  # not the subresource
    ({"apiGroups": [""], "resources": ["datavolumes/source"], "verbs": ["create"]}, False),  # another group
    ({"apiGroups": ["cdi.kubevirt.io"], "resources": ["datavolumes/source"], "verbs": ["get"]}, False),
    ({"apiGroups": ["cdi.kubevirt.io"], "resources": ["datavolumes/source"], "verbs": ["create"],
      "resourceNames": ["golden"]}, True),
    ({"apiGroups": ["cdi.kubevirt.io"], "resources": ["datavolumes/source"], "verbs": ["create"],
      "resourceNames": ["other"]}, False),
    ({"nonResourceURLs": ["*"], "verbs": ["*"]}, False),
    ("not a rule", False),
])
def test_one_rule_against_the_clone_request(rule, want):
    assert rule_allows(rule, SOURCE) is want


CLONER = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "cloner"},
          "rules": [{"apiGroups": ["cdi.kubevirt.io"], "resources": ["datavolumes/source"], "verbs": ["create"]}]}


def binding(kind: str, namespace: str, subject: dict, role_kind: str = "ClusterRole") -> dict:
    meta = {"name": "b"} | ({"namespace": namespace} if kind == "RoleBinding" else {})
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": kind, "metadata": meta, "subjects": [subject],
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": role_kind, "name": "cloner"}}


SA = {"kind": "ServiceAccount", "name": "default", "namespace": "tenant"}


@pytest.mark.parametrize("objects, want", [
    ([], False),
    ([CLONER, binding("RoleBinding", "images", SA)], True),  # a ClusterRole bound in the source namespace
    ([CLONER, binding("RoleBinding", "tenant", SA)], False),  # bound in the target namespace: not the source's
    ([CLONER, binding("ClusterRoleBinding", "", SA)], True),  # everywhere
    ([CLONER, binding("RoleBinding", "images", {"kind": "ServiceAccount", "name": "default"})], False),  # images' SA
    ([CLONER, binding("RoleBinding", "images", {"kind": "ServiceAccount", "name": "other", "namespace": "tenant"})],
     False),
    ([CLONER, binding("RoleBinding", "images", {"kind": "Group", "name": "system:serviceaccounts:tenant"})], True),
    ([CLONER, binding("RoleBinding", "images", {"kind": "User", "name": "system:serviceaccount:tenant:default"})],
     True),
    ([CLONER | {"kind": "Role", "metadata": {"name": "cloner", "namespace": "tenant"}},
      binding("RoleBinding", "images", SA, role_kind="Role")], False),  # a Role of another namespace
    ([CLONER | {"kind": "Role", "metadata": {"name": "cloner", "namespace": "images"}},
      binding("RoleBinding", "images", SA, role_kind="Role")], True),
])
def test_who_may_clone_from_the_images_namespace(tmp_path, objects, want):
    store = SQLiteStore(str(tmp_path / "catalog.db"))
    for obj in objects:
        store.apply(obj)
    user, groups = service_account_user("tenant", "default")
    assert allowed(store, user, groups, SOURCE) is want
    assert (may_clone_from(store, "images", "golden", "tenant", "default") is None) is want
    assert may_clone_from(store, "tenant", "golden", "tenant", "default") is None  # its own namespace: always
