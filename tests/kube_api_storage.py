"""TEST DOUBLE of a Kubernetes API server, part 1: what it stores and the rules it writes
by (the HTTP side is kube_api_double.py). Never imported by the product.

The rules are the API server's, as its REST semantics show them to a client:
- one resourceVersion counter for everything (etcd's revision); every change is an event
  (ADDED, MODIFIED, DELETED) in a history watches are served from;
- create: 201, uid, creationTimestamp, resourceVersion, generation 1; 409 AlreadyExists;
  status dropped when the resource has a status subresource; the namespace must exist
  (NamespaceLifecycle); generateName honoured;
- update (PUT): the resourceVersion is required (no unconditional updates, as for custom
  resources) and 409 Conflict when stale; on the main resource status changes are ignored,
  on /status everything but status is; generation grows when anything but metadata and
  status changed; an update that changes nothing writes nothing (no new version, no event);
  no finalizer may be added once deletion started;
- merge patch and JSON patch are applied to the stored object and then written as an
  update (a resourceVersion in a merge patch is a precondition); strategic merge and apply
  patches are not served (415), as for custom resources;
- delete: with finalizers only deletionTimestamp is set; the object goes when the last
  finalizer is removed; dependents whose owners are all gone are deleted (the garbage
  collector's background propagation, done at once); deleting a namespace deletes what is in
  it; Pods go at once (there is no kubelet);
- events.k8s.io/v1 Events are validated as the API server does (required fields; the
  deprecated count unset; a series counts at least 2; note, reason, type immutable).
"""

from __future__ import annotations

import copy
import json
import re
import threading
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

Obj = dict[str, Any]


@dataclass(frozen=True)
class Resource:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    status: bool

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


def _resources(*rows: str) -> dict[tuple[str, str, str], Resource]:
    """Rows of 'group/version plural Kind scope status?' as the API server's discovery lists them."""
    out = {}
    for row in rows:
        gv, plural, kind, scope, sub = row.split()
        group, _, version = gv.rpartition("/")
        out[(group, version, plural)] = Resource(group, version, plural, kind, scope == "Namespaced", sub == "status")
    return out


SERVED = _resources(
    "v1 namespaces Namespace Cluster status", "v1 nodes Node Cluster status",
    "v1 persistentvolumeclaims PersistentVolumeClaim Namespaced status",
    "v1 persistentvolumes PersistentVolume Cluster status",
    "v1 secrets Secret Namespaced -", "v1 configmaps ConfigMap Namespaced -",
    "v1 pods Pod Namespaced status", "v1 services Service Namespaced status",
    "events.k8s.io/v1 events Event Namespaced -", "coordination.k8s.io/v1 leases Lease Namespaced -",
    "storage.k8s.io/v1 storageclasses StorageClass Cluster -",
    "storage.k8s.io/v1 volumeattachments VolumeAttachment Cluster status",
    "storage.k8s.io/v1 volumeattributesclasses VolumeAttributesClass Cluster -",
    "snapshot.storage.k8s.io/v1 volumesnapshots VolumeSnapshot Namespaced status",
    "snapshot.storage.k8s.io/v1 volumesnapshotcontents VolumeSnapshotContent Cluster status",
    "snapshot.storage.k8s.io/v1 volumesnapshotclasses VolumeSnapshotClass Cluster -",
    "cdi.kubevirt.io/v1beta1 datavolumes DataVolume Namespaced status",
    "cdi.kubevirt.io/v1beta1 datasources DataSource Namespaced status",
    "cdi.kubevirt.io/v1beta1 dataimportcrons DataImportCron Namespaced status",
    "cdi.kubevirt.io/v1beta1 storageprofiles StorageProfile Cluster status",
    "kubevirt.io/v1 virtualmachines VirtualMachine Namespaced status",
    "kubevirt.io/v1 virtualmachineinstances VirtualMachineInstance Namespaced status",
    "kubevirt.io/v1 virtualmachineinstancemigrations VirtualMachineInstanceMigration Namespaced status",
    "kubevirt.io/v1 virtualmachineinstancereplicasets VirtualMachineInstanceReplicaSet Namespaced status",
    "pool.kubevirt.io/v1beta1 virtualmachinepools VirtualMachinePool Namespaced status",
    "instancetype.kubevirt.io/v1beta1 virtualmachineinstancetypes VirtualMachineInstancetype Namespaced -",
    "instancetype.kubevirt.io/v1beta1 virtualmachineclusterinstancetypes VirtualMachineClusterInstancetype Cluster -",
    "instancetype.kubevirt.io/v1beta1 virtualmachinepreferences VirtualMachinePreference Namespaced -",
    "instancetype.kubevirt.io/v1beta1 virtualmachineclusterpreferences VirtualMachineClusterPreference Cluster -",
    "apps/v1 controllerrevisions ControllerRevision Namespaced -",
    "snapshot.kubevirt.io/v1beta1 virtualmachinesnapshots VirtualMachineSnapshot Namespaced status",
    "snapshot.kubevirt.io/v1beta1 virtualmachinesnapshotcontents VirtualMachineSnapshotContent Namespaced status",
    "snapshot.kubevirt.io/v1beta1 virtualmachinerestores VirtualMachineRestore Namespaced status",
    "export.kubevirt.io/v1beta1 virtualmachineexports VirtualMachineExport Namespaced status",
    "rbac.authorization.k8s.io/v1 roles Role Namespaced -",
    "rbac.authorization.k8s.io/v1 clusterroles ClusterRole Cluster -",
    "rbac.authorization.k8s.io/v1 rolebindings RoleBinding Namespaced -",
    "rbac.authorization.k8s.io/v1 clusterrolebindings ClusterRoleBinding Cluster -",
)
FIRST_NAMESPACES = ("default", "kube-system", "kube-public")
SERVER_META = ("uid", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "generation")


