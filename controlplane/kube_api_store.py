"""The ObjectStore on a Kubernetes API server (cluster mode), over any REST transport:
the same reconcile functions and the same loop as on SQLiteStore, with the API server's
rules. `KubeStore` (kube_store.py) is this on the kubernetes client.

- Reads come from an informer cache per kind (kube_informer), started on the first read
  of the kind (or by `start(kinds)`), as client-go's listers; the change log the embedded
  loop's watcher reads is driven by the watches.
- `apply` creates, or updates with the object's resourceVersion (the cached one when the
  object carries none): a 409 raises `Conflict` and nothing is written — never a blind
  overwrite. With `merge`, the merge is redone on the server's current object and retried.
- Status goes through the `/status` subresource: `update_status` replaces it guarded by
  the resourceVersion, `merge_status` is a merge patch of the given fields (as SQLiteStore's,
  other fields stay, and so does a spec changed meanwhile; a None value removes the field).
  `patch_spec`, `patch_metadata` and `annotate` are merge patches; a patch of finalizers or
  ownerReferences carries the resourceVersion (a lost update there would lose a cleanup).
  `patch_metadata(deletionTimestamp=...)` is a DELETE: only the API server sets that field.
- `delete` of an object with finalizers marks it (deletionTimestamp); the API server
  removes it once they are gone, so `remove_finalizer` works unchanged.
- Events are events.k8s.io/v1, counted in their series (kube_events).
"""

from __future__ import annotations

import copy
import os
import socket
import threading
import time
from typing import Any, Callable, Iterable

from controlplane.kube_events import EventRecorder
from controlplane.kube_informer import ChangeLog, Informer, Key, Transport
from controlplane.kube_kinds import ApiError, KubeKind, checked_name, checked_namespace, kind_info, namespace_for
from controlplane.store import Conflict, Obj

REPORTER = "pvlun.dev/controller"  # reportingController of the Events this store writes (a qualified name)
SYNC_TIMEOUT = 30.0  # seconds a first read of a kind waits for its list
MERGE_TRIES = 5  # apply(merge=...) redone this often against a moving object before Conflict
# Set by the API server alone: kept from the stored object when the caller's body lacks them.
SERVER_META = ("uid", "creationTimestamp", "generation", "managedFields", "deletionTimestamp",
               "deletionGracePeriodSeconds", "selfLink")


def replace_patch(old: Any, new: Any) -> Any:
    """A JSON merge patch that makes `old` equal `new` (keys only `old` has become null, as
    SQLiteStore's dict.update replaces a whole field value)."""
    if not isinstance(new, dict) or not isinstance(old, dict):
        return copy.deepcopy(new)
    patch: Obj = {k: None for k in old if k not in new}
    patch.update({k: replace_patch(old.get(k), v) for k, v in new.items()})
    return patch


def _same(current: Obj | None, fields: dict[str, Any]) -> bool:
    current = current or {}
    return all(current.get(k) == v for k, v in fields.items())


