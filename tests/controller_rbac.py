"""What deploy/full's RBAC lets `pvlun controller` do, and what a request needs, as the API
server's authorizer sees them: for tests that check every call the controller made."""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
VERBS = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}


@functools.cache  # deploy/full does not change during a run: kustomize it once, not once per call checked
def rules() -> tuple[dict, dict]:
    rendered = subprocess.run(["kubectl", "kustomize", str(ROOT / "deploy" / "full")], capture_output=True,
                              text=True, check=True, timeout=60).stdout
    docs = list(yaml.safe_load_all(rendered))
    pick = lambda kind: next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == "pvlun-controller")
    return pick("ClusterRole"), pick("Role")


def allowed(cluster_role: dict, role: dict, group: str, resource: str, verb: str, namespace: str | None) -> bool:
    for granted, scope in ((cluster_role, None), (role, role["metadata"].get("namespace"))):
        if scope is not None and namespace != scope:
            continue
        if any(group in r.get("apiGroups", []) and resource in r.get("resources", []) and verb in r.get("verbs", [])
               for r in granted["rules"]):
            return True
    return False


def classify(method: str, path: str, query: dict) -> tuple[str, str, str, str | None]:
    """(group, resource[/subresource], verb, namespace) of a request, as the authorizer sees it."""
    parts = path.strip("/").split("/")
    group, rest = ("", parts[2:]) if parts[0] == "api" else (parts[1], parts[3:])
    namespace = None
    if len(rest) > 2 and rest[0] == "namespaces":
        namespace, rest = rest[1], rest[2:]
    resource = rest[0] + (f"/{rest[2]}" if len(rest) > 2 else "")
    verb = VERBS.get(method) or ("watch" if query.get("watch") in ("1", "true") else "get" if len(rest) > 1 else "list")
    return group, resource, verb, namespace