class ApiStatus(Exception):
    """An answer other than success, sent as a Status object."""

    def __init__(self, code: int, reason: str, message: str):
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---- patches
def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def _pointer(path: str) -> list[str | int]:
    parts = [p.replace("~1", "/").replace("~0", "~") for p in path.split("/")[1:]]
    return [int(p) if p.isdigit() else p for p in parts]


def json_patch(target: Obj, ops: list[Obj]) -> Obj:
    """RFC 6902: add, remove, replace, test."""
    doc = copy.deepcopy(target)
    for op in ops:
        *parents, last = _pointer(op.get("path", ""))
        node: Any = doc
        try:
            for part in parents:
                node = node[part]
            if op["op"] == "test":
                if node[last] != op.get("value"):
                    raise ApiStatus(422, "Invalid", f"the test of {op['path']} failed")
            elif op["op"] == "remove":
                del node[last]
            elif op["op"] in ("add", "replace"):
                if op["op"] == "replace" and (last not in node if isinstance(node, dict) else last >= len(node)):
                    raise KeyError(last)
                if isinstance(node, list) and op["op"] == "add":
                    node.insert(len(node) if last == "-" else last, copy.deepcopy(op["value"]))
                else:
                    node[last] = copy.deepcopy(op["value"])
            else:
                raise ApiStatus(422, "Invalid", f"unsupported JSON patch op {op['op']!r}")
        except (KeyError, IndexError, TypeError):
            raise ApiStatus(422, "Invalid", f"the JSON patch path {op.get('path')} does not exist") from None
    return doc


# ---- selectors
def _field(obj: Obj, path: str) -> str:
    value: Any = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return "" if value is None else str(value)


def matches(obj: Obj, labels: str, fields: str) -> bool:
    """Equality-based label and field selectors (a=b, a==b, a!=b; a label alone: exists)."""
    have = (obj.get("metadata") or {}).get("labels") or {}
    for term in filter(None, labels.split(",")):
        key, op, value = re.match(r"\s*([^!=\s]+)\s*(!=|==|=)?\s*(.*?)\s*$", term).groups()
        if (op is None and key not in have) or (op == "!=" and have.get(key) == value) or \
                (op in ("=", "==") and have.get(key) != value):
            return False
    for term in filter(None, fields.split(",")):
        key, op, value = re.match(r"\s*([^!=\s]+)\s*(!=|==|=)\s*(.*?)\s*$", term).groups()
        if (_field(obj, key) == value) != (op != "!="):
            return False
    return True


