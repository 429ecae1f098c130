"""Kubernetes RBAC (rbac.authorization.k8s.io/v1) as the API server's authorizer evaluates it,
over the Roles, ClusterRoles, RoleBindings and ClusterRoleBindings the store holds — what a
SubjectAccessReview answers on a cluster. Embedded mode uses it where CDI asks the API server:
may a service account clone from another namespace (`create` on `datavolumes/source` in group
`cdi.kubevirt.io` there, or on `pods`, as CDI's clone authorization asks)."""

from __future__ import annotations

from dataclasses import dataclass

from controlplane.store import Obj, ObjectStore

GROUP = "rbac.authorization.k8s.io"
API_VERSION = GROUP + "/v1"
KINDS = ("Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding")


@dataclass(frozen=True)
class Request:
    """The resource attributes of a SubjectAccessReview."""
    verb: str
    group: str
    resource: str
    subresource: str
    namespace: str
    name: str = ""


def service_account_user(namespace: str, name: str) -> tuple[str, list[str]]:
    """The user name and groups the API server authenticates a service account's token as."""
    return (f"system:serviceaccount:{namespace}:{name}",
            ["system:serviceaccounts", f"system:serviceaccounts:{namespace}", "system:authenticated"])


def _matches(values: list | None, want: str) -> bool:
    return bool(values) and ("*" in values or want in values)


def _resource_matches(rule: dict, req: Request) -> bool:
    resources = rule.get("resources") or []
    if "*" in resources:
        return True
    full = f"{req.resource}/{req.subresource}" if req.subresource else req.resource
    return full in resources or (bool(req.subresource) and f"*/{req.subresource}" in resources)


def rule_allows(rule: dict, req: Request) -> bool:
    """One PolicyRule against the request, as the RBAC authorizer's RuleAllows."""
    if not isinstance(rule, dict) or rule.get("nonResourceURLs"):
        return False
    names = rule.get("resourceNames") or []
    return (_matches(rule.get("verbs"), req.verb) and _matches(rule.get("apiGroups"), req.group)
            and _resource_matches(rule, req) and (not names or req.name in names))


def _subject_is(subject: dict, binding_ns: str, user: str, groups: list[str]) -> bool:
    kind = subject.get("kind")
    if kind == "User":
        return subject.get("name") == user
    if kind == "Group":
        return subject.get("name") in groups
    if kind == "ServiceAccount":
        return user == f"system:serviceaccount:{subject.get('namespace') or binding_ns}:{subject.get('name')}"
    return False


def _rules(store: ObjectStore, ref: dict, namespace: str) -> list:
    kind = (ref or {}).get("kind")
    if kind == "ClusterRole":
        role = store.get("ClusterRole", ref.get("name", ""), "")
    elif kind == "Role" and namespace:
        role = store.get("Role", ref.get("name", ""), namespace)
    else:
        return []
    return list((role or {}).get("rules") or [])


def allowed(store: ObjectStore, user: str, groups: list[str], req: Request) -> bool:
    """Whether a binding in the request's namespace or a cluster binding grants the request."""
    bindings: list[tuple[Obj, str]] = [(b, "") for b in store.list("ClusterRoleBinding")]
    if req.namespace:
        bindings += [(b, req.namespace) for b in store.list("RoleBinding", req.namespace)]
    for binding, ns in bindings:
        if not any(_subject_is(s, ns, user, groups) for s in binding.get("subjects") or [] if isinstance(s, dict)):
            continue
        if any(rule_allows(rule, req) for rule in _rules(store, binding.get("roleRef") or {}, ns)):
            return True
    return False


def clone_source_requests(namespace: str, name: str) -> list[Request]:
    """What CDI asks for a clone of claim `name` in `namespace`: any one of them suffices."""
    return [Request("create", "cdi.kubevirt.io", "datavolumes", "source", namespace, name),
            Request("create", "", "pods", "", namespace, name)]


def may_clone_from(store: ObjectStore, source_ns: str, source: str, sa_ns: str, sa: str) -> str | None:
    """None if service account `sa_ns/sa` may clone claim `source_ns/source`; else why not
    (CDI's words, and the grant that is missing)."""
    if source_ns == sa_ns:
        return None
    user, groups = service_account_user(sa_ns, sa)
    if any(allowed(store, user, groups, req) for req in clone_source_requests(source_ns, source)):
        return None
    return (f"User {user} has insufficient permissions in clone source namespace {source_ns}: it needs a Role or "
            f"ClusterRole granting create on datavolumes/source (apiGroup cdi.kubevirt.io), bound to it in "
            f"namespace {source_ns}")
