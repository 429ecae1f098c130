"""An informer per kind, as client-go's reflector and indexer: list (with the list's
resourceVersion), then watch from it with bookmarks; a cache the reads are served from;
and one change log for all kinds, which the embedded loop's watcher already reads
(`version`, `wait_for_change`, `changes_since`).

- A watch that ends (the server's timeout, a dropped connection) resumes from the last
  resourceVersion seen (an event's or a bookmark's), so nothing in between is missed.
- 410 Gone (the HTTP status, or an ERROR event with code 410: that version is compacted
  away) lists again; the list is compared with the cache, and every object that appeared,
  changed or went is recorded as changed, so a relist loses no change either.
- A kind the server does not serve (404 on the list: its CRD is not installed) reads as
  having no objects, and is looked for again now and then.
- The store's own writes are put in the cache at once (read-your-writes: a reconciler
  writing twice in a row does not trip over its own first write); a watch event older than
  what the cache holds (resourceVersions compared as the integers they are on etcd) does
  not roll it back, and an object the store deleted does not come back from a late event.
"""

from __future__ import annotations

import copy
import logging
import random
import threading
import time
from collections import deque
from typing import Any, Iterable, Iterator, Protocol

from controlplane.kube_kinds import ApiError, KubeKind, Obj

log = logging.getLogger("pvlun.kube")

Key = tuple[str, str, str]  # (kind, namespace, name), namespace "" for cluster-scoped kinds
PAGE = 500  # objects per list page
WATCH_SECONDS = (300, 600)  # a watch asks the server to end it after this long (random, as client-go)
NOT_SERVED_RETRY = 30.0  # seconds before a kind the server did not serve is listed again
MAX_BACKOFF = 30.0


class WatchStream(Protocol):
    def __iter__(self) -> Iterator[Obj]: ...
    def close(self) -> None: ...


class Transport(Protocol):
    def request(self, method: str, path: str, query: dict[str, Any] | None = None, body: Any = None,
                content_type: str = "application/json") -> Obj: ...
    def watch(self, path: str, query: dict[str, Any], seconds: int) -> WatchStream: ...


class Expired(Exception):
    """The watch's resourceVersion is too old (410 Gone): list again."""


def newer(a: str | None, b: str | None) -> bool:
    """Whether resourceVersion `a` is later than `b`. They are etcd revisions, so integers;
    anything else (never seen on a real server) counts as later, as watch order says."""
    try:
        return int(a or 0) > int(b or 0)
    except ValueError:
        return True


def rv_of(obj: Obj) -> str:
    return str((obj.get("metadata") or {}).get("resourceVersion") or "")


class ChangeLog:
    """Which objects changed, numbered: a version counter and the last `keep` changes."""

    def __init__(self, keep: int = 20000):
        self._cond = threading.Condition()
        self._version = 0
        self._changes: deque[tuple[int, Key]] = deque(maxlen=keep)

    def record(self, key: Key) -> None:
        with self._cond:
            self._version += 1
            self._changes.append((self._version, key))
            self._cond.notify_all()

    def version(self) -> int:
        with self._cond:
            return self._version

    def wait(self, since: int, timeout: float) -> int:
        with self._cond:
            self._cond.wait_for(lambda: self._version != since, timeout)
            return self._version

    def since(self, since: int) -> tuple[int, list[Key] | None]:
        with self._cond:
            if since >= self._version:
                return self._version, []
            if since < 0 or not self._changes or self._changes[0][0] > since + 1:
                return self._version, None
            keys = [k for v, k in self._changes if v > since]
            return self._version, list(dict.fromkeys(keys))