# ---- events.k8s.io/v1
def check_event(new: Obj, old: Obj | None) -> None:
    problems = []
    series = new.get("series")
    if series is not None and (old is None or series != old.get("series")):
        if int(series.get("count") or 0) < 2:
            problems.append("series.count: should be at least 2")
        if not series.get("lastObservedTime"):
            problems.append("series.lastObservedTime: Required value")
    if old is None:
        for field in ("eventTime", "reportingController", "reportingInstance", "action", "reason"):
            if not new.get(field):
                problems.append(f"{field}: Required value")
        if new.get("type") not in ("Normal", "Warning"):
            problems.append(f"type: has invalid value: {new.get('type')}")
        for field in ("deprecatedCount", "deprecatedFirstTimestamp", "deprecatedLastTimestamp", "deprecatedSource"):
            if new.get(field):
                problems.append(f"{field}: needs to be unset")
        if len(str(new.get("note", "")).encode()) > 1024:
            problems.append("note: can have at most 1024 characters")
    else:
        for field in ("note", "reason", "type", "action", "regarding", "eventTime", "reportingController",
                      "reportingInstance", "deprecatedCount"):
            if new.get(field) != old.get(field):
                problems.append(f"{field}: field is immutable")
    if problems:
        raise ApiStatus(422, "Invalid", f"Event.events.k8s.io \"{new['metadata'].get('name')}\" is invalid: "
                        + ", ".join(problems))