class ApiStore:
    """The ObjectStore on a Kubernetes API. `namespace` is where an object that names none
    goes (as kubectl's context namespace); `watch_namespace` limits the informers to one
    namespace (None: all); `reporter` is the Events' reportingController; `selectors` limits
    what a kind's informer sees (a controller sees its own Pods, not the cluster's)."""

    def __init__(self, api: Transport, namespace: str = "default", *, watch_namespace: str | None = None,
                 reporter: str = REPORTER, sync_timeout: float = SYNC_TIMEOUT, selectors: dict[str, str] | None = None):
        self.api = api
        self.selectors = dict(selectors or {})  # kind → label selector: what of that kind this store sees
        self.namespace = checked_namespace(namespace)
        self.watch_namespace = checked_namespace(watch_namespace) if watch_namespace is not None else None
        self.reporter, self.sync_timeout = reporter, sync_timeout
        self.instance = f"{reporter.rsplit('/', 1)[-1]}-{os.environ.get('POD_NAME') or socket.gethostname()}"
        self._changes = ChangeLog()
        self._informers: dict[str, Informer] = {}
        self._lock = threading.Lock()
        self.recorder = EventRecorder(self.api, reporter, self.instance)
        self._stopped = False

    # ---- informers
    def start(self, kinds: Iterable[str] = ()) -> None:
        """Start the informers of `kinds` now and wait for their first lists (others start on
        their first read)."""
        for kind in kinds:
            self.informer(kind)

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            informers = list(self._informers.values())
        for informer in informers:
            informer.stop()

    def informer(self, kind: str) -> Informer:
        """The kind's informer, started (now, if it was not) and synced."""
        info = kind_info(kind)
        with self._lock:
            if self._stopped:
                raise ApiError(0, "Stopped", "the store is stopped")
            informer = self._informers.get(kind)
            if informer is None:
                informer = Informer(info, self.api, self._changes, self.watch_namespace, self.selectors.get(kind, ""))
                self._informers[kind] = informer
                informer.start()
        deadline = time.monotonic() + self.sync_timeout
        while not informer.synced.wait(0.05):
            if informer.refused or time.monotonic() > deadline:  # refused (RBAC, a token): say so at once
                raise ApiError(503, "NotSynced", f"cannot list {info.plural}: "
                               f"{informer.error or 'no answer from the API server'}")
        return informer

    def _scoped(self, info: KubeKind, namespace: str | None) -> bool:
        """Whether the cache holds this namespace's objects of the kind (all namespaces, None,
        mean the watched one on a store that watches one)."""
        return not info.namespaced or self.watch_namespace in (None, namespace) or namespace is None

    # ---- reads
    def get(self, kind: str, name: str, namespace: str = "default") -> Obj | None:
        info = kind_info(kind)
        ns = namespace_for(info, namespace)
        checked_name(name)
        if not self._scoped(info, ns):
            return self._fetch(info, ns, name)
        return self.informer(kind).get(ns, name)

    def list(self, kind: str, namespace: str | None = None) -> list[Obj]:
        info = kind_info(kind)
        ns = namespace if info.namespaced else None
        if not self._scoped(info, ns):
            items = self.api.request("GET", info.path(ns)).get("items") or []
            return [dict(o, apiVersion=info.api_version, kind=info.kind) for o in items]
        return self.informer(kind).list(ns)

    def _fetch(self, info: KubeKind, ns: str, name: str) -> Obj | None:
        try:
            return dict(self.api.request("GET", info.path(ns, name)), apiVersion=info.api_version, kind=info.kind)
        except ApiError as exc:
            if exc.code == 404:
                return None
            raise

    def _cached(self, info: KubeKind, ns: str, name: str) -> Obj | None:
        return self.informer(info.kind).get(ns, name) if self._scoped(info, ns) else self._fetch(info, ns, name)

    # ---- writes
    def _settle(self, info: KubeKind, obj: Obj) -> Obj:
        """Put what a write returned in the cache (or take out what it removed)."""
        obj = dict(obj, apiVersion=info.api_version, kind=info.kind)
        meta = obj.get("metadata") or {}
        ns = namespace_for(info, meta.get("namespace"))
        if self._scoped(info, ns) and info.kind in self._informers:
            gone = meta.get("deletionTimestamp") and not meta.get("finalizers") \
                and not meta.get("deletionGracePeriodSeconds")
            (self._informers[info.kind].forget if gone else self._informers[info.kind].remember)(obj)
        return obj

    def _write(self, info: KubeKind, method: str, path: str, body: Any, what: str,
               content_type: str = "application/json", query: dict[str, Any] | None = None) -> Obj | None:
        """One write; 409 → Conflict, 404 → None."""
        try:
            return self._settle(info, self.api.request(method, path, query, body, content_type))
        except ApiError as exc:
            if exc.code == 409:
                raise Conflict(f"{what}: {exc.message.split(': ', 1)[-1]}") from None
            if exc.code == 404 and method != "POST":
                return None
            raise

    def _target(self, obj: Obj) -> tuple[KubeKind, str, str, Obj]:
        """(kind, namespace, name, body) of an object to write, its namespace and apiVersion set."""
        obj = copy.deepcopy(obj)
        info = kind_info(obj.get("kind"))
        meta = obj.setdefault("metadata", {})
        name = checked_name(meta.get("name"))
        ns = namespace_for(info, meta.get("namespace") or self.namespace)
        if info.namespaced:
            meta["namespace"] = checked_namespace(ns)
        else:
            meta.pop("namespace", None)
        obj["apiVersion"] = info.api_version
        return info, ns, name, obj

    def apply(self, obj: Obj, merge: Callable[[Obj | None, Obj], Obj] | None = None) -> Obj:
        """Create or update (see the module's doc); the stored object is returned."""
        info, ns, name, obj = self._target(obj)
        if merge is not None:
            return self._apply_merged(info, ns, name, obj, merge)
        stored = self._cached(info, ns, name)
        if stored is None:
            return self._create(info, ns, name, obj)
        return self._update(info, ns, name, obj, stored)

    def create(self, obj: Obj) -> Obj:
        """Create only — one POST, nothing read, no informer started: Conflict when the object
        exists. For kinds the controller may create but not read: a Secret (list and watch on
        secrets would let it read every Secret of the cluster)."""
        info, ns, name, obj = self._target(obj)
        return self._create(info, ns, name, obj)

    def _create(self, info: KubeKind, ns: str, name: str, obj: Obj) -> Obj:
        status = obj.get("status")
        body = copy.deepcopy(obj)
        body["metadata"].pop("resourceVersion", None)
        try:
            created = self._write(info, "POST", info.path(ns), body, f"{info.kind} {ns}/{name} already exists")
        except ApiError as exc:
            if exc.code == 404 and "could not find the requested resource" in exc.message:
                raise ApiError(404, "NotServed", f"cannot create {info.kind} {ns}/{name}: the API server does not "
                               f"serve {info.plural} in {info.api_version} (is its CustomResourceDefinition "
                               "installed?)") from None
            raise
        if status is not None and info.status and created.get("status") != status:
            created = self._put_status(info, ns, name, created, status) or created
        return created

    def _update(self, info: KubeKind, ns: str, name: str, obj: Obj, stored: Obj) -> Obj:
        """SQLiteStore's update rules: status, finalizers and what the server set are kept
        unless the object gives them; the resourceVersion guards the write."""
        meta, old_meta = obj["metadata"], stored["metadata"]
        for field in SERVER_META + ("resourceVersion",):
            if field in old_meta and meta.get(field) in (None, ""):
                meta[field] = old_meta[field]
        if old_meta.get("finalizers") and "finalizers" not in meta:
            meta["finalizers"] = old_meta["finalizers"]
        status = obj.pop("status", None)
        body = dict(obj, status=stored["status"]) if "status" in stored else obj
        what = f"{info.kind} {ns}/{name} changed since resourceVersion {meta.get('resourceVersion')}"
        unchanged = dict(body, metadata=dict(meta, resourceVersion=old_meta.get("resourceVersion"))) == stored
        updated = stored if unchanged else self._write(info, "PUT", info.path(ns, name), body, what)
        if updated is None:  # deleted meanwhile
            raise Conflict(f"{info.kind} {ns}/{name} was deleted meanwhile")
        if status is not None and updated.get("status") != status:
            updated = self._put_status(info, ns, name, updated, status) or updated
        return updated

    def _apply_merged(self, info: KubeKind, ns: str, name: str, obj: Obj,
                      merge: Callable[[Obj | None, Obj], Obj]) -> Obj:
        """merge(current, obj) against the server's current object (not the cache: a CLI's
        apply must see the latest), written with its resourceVersion; redone on a conflict."""
        for _ in range(MERGE_TRIES):
            current = self._fetch(info, ns, name)
            merged = merge(copy.deepcopy(current) if current else None, copy.deepcopy(obj))
            merged = self._target(merged)[3]
            try:
                if current is None:
                    return self._create(info, ns, name, merged)
                if merged == current:
                    return current
                merged["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
                return self._update(info, ns, name, merged, current)
            except Conflict:
                continue
        raise Conflict(f"{info.kind} {ns}/{name} kept changing while being applied ({MERGE_TRIES} tries)")

    def _put_status(self, info: KubeKind, ns: str, name: str, current: Obj, status: Obj) -> Obj | None:
        body = copy.deepcopy(current)
        body["status"] = status
        rv = current["metadata"].get("resourceVersion")
        return self._write(info, "PUT", info.path(ns, name, "status" if info.status else ""), body,
                           f"{info.kind} {ns}/{name} status: changed since resourceVersion {rv}")

    def update_status(self, kind: str, name: str, namespace: str, status: Obj) -> Obj | None:
        """Replace the status, through /status, guarded by the cached resourceVersion."""
        info = kind_info(kind)
        ns = namespace_for(info, namespace)
        current = self._cached(info, ns, checked_name(name))
        if current is None or current.get("status") == status:
            return current
        return self._put_status(info, ns, name, current, status)

    def _patch(self, info: KubeKind, ns: str, name: str, patch: Obj, subresource: str = "") -> Obj | None:
        what = f"{info.kind} {ns}/{name}: changed since resourceVersion " \
               f"{(patch.get('metadata') or {}).get('resourceVersion')}"
        return self._write(info, "PATCH", info.path(ns, name, subresource), patch, what,
                           content_type="application/merge-patch+json")

    def _set_fields(self, kind: str, name: str, namespace: str, part: str, fields: dict[str, Any]) -> Obj | None:
        info = kind_info(kind)
        ns = namespace_for(info, namespace)
        current = self._cached(info, ns, checked_name(name))
        if current is None or _same(current.get(part), fields):
            return current
        patch = {part: replace_patch({k: v for k, v in (current.get(part) or {}).items() if k in fields}, fields)}
        sub = "status" if part == "status" and info.status else ""
        return self._patch(info, ns, name, patch, sub)

    def merge_status(self, kind: str, name: str, namespace: str, **fields: Any) -> Obj | None:
        """Set some status fields (a merge patch through /status), keeping the others."""
        return self._set_fields(kind, name, namespace, "status", fields)

    def patch_spec(self, kind: str, name: str, namespace: str, **fields: Any) -> Obj | None:
        return self._set_fields(kind, name, namespace, "spec", fields)

    def patch_metadata(self, kind: str, name: str, namespace: str, **fields: Any) -> Obj | None:
        info = kind_info(kind)
        ns = namespace_for(info, namespace)
        mark = fields.pop("deletionTimestamp", None)
        current = self._cached(info, ns, checked_name(name))
        if current is None:
            return None
        meta = current["metadata"]
        if not _same(meta, fields):
            patch = replace_patch({k: v for k, v in meta.items() if k in fields}, fields)
            if "finalizers" in fields or "ownerReferences" in fields:
                patch["resourceVersion"] = meta.get("resourceVersion")
            current = self._patch(info, ns, name, {"metadata": patch})
        if mark and current is not None and not current["metadata"].get("deletionTimestamp"):
            self.delete(kind, name, ns)
            current = self._cached(info, ns, name)
        return current

    def annotate(self, kind: str, name: str, namespace: str, **annotations: str | None) -> Obj | None:
        info = kind_info(kind)
        ns = namespace_for(info, namespace)
        current = self._cached(info, ns, checked_name(name))
        if current is None or _same(current["metadata"].get("annotations"), annotations):
            return current
        return self._patch(info, ns, name, {"metadata": {"annotations": annotations}})

    def delete(self, kind: str, name: str, namespace: str = "default") -> bool:
        """Delete (background propagation, as kubectl); one with finalizers is only marked."""
        info = kind_info(kind)
        ns = namespace_for(info, namespace)
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": "Background"}
        try:
            gone = self.api.request("DELETE", info.path(ns, checked_name(name)), body=body)
        except ApiError as exc:
            if exc.code != 404:
                raise
            if self._scoped(info, ns) and kind in self._informers:
                self._informers[kind].forget({"metadata": {"name": name, "namespace": ns}})
            return False
        meta = gone.get("metadata") or {} if gone.get("kind") != "Status" else {}  # a Status: removed
        if meta.get("deletionTimestamp") and (meta.get("finalizers") or meta.get("deletionGracePeriodSeconds")):
            self._settle(info, gone)  # marked: the finalizers (or a Pod's kubelet) have the last word
        elif self._scoped(info, ns) and kind in self._informers:
            self._informers[kind].forget({"metadata": {"name": name, "namespace": ns,
                                                       "resourceVersion": meta.get("resourceVersion", "")}})
        return True

    # ---- events
    def add_event(self, obj: Obj, type_: str, reason: str, message: str) -> None:
        self.recorder.record(obj, type_, reason, message)

    def events(self, obj: Obj) -> list[Obj]:
        return self.recorder.events(obj)

    # ---- changes, for the loop's watcher
    def version(self) -> int:
        return self._changes.version()

    def wait_for_change(self, since: int, timeout: float) -> int:
        return self._changes.wait(since, timeout)

    def changes_since(self, since: int) -> tuple[int, list[Key] | None]:
        return self._changes.since(since)
