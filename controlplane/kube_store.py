"""The ObjectStore on a Kubernetes API server (cluster mode): the same reconcile functions
and the same loop as on SQLiteStore, with the API server's rules.

- Reads come from an informer cache per kind (kube_informer), started on the first read
  of the kind (or by `start(kinds)`), as client-go's listers; the change log the embedded
  loop's watcher reads is driven by the watches.
- `apply` creates, or updates with the object's resourceVersion (the cached one when the
  object carries none): a 409 raises `Conflict` and nothing is written — never a blind
  overwrite. With `merge`, the merge is redone on the server's current object and retried.
- Status goes through the `/status` subresource: `update_status` replaces it guarded by
  the resourceVersion, `merge_status` is a merge patch of the given fields (as SQLiteStore's,
  other fields stay, and so does a spec changed meanwhile). `patch_spec`, `patch_metadata`
  and `annotate` are merge patches; a patch of finalizers or ownerReferences carries the
  resourceVersion (a lost update there would lose a cleanup). `patch_metadata(
  deletionTimestamp=...)` is a DELETE: only the API server sets that field.
- `delete` of an object with finalizers marks it (deletionTimestamp); the API server
  removes it once they are gone, so `remove_finalizer` works unchanged.
- Events are events.k8s.io/v1, counted in their series (kube_events).

This is the only module that imports `kubernetes` (tests/test_layers.py).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import socket
import threading
from collections import OrderedDict
from typing import Any, Callable, Iterable, Iterator

import urllib3
from kubernetes import config as kube_config
from kubernetes.client import ApiClient, Configuration

from controlplane.kube_events import counted_again, event_namespace, new_event, regarding, regards, same_event, shown
from controlplane.kube_informer import ChangeLog, Informer, Key
from controlplane.kube_kinds import ApiError, KubeKind, checked_name, checked_namespace, kind_info, namespace_for
from controlplane.store import Conflict, Obj
from controlplane.user_text import one_line

log = logging.getLogger("pvlun.kube")

__all__ = ["KubeStore", "Conflict", "ApiError", "KubeConfigError"]

REPORTER = "pvlun.dev/controller"  # reportingController of the Events this store writes
SYNC_TIMEOUT = 30.0  # seconds a first read of a kind waits for its list
MERGE_TRIES = 5  # apply(merge=...) redone this often against a moving object before Conflict
SERVICE_ACCOUNT_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"
# Set by the API server alone: kept from the stored object when the caller's body lacks them.
SERVER_META = ("uid", "creationTimestamp", "generation", "managedFields", "deletionTimestamp",
               "deletionGracePeriodSeconds", "selfLink")


class KubeConfigError(ValueError):
    """No usable configuration to reach a cluster (one line saying what was looked for)."""


class _LineStream:
    """A watch response, one decoded JSON event per line."""

    def __init__(self, response: urllib3.BaseHTTPResponse):
        self._response = response

    def __iter__(self) -> Iterator[Obj]:
        buffer = bytearray()
        for chunk in self._response.stream(amt=None, decode_content=True):
            buffer += chunk
            while (end := buffer.find(b"\n")) >= 0:
                line, buffer = bytes(buffer[:end]).strip(), buffer[end + 1:]
                if line:
                    yield json.loads(line)

    def close(self) -> None:
        try:
            self._response.shutdown()  # wakes a read blocked in another thread
        except Exception:  # already closed
            pass
        self._response.close()


class ClientTransport:
    """REST calls through the kubernetes client's ApiClient: its configuration, TLS and
    authentication (token refresh, exec plugins) as kubectl would use them; JSON dicts in
    and out."""

    def __init__(self, client: ApiClient):
        self.client = client

    def _call(self, method: str, path: str, query: dict[str, Any] | None, body: Any, content_type: str,
              timeout: Any) -> Any:
        headers = {"Accept": "application/json", "Content-Type": content_type}
        method, url, headers, body, _ = self.client.param_serialize(
            method, path, query_params=dict(query or {}), header_params=headers, body=body,
            auth_settings=["BearerToken"])
        try:
            return self.client.call_api(method, url, headers, body, _request_timeout=timeout)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise ApiError(0, "Unreachable", f"{method} {path}: cannot reach the API server at "
                           f"{self.client.configuration.host}: {one_line(str(exc), 200)}") from None

    @staticmethod
    def _error(method: str, path: str, status: int, data: bytes) -> ApiError:
        try:
            body = json.loads(data)
        except ValueError:
            body = {}
        body = body if isinstance(body, dict) else {}
        reason = str(body.get("reason") or "")
        message = one_line(str(body.get("message") or data[:200].decode(errors="replace") or "no message"))
        return ApiError(status, reason, f"{method} {path}: {status} {reason or 'error'}: {message}")

    def request(self, method: str, path: str, query: dict[str, Any] | None = None, body: Any = None,
                content_type: str = "application/json", timeout: float = 30.0) -> Obj:
        response = self._call(method, path, query, body, content_type, timeout)
        data = response.read()
        if not 200 <= response.status < 300:
            raise self._error(method, path, response.status, data)
        return json.loads(data) if data else {}

    def watch(self, path: str, query: dict[str, Any], seconds: int) -> _LineStream:
        response = self._call("GET", path, dict(query, timeoutSeconds=seconds), None, "application/json",
                              (10.0, seconds + 30.0))
        if response.status != 200:
            raise self._error("GET", path, response.status, response.read())
        return _LineStream(response.response)


def _in_cluster() -> bool:
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and os.path.exists(SERVICE_ACCOUNT_TOKEN)


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


class KubeStore:
    """The ObjectStore on a Kubernetes API. `namespace` is where an object that names none
    goes (as kubectl's context namespace); `watch_namespace` limits the informers to one
    namespace (None: all); `reporter` is the Events' reportingController."""

    def __init__(self, client: ApiClient, namespace: str = "default", *, watch_namespace: str | None = None,
                 reporter: str = REPORTER, sync_timeout: float = SYNC_TIMEOUT):
        self.api = ClientTransport(client)
        self.client = client
        self.namespace = checked_namespace(namespace)
        self.watch_namespace = checked_namespace(watch_namespace) if watch_namespace is not None else None
        self.reporter, self.sync_timeout = reporter, sync_timeout
        self.instance = f"{reporter.rsplit('/', 1)[-1]}-{os.environ.get('POD_NAME') or socket.gethostname()}"
        self._changes = ChangeLog()
        self._informers: dict[str, Informer] = {}
        self._lock = threading.Lock()
        self._events_lock = threading.Lock()
        self._event_names: OrderedDict[tuple, tuple[str, str]] = OrderedDict()  # recorder's cache (LRU)
        self._stopped = False

    @classmethod
    def from_kubeconfig(cls, path: str | None = None, context: str | None = None, namespace: str = "default",
                        **options: Any) -> "KubeStore":
        """A store on the cluster a kubeconfig names; with no path, the in-cluster service
        account when running in a Pod, else $KUBECONFIG, else ~/.kube/config."""
        configuration = Configuration()
        try:
            if path is None and context is None and _in_cluster():
                kube_config.load_incluster_config(client_configuration=configuration)
            else:
                path = path or os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
                if not any(os.path.isfile(p) for p in path.split(os.pathsep) if p):
                    raise KubeConfigError(f"no kubeconfig at {path[:200]} (and not running in a cluster): "
                                          "give --kubeconfig or set KUBECONFIG")
                kube_config.load_kube_config(config_file=path, context=context, client_configuration=configuration,
                                             persist_config=False)
        except kube_config.ConfigException as exc:
            raise KubeConfigError(f"cannot use the Kubernetes configuration: {one_line(str(exc), 300)}") from None
        configuration.connection_pool_maxsize = 64  # a watch per kind holds a connection
        return cls(ApiClient(configuration), namespace, **options)

    # ---- informers
    def start(self, kinds: Iterable[str] = ()) -> None:
        """Start the informers of `kinds` now and wait for their first lists (others start on
        their first read)."""
        for kind in kinds:
            self._informer(kind)

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            informers = list(self._informers.values())
        for informer in informers:
            informer.stop()
        self.client.close()

    close = stop

    def _informer(self, kind: str) -> Informer:
        info = kind_info(kind)
        with self._lock:
            if self._stopped:
                raise ApiError(0, "Stopped", "the store is stopped")
            informer = self._informers.get(kind)
            if informer is None:
                informer = Informer(info, self.api, self._changes, self.watch_namespace)
                self._informers[kind] = informer
                informer.start()
        if not informer.synced.wait(self.sync_timeout):
            raise ApiError(503, "NotSynced", f"cannot list {info.plural} after {self.sync_timeout:.0f} s: "
                           f"{informer.error or 'no answer from the API server'}")
        return informer

    def informer(self, kind: str) -> Informer:
        """The kind's informer, started and synced (its `lists` counts relists)."""
        return self._informer(kind)

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
        return self._informer(kind).get(ns, name)

    def list(self, kind: str, namespace: str | None = None) -> list[Obj]:
        info = kind_info(kind)
        ns = namespace if info.namespaced else None
        if not self._scoped(info, ns):
            items = self.api.request("GET", info.path(ns)).get("items") or []
            return [dict(o, apiVersion=info.api_version, kind=info.kind) for o in items]
        return self._informer(kind).list(ns)

    def _fetch(self, info: KubeKind, ns: str, name: str) -> Obj | None:
        try:
            return dict(self.api.request("GET", info.path(ns, name)), apiVersion=info.api_version, kind=info.kind)
        except ApiError as exc:
            if exc.code == 404:
                return None
            raise

    def _cached(self, info: KubeKind, ns: str, name: str) -> Obj | None:
        return self._informer(info.kind).get(ns, name) if self._scoped(info, ns) else self._fetch(info, ns, name)

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
        """Record an Event; the same one again counts in its series. Best effort, as
        client-go's recorder: a failure is logged, never raised into a reconcile."""
        info = kind_info(obj.get("kind"))
        wanted = new_event(info, obj, type_, reason, message, self.reporter, self.instance)
        ns = wanted["metadata"]["namespace"]
        ref = wanted["regarding"]
        cache_key = (ns, ref.get("uid") or (ref["kind"], ref.get("namespace"), ref["name"]), type_,
                     wanted["reason"], wanted["note"])
        events = kind_info("Event")
        try:
            with self._events_lock:
                for _ in range(3):
                    existing = self._existing_event(events, ns, cache_key, wanted)
                    try:
                        if existing is None:
                            saved = self.api.request("POST", events.path(ns), body=wanted)
                        else:
                            saved = self.api.request("PUT", events.path(ns, existing["metadata"]["name"]),
                                                     body=counted_again(existing))
                    except ApiError as exc:
                        if exc.code in (404, 409):  # gone, or counted by someone else meanwhile
                            self._event_names.pop(cache_key, None)
                            continue
                        raise
                    self._event_names[cache_key] = (ns, saved["metadata"]["name"])
                    self._event_names.move_to_end(cache_key)
                    while len(self._event_names) > 4096:
                        self._event_names.popitem(last=False)
                    return
        except (ApiError, ValueError) as exc:
            log.warning("event %s %s on %s %s not recorded: %s", type_, reason, info.kind, ref.get("name"), exc)

    def _existing_event(self, events: KubeKind, ns: str, cache_key: tuple, wanted: Obj) -> Obj | None:
        known = self._event_names.get(cache_key)
        if known is not None:
            try:
                return self.api.request("GET", events.path(*known))
            except ApiError as exc:
                if exc.code != 404:
                    raise
        for event in self._events_of(events, ns, wanted["regarding"], wanted["reason"]):
            if same_event(event, wanted):
                return event
        return None

    def _events_of(self, events: KubeKind, ns: str, ref: Obj, reason: str | None = None) -> list[Obj]:
        selector = [f"regarding.uid={ref['uid']}"] if ref.get("uid") else \
            [f"regarding.name={ref['name']}", f"regarding.kind={ref['kind']}"]
        if reason:
            selector.append(f"reason={reason}")
        return self.api.request("GET", events.path(ns), {"fieldSelector": ",".join(selector)}).get("items") or []

    def events(self, obj: Obj) -> list[Obj]:
        """The object's Events (matched by regarding.uid, as kubectl describe), oldest last seen first."""
        info = kind_info(obj.get("kind"))
        ref = regarding(info, obj)
        items = [e for e in self._events_of(kind_info("Event"), event_namespace(info, obj), ref) if regards(e, ref)]
        return sorted((shown(e) for e in items), key=lambda e: e["time"])

    # ---- changes, for the loop's watcher
    def version(self) -> int:
        return self._changes.version()

    def wait_for_change(self, since: int, timeout: float) -> int:
        return self._changes.wait(since, timeout)

    def changes_since(self, since: int) -> tuple[int, list[Key] | None]:
        return self._changes.since(since)