class ApiStorage:
    """Objects by (resource, namespace, name), one resourceVersion counter, the event history."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.rv = 1000
        self.objects: dict[tuple[Resource, str, str], Obj] = {}
        self.history: list[tuple[int, Resource, str, Obj]] = []  # (rv, resource, type, object)
        ns = SERVED[("", "v1", "namespaces")]
        for name in FIRST_NAMESPACES:
            with self.cond:
                self._store(ns, "", name, {"apiVersion": "v1", "kind": "Namespace", "metadata": self._new_meta(name)},
                            "ADDED")

    def _new_meta(self, name: str, meta: Obj | None = None) -> Obj:
        meta = dict(meta or {}, name=name, uid=str(uuid.uuid4()), creationTimestamp=now(), generation=1)
        for field in ("deletionTimestamp", "deletionGracePeriodSeconds", "resourceVersion"):
            meta.pop(field, None)
        return meta

    def _store(self, res: Resource, ns: str, name: str, obj: Obj, event: str) -> Obj:
        """Write (or remove, for DELETED) under a new resourceVersion; caller holds cond."""
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        if event == "DELETED":
            self.objects.pop((res, ns, name), None)
        else:
            self.objects[(res, ns, name)] = obj
        self.history.append((self.rv, res, event, copy.deepcopy(obj)))
        self.cond.notify_all()
        return copy.deepcopy(obj)

    def get(self, res: Resource, ns: str, name: str) -> Obj:
        with self.cond:
            obj = self.objects.get((res, ns, name))
            if obj is None:
                raise ApiStatus(404, "NotFound", f'{res.plural}{"." + res.group if res.group else ""} "{name}" not found')
            return copy.deepcopy(obj)

    def list(self, res: Resource, ns: str | None) -> tuple[list[Obj], int]:
        with self.cond:
            items = [copy.deepcopy(o) for (r, n, _), o in sorted(self.objects.items(), key=lambda i: i[0][1:])
                     if r == res and (ns is None or n == ns)]
            return items, self.rv

    def _check_body(self, res: Resource, ns: str, body: Any) -> Obj:
        if not isinstance(body, dict) or not isinstance(body.get("metadata", {}), dict):
            raise ApiStatus(400, "BadRequest", "the body is not an object")
        body = dict(body, apiVersion=body.get("apiVersion") or res.api_version, kind=body.get("kind") or res.kind)
        if body["kind"] != res.kind or body["apiVersion"] != res.api_version:  # left out: the URL's, as decoded
            raise ApiStatus(400, "BadRequest", f"the body is {body.get('apiVersion')}/{body.get('kind')}, "
                            f"the URL {res.api_version}/{res.kind}")
        given = (body.get("metadata") or {}).get("namespace")
        if res.namespaced and given and given != ns:
            raise ApiStatus(400, "BadRequest", "the namespace of the provided object does not match the namespace "
                            "sent on the request")
        return copy.deepcopy(body)

    def create(self, res: Resource, ns: str, body: Any) -> Obj:
        obj = self._check_body(res, ns, body)
        meta = obj.setdefault("metadata", {})
        name = meta.get("name") or (meta.get("generateName") and meta["generateName"] + uuid.uuid4().hex[:5])
        if not name or "/" in name or name in (".", ".."):
            raise ApiStatus(422, "Invalid", "metadata.name: Required value: name or generateName is required")
        if meta.get("resourceVersion"):
            raise ApiStatus(500, "InternalError", "resourceVersion should not be set on objects to be created")
        if res.kind == "Event":
            check_event(obj, None)
        with self.cond:
            if res.namespaced and (SERVED[("", "v1", "namespaces")], "", ns) not in self.objects:
                raise ApiStatus(404, "NotFound", f'namespaces "{ns}" not found')
            if (res, ns, name) in self.objects:
                raise ApiStatus(409, "AlreadyExists", f'{res.plural} "{name}" already exists')
            obj["metadata"] = self._new_meta(name, meta)
            if res.namespaced:
                obj["metadata"]["namespace"] = ns
            if res.status:
                obj.pop("status", None)
            return self._store(res, ns, name, obj, "ADDED")

    def update(self, res: Resource, ns: str, name: str, body: Any, subresource: str = "",
               precondition: bool = True) -> Obj:
        """PUT (or the write a patch ends in, `precondition` False unless it gave a version)."""
        new = self._check_body(res, ns, body)
        meta = new.setdefault("metadata", {})
        if meta.get("name", name) != name:
            raise ApiStatus(400, "BadRequest", "the name of the object does not match the name on the URL")
        with self.cond:
            old = self.objects.get((res, ns, name))
            if old is None:
                raise ApiStatus(404, "NotFound", f'{res.plural} "{name}" not found')
            given = meta.get("resourceVersion")
            if precondition and not given:
                raise ApiStatus(422, "Invalid", "metadata.resourceVersion: Invalid value: 0: must be specified "
                                "for an update")
            if given and given != old["metadata"]["resourceVersion"]:
                raise ApiStatus(409, "Conflict", f'Operation cannot be fulfilled on {res.plural} "{name}": the object '
                                "has been modified; please apply your changes to the latest version and try again")
            if subresource == "status":
                status = new.get("status")
                new = copy.deepcopy(old)
                new.pop("status", None)
                if status is not None:
                    new["status"] = status
            elif res.status:
                new.pop("status", None)
                if "status" in old:
                    new["status"] = copy.deepcopy(old["status"])
            return self._write_update(res, ns, name, old, new)

    def _write_update(self, res: Resource, ns: str, name: str, old: Obj, new: Obj) -> Obj:
        meta, old_meta = new["metadata"], old["metadata"]
        for field in SERVER_META:
            meta.pop(field, None)
            if field in old_meta:
                meta[field] = old_meta[field]
        meta.update(name=name, resourceVersion=old_meta["resourceVersion"])
        if res.namespaced:
            meta["namespace"] = ns
        else:
            meta.pop("namespace", None)
        if old_meta.get("deletionTimestamp") and set(meta.get("finalizers") or []) - set(old_meta.get("finalizers") or []):
            raise ApiStatus(422, "Forbidden", "metadata.finalizers: Forbidden: no new finalizers can be added if the "
                            "object is being deleted")
        if res.kind == "Event":
            check_event(new, old)
        if new == old:
            return copy.deepcopy(old)
        rest = lambda o: {k: v for k, v in o.items() if k not in ("metadata", "status")}  # noqa: E731
        if rest(new) != rest(old):
            meta["generation"] = old_meta.get("generation", 1) + 1
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            return self._remove(res, ns, name, new)
        return self._store(res, ns, name, new, "MODIFIED")

    def patch(self, res: Resource, ns: str, name: str, content_type: str, patch: Any, subresource: str = "") -> Obj:
        with self.cond:  # read, patch and write at once, as the API server's GuaranteedUpdate
            return self._patch(res, ns, name, content_type, patch, subresource)

    def _patch(self, res: Resource, ns: str, name: str, content_type: str, patch: Any, subresource: str) -> Obj:
        old = self.get(res, ns, name)
        if content_type == "application/merge-patch+json":
            if not isinstance(patch, dict):
                raise ApiStatus(400, "BadRequest", "a merge patch is a JSON object")
            new = merge_patch(old, patch)
        elif content_type == "application/json-patch+json":
            if not isinstance(patch, list):
                raise ApiStatus(400, "BadRequest", "a JSON patch is a list of operations")
            new = json_patch(old, patch)
        else:
            raise ApiStatus(415, "UnsupportedMediaType", f"the body of the request was in an unknown format - "
                            f"accepted media types include: application/json-patch+json, "
                            f"application/merge-patch+json (not {content_type})")
        if subresource != "status" and res.status:
            new["status"] = old.get("status")  # the main resource ignores status
            if new["status"] is None:
                new.pop("status")
        given = (new.get("metadata") or {}).get("resourceVersion")
        if given == old["metadata"]["resourceVersion"] and not (isinstance(patch, dict) and
                                                                 "resourceVersion" in (patch.get("metadata") or {})):
            new["metadata"].pop("resourceVersion")  # not the client's precondition
        return self.update(res, ns, name, new, subresource, precondition=False)

    def delete(self, res: Resource, ns: str, name: str, options: Obj | None = None) -> Obj:
        with self.cond:
            old = self.objects.get((res, ns, name))
            if old is None:
                raise ApiStatus(404, "NotFound", f'{res.plural} "{name}" not found')
            pre = (options or {}).get("preconditions") or {}
            for field in ("uid", "resourceVersion"):
                if pre.get(field) and pre[field] != old["metadata"].get(field):
                    raise ApiStatus(409, "Conflict", f"Precondition failed: {field} in precondition: {pre[field]}, "
                                    f"{field} in object meta: {old['metadata'].get(field)}")
            if old["metadata"].get("finalizers"):
                if old["metadata"].get("deletionTimestamp"):
                    return copy.deepcopy(old)
                new = copy.deepcopy(old)
                new["metadata"].update(deletionTimestamp=now(), deletionGracePeriodSeconds=0)
                return self._store(res, ns, name, new, "MODIFIED")
            return self._remove(res, ns, name, copy.deepcopy(old))

    def _remove(self, res: Resource, ns: str, name: str, obj: Obj) -> Obj:
        """Remove now, then what depended on it (caller holds cond)."""
        gone = self._store(res, ns, name, obj, "DELETED")
        uid = gone["metadata"]["uid"]
        uids = {o["metadata"]["uid"] for o in self.objects.values()}
        for (r, n, nm), dependent in list(self.objects.items()):
            refs = dependent["metadata"].get("ownerReferences") or []
            contained = res.kind == "Namespace" and r.namespaced and n == name
            orphaned = any(ref.get("uid") == uid for ref in refs) and not any(ref.get("uid") in uids for ref in refs)
            if (contained or orphaned) and (r, n, nm) in self.objects:
                self.delete(r, n, nm)
        return gone

    def events_since(self, res: Resource, ns: str | None, rv: int) -> list[tuple[int, str, Obj]]:
        """History events of the resource after `rv` (caller holds cond)."""
        lo, hi = 0, len(self.history)
        while lo < hi:  # the history is in resourceVersion order
            mid = (lo + hi) // 2
            if self.history[mid][0] <= rv:
                lo = mid + 1
            else:
                hi = mid
        return [(v, t, o) for v, r, t, o in self.history[lo:]
                if r == res and (ns is None or o["metadata"].get("namespace", "") == ns)]


def status_body(code: int, reason: str, message: str) -> Obj:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()