class Informer:
    """One kind's list+watch loop and cache (all namespaces, or one)."""

    def __init__(self, info: KubeKind, api: Transport, changes: ChangeLog, namespace: str | None = None,
                 label_selector: str = ""):
        self.info, self.api, self.changes = info, api, changes
        self.label_selector = label_selector  # only these objects of the kind are listed, watched, cached
        self.namespace = namespace if info.namespaced else None
        self.synced = threading.Event()
        self.served = True
        self.error = ""  # the last failure, for whoever waits on the sync
        self.refused = False  # the last failure was 401/403: waiting will not help
        self.lists = 0  # lists made (the first, then one per 410 or failure)
        self._cache: dict[tuple[str, str], Obj] = {}
        self._gone: dict[tuple[str, str], str] = {}  # deleted by this store: resourceVersion it had
        self._lock = threading.Lock()
        self._rv = ""
        self._listed_at = 0.0
        self._stop = threading.Event()
        self._stream: WatchStream | None = None
        self._thread: threading.Thread | None = None

    def _selector(self) -> dict[str, str]:
        return {"labelSelector": self.label_selector} if self.label_selector else {}

    # ---- reads
    def get(self, namespace: str, name: str) -> Obj | None:
        with self._lock:
            obj = self._cache.get((namespace, name))
            return copy.deepcopy(obj) if obj is not None else None

    def list(self, namespace: str | None) -> list[Obj]:
        with self._lock:
            items = [o for (ns, _), o in sorted(self._cache.items()) if namespace is None or ns == namespace]
            return copy.deepcopy(items)

    def _key(self, obj: Obj) -> tuple[str, str]:
        meta = obj.get("metadata") or {}
        return (meta.get("namespace") or "default") if self.info.namespaced else "", meta.get("name", "")

    # ---- the store's own writes
    def remember(self, obj: Obj) -> None:
        """An object as a write of this store returned it."""
        k = self._key(obj)
        with self._lock:
            old = self._cache.get(k)
            if old is None or newer(rv_of(obj), rv_of(old)):
                self._cache[k] = self._typed(obj)
                self._gone.pop(k, None)

    def forget(self, obj: Obj) -> None:
        """An object this store deleted (its last state, as the DELETE returned it)."""
        k = self._key(obj)
        with self._lock:
            old = self._cache.get(k)
            if old is None or not newer(rv_of(old), rv_of(obj)):
                self._cache.pop(k, None)
                self._gone[k] = rv_of(obj)

    def _typed(self, obj: Obj) -> Obj:
        obj = copy.deepcopy(obj)
        obj["apiVersion"], obj["kind"] = self.info.api_version, self.info.kind  # list items may lack them
        return obj

    # ---- the loop
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"informer-{self.info.plural}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        stream = self._stream
        if stream is not None:
            stream.close()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        must_list, backoff = True, 0.2
        while not self._stop.is_set():
            try:
                if must_list:
                    self._list()
                    must_list = False
                if self.served:
                    self._watch()
                else:  # not served: look again later
                    self._stop.wait(NOT_SERVED_RETRY)
                    must_list = True
                backoff = 0.2
            except Expired:
                log.info("%s: resourceVersion %s is gone, listing again", self.info.plural, self._rv)
                must_list = True
                if time.monotonic() - self._listed_at < 1.0:  # a fresh list's version gone at once: do not spin
                    self._stop.wait(backoff)
                    backoff = min(MAX_BACKOFF, backoff * 2)
            except Exception as exc:  # the connection or the server: wait, then go on where it stopped
                if self._stop.is_set():
                    return
                self.error = f"{type(exc).__name__}: {exc}" if not isinstance(exc, ApiError) else str(exc)
                self.refused = isinstance(exc, ApiError) and exc.code in (401, 403)
                log.warning("%s: %s (again in %.1f s)", self.info.plural, self.error, backoff)
                self._stop.wait(backoff)
                backoff = min(MAX_BACKOFF, backoff * 2)

    def _list(self) -> None:
        path = self.info.path(self.namespace)
        items: list[Obj] = []
        query: dict[str, Any] = {"limit": PAGE, **self._selector()}
        try:
            while True:
                page = self.api.request("GET", path, query)
                items += page.get("items") or []
                token = (page.get("metadata") or {}).get("continue")
                if not token:
                    break
                query = {"limit": PAGE, "continue": token, **self._selector()}
        except ApiError as exc:
            if exc.code != 404:
                raise
            self.served, rv, items = False, "", []
        else:
            self.served, rv = True, str((page.get("metadata") or {}).get("resourceVersion") or "")
        self.lists += 1
        self._listed_at = time.monotonic()
        self._replace(items, rv)
        self.synced.set()

    def _replace(self, items: Iterable[Obj], rv: str) -> None:
        """The list's objects become the cache; whatever differs is recorded as changed."""
        listed = {self._key(o): self._typed(o) for o in items}
        changed = []
        with self._lock:
            for k in set(self._cache) | set(listed):
                old, new = self._cache.get(k), listed.get(k)
                if old is not None and (new is None and newer(rv_of(old), rv) or
                                        new is not None and newer(rv_of(old), rv_of(new))):
                    continue  # written by this store after the list was read
                if new is None:
                    del self._cache[k]
                else:
                    self._cache[k] = new
                if old is None or new is None or rv_of(old) != rv_of(new):
                    changed.append(k)
            self._gone.clear()
            self._rv = rv
        for ns, name in changed:
            self.changes.record((self.info.kind, ns, name))

    def _watch(self) -> None:
        query = {"watch": 1, "allowWatchBookmarks": "true", "resourceVersion": self._rv, **self._selector()}
        seconds = random.randint(*WATCH_SECONDS)
        try:
            stream = self.api.watch(self.info.path(self.namespace), query, seconds)
        except ApiError as exc:
            if exc.code == 410:
                raise Expired() from None
            raise
        self._stream = stream
        try:
            if self._stop.is_set():
                return
            for event in stream:
                self._handle(event)
        finally:
            self._stream = None
            stream.close()

    def _handle(self, event: Obj) -> None:
        kind, obj = event.get("type"), event.get("object") or {}
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise Expired()
            raise ApiError(int(obj.get("code") or 500), str(obj.get("reason") or ""),
                           str(obj.get("message") or "watch error"))
        rv = rv_of(obj)
        if kind == "BOOKMARK":
            self._rv = rv or self._rv
            return
        if kind not in ("ADDED", "MODIFIED", "DELETED"):
            return
        k = self._key(obj)
        with self._lock:
            old = self._cache.get(k)
            stale = old is not None and newer(rv_of(old), rv) or k in self._gone and not newer(rv, self._gone[k])
            if not stale:
                self._gone.pop(k, None)
                if kind == "DELETED":
                    self._cache.pop(k, None)
                else:
                    self._cache[k] = self._typed(obj)
            self._rv = rv or self._rv
        self.changes.record((self.info.kind, *k))
