"""The object store the reconcile functions talk to, instead of a Kubernetes API server.

Objects are plain dicts shaped like Kubernetes objects. `SQLiteStore` keeps them in the
catalog database (embedded mode); a Kubernetes-backed store with the same methods would
serve cluster mode, so the reconcile code never imports `sqlite3` or `kubernetes`.
"""

from __future__ import annotations

import copy
import json
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any, Callable, Iterator, Protocol

Obj = dict[str, Any]

SCHEMA = """
CREATE TABLE IF NOT EXISTS objects (
    kind TEXT NOT NULL,
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    body TEXT NOT NULL,
    version INTEGER NOT NULL,
    PRIMARY KEY (kind, namespace, name)
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL, namespace TEXT NOT NULL, name TEXT NOT NULL,
    type TEXT NOT NULL, reason TEXT NOT NULL, message TEXT NOT NULL, time TEXT NOT NULL,
    count INTEGER NOT NULL DEFAULT 1, first_time TEXT NOT NULL DEFAULT '', uid TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS counter (id INTEGER PRIMARY KEY CHECK (id = 0), version INTEGER NOT NULL);
INSERT OR IGNORE INTO counter (id, version) VALUES (0, 0);
CREATE TABLE IF NOT EXISTS changes (
    version INTEGER PRIMARY KEY, kind TEXT NOT NULL, namespace TEXT NOT NULL, name TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_object ON events (kind, namespace, name);
"""
# Columns that catalogs made before repeated events were counted lack.
EVENT_COLUMNS = {"count": "INTEGER NOT NULL DEFAULT 1", "first_time": "TEXT NOT NULL DEFAULT ''",
                 "uid": "TEXT NOT NULL DEFAULT ''"}
CHANGES_KEPT = 20000  # change records a watcher may fall behind by before it must list everything again

Key = tuple[str, str, str]  # (kind, namespace, name); namespace "" for cluster-scoped kinds

# Kinds that live outside namespaces, as in Kubernetes.
CLUSTER_SCOPED = {"StorageClass", "PersistentVolume", "VolumeSnapshotClass", "VolumeSnapshotContent", "VolumeAttachment",
                  "VolumeAttributesClass", "Node", "Namespace", "StorageProfile", "VirtualMachineClusterInstancetype",
                  "VirtualMachineClusterPreference", "ClusterRole", "ClusterRoleBinding"}


class Conflict(Exception):
    """A write lost a race: the object changed since the version it was based on (HTTP 409
    on a Kubernetes API). Nothing was written; read the object again and retry (a controller
    requeues the key)."""


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class ObjectStore(Protocol):
    def get(self, kind: str, name: str, namespace: str = "default") -> Obj | None: ...
    def list(self, kind: str, namespace: str | None = None) -> list[Obj]: ...
    def apply(self, obj: Obj, merge: Callable[[Obj | None, Obj], Obj] | None = None) -> Obj: ...
    def create(self, obj: Obj) -> Obj: ...
    def update_status(self, kind: str, name: str, namespace: str, status: Obj) -> Obj | None: ...
    def merge_status(self, kind: str, name: str, namespace: str, **fields: Any) -> Obj | None: ...
    def patch_metadata(self, kind: str, name: str, namespace: str, **fields: Any) -> Obj | None: ...
    def patch_spec(self, kind: str, name: str, namespace: str, **fields: Any) -> Obj | None: ...
    def annotate(self, kind: str, name: str, namespace: str, **annotations: str | None) -> Obj | None: ...
    def delete(self, kind: str, name: str, namespace: str = "default") -> bool: ...
    def add_event(self, obj: Obj, type_: str, reason: str, message: str) -> None: ...
    def events(self, obj: Obj) -> list[Obj]: ...
    def version(self) -> int: ...
    def wait_for_change(self, since: int, timeout: float) -> int: ...
    def changes_since(self, since: int) -> tuple[int, list[Key] | None]: ...


def namespace_of(obj: Obj) -> str:
    if obj.get("kind") in CLUSTER_SCOPED:
        return ""
    return obj.get("metadata", {}).get("namespace") or "default"


POLL_SECONDS = 0.01  # how soon another process's write is seen (a SELECT of one row)


class SQLiteStore:
    """Objects in SQLite; every write bumps one counter that watchers poll, and records
    which object it changed, so a watcher handles what changed rather than everything."""

    def __init__(self, path: str):
        from csi.catalog import create_private

        create_private(path)
        self._lock = threading.RLock()
        self._wake = threading.Event()  # set by this process's writes: its own watchers need not poll
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        have = {row[1] for row in self._db.execute("PRAGMA table_info(events)")}
        for column, decl in EVENT_COLUMNS.items():
            if column not in have:
                try:
                    self._db.execute(f"ALTER TABLE events ADD COLUMN {column} {decl}")
                except sqlite3.OperationalError:  # another process (the daemon, a CLI) added it first
                    pass

    def close(self) -> None:
        from csi.catalog import close_checkpointed

        with self._lock:
            close_checkpointed(self._db)

    def _bump(self, kind: str, namespace: str, name: str) -> int:
        """Next version, recorded as a change of this object (inside the caller's transaction)."""
        self._db.execute("UPDATE counter SET version = version + 1 WHERE id = 0")
        version = self._db.execute("SELECT version FROM counter WHERE id = 0").fetchone()[0]
        self._db.execute("INSERT OR REPLACE INTO changes (version, kind, namespace, name) VALUES (?,?,?,?)",
                         (version, kind, self._ns(kind, namespace), name))
        if version % 1000 == 0:
            self._db.execute("DELETE FROM changes WHERE version <= ?", (version - CHANGES_KEPT,))
        self._wake.set()  # a woken watcher's version() waits for this write's lock, so sees its commit
        return version

    def version(self) -> int:
        with self._lock:
            return self._db.execute("SELECT version FROM counter WHERE id = 0").fetchone()[0]

    def wait_for_change(self, since: int, timeout: float) -> int:
        """Woken at once by a write of this process; another process's (a CLI's) is seen
        within POLL_SECONDS: each hop of a reconcile chain costs milliseconds, not a poll."""
        deadline = time.monotonic() + timeout
        while True:
            current = self.version()
            left = deadline - time.monotonic()
            if current != since or left <= 0:
                return current
            self._wake.wait(min(POLL_SECONDS, left))
            self._wake.clear()

    def changes_since(self, since: int) -> tuple[int, list[Key] | None]:
        """(current version, the objects written after `since`, each once); None instead of the
        list when the records no longer reach back that far (list everything again)."""
        with self._lock:
            version = self._db.execute("SELECT version FROM counter WHERE id = 0").fetchone()[0]
            if since >= version:
                return version, []
            oldest = self._db.execute("SELECT MIN(version) FROM changes").fetchone()[0]
            if since < 0 or oldest is None or oldest > since + 1:
                return version, None
            rows = self._db.execute("SELECT kind, namespace, name FROM changes WHERE version > ? AND version <= ? "
                                    "ORDER BY version", (since, version)).fetchall()
        return version, list(dict.fromkeys((k, ns, n) for k, ns, n in rows))

    @staticmethod
    def _ns(kind: str, namespace: str | None) -> str:
        return "" if kind in CLUSTER_SCOPED else (namespace or "default")

    def get(self, kind: str, name: str, namespace: str = "default") -> Obj | None:
        with self._lock:
            return self._read(kind, name, namespace)

    def list(self, kind: str, namespace: str | None = None) -> list[Obj]:
        sql, args = "SELECT body FROM objects WHERE kind=?", [kind]
        if namespace is not None and kind not in CLUSTER_SCOPED:
            sql += " AND namespace=?"
            args.append(namespace)
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY namespace, name", args).fetchall()
        return [json.loads(r[0]) for r in rows]

    def _put(self, obj: Obj) -> Obj:
        """Store the object as its next version (inside the caller's transaction)."""
        meta = obj["metadata"]
        version = self._bump(obj["kind"], namespace_of(obj), meta["name"])
        meta["resourceVersion"] = str(version)
        self._db.execute(
            "INSERT OR REPLACE INTO objects (kind, namespace, name, body, version) VALUES (?,?,?,?,?)",
            (obj["kind"], namespace_of(obj), meta["name"], json.dumps(obj), version))
        return obj

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE under the lock; COMMIT after the body (unless it ended the
        transaction itself), ROLLBACK when it raises."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
            if self._db.in_transaction:
                self._db.execute("COMMIT")

    def _write(self, obj: Obj) -> Obj:
        with self._transaction():
            self._put(obj)
        return obj

    def _read(self, kind: str, name: str, namespace: str) -> Obj | None:
        row = self._db.execute("SELECT body FROM objects WHERE kind=? AND namespace=? AND name=?",
                               (kind, self._ns(kind, namespace), name)).fetchone()
        return json.loads(row[0]) if row else None

    def apply(self, obj: Obj, merge: Callable[[Obj | None, Obj], Obj] | None = None) -> Obj:
        """Create or update an object; its status and what the server set are kept.

        Without `merge` the given spec replaces the stored one (an update: controllers write
        their own objects so). With it, `merge(stored or None, obj)` says what to store, read
        and written in one transaction, so a controller's write in between is never lost
        (`pvlun apply`: kubectl's merge and the API server's update rules); it may raise to
        refuse, and an update that changes nothing is not written."""
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        if obj["kind"] not in CLUSTER_SCOPED:
            meta.setdefault("namespace", "default")
        with self._transaction():
            old = self._read(obj["kind"], meta["name"], meta.get("namespace", ""))
            if merge is not None:
                obj = merge(copy.deepcopy(old) if old else None, obj)
                meta = obj["metadata"]
                if obj == old:
                    self._db.execute("ROLLBACK")
                    return obj
            if old:
                old_meta = old["metadata"]
                meta["uid"] = old_meta["uid"]
                meta["creationTimestamp"] = old_meta["creationTimestamp"]
                if "status" in old and "status" not in obj:
                    obj["status"] = old["status"]
                if old_meta.get("finalizers") and "finalizers" not in meta:
                    meta["finalizers"] = old_meta["finalizers"]
                if old_meta.get("deletionTimestamp"):
                    meta["deletionTimestamp"] = old_meta["deletionTimestamp"]
                meta["generation"] = old_meta.get("generation", 1) + (old.get("spec") != obj.get("spec"))
            else:
                meta["uid"] = str(uuid.uuid4())
                meta["creationTimestamp"] = now()
                meta["generation"] = 1
            self._put(obj)
        return obj

    def create(self, obj: Obj) -> Obj:
        """Create only: Conflict when the object exists (the API server's AlreadyExists)."""
        def only_new(old: Obj | None, new: Obj) -> Obj:
            if old is not None:
                raise Conflict(f"{new['kind']} {namespace_of(new)}/{new['metadata']['name']} already exists")
            return new

        return self.apply(obj, merge=only_new)

    def _mutate(self, kind: str, name: str, namespace: str, change: Callable[[Obj], bool]) -> Obj | None:
        """Read, change and write one object in a single transaction, so writers in other
        processes (the CLI and the daemon) never lose each other's updates."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT body FROM objects WHERE kind=? AND namespace=? AND name=?",
                                       (kind, self._ns(kind, namespace), name)).fetchone()
                if row is None:
                    self._db.execute("ROLLBACK")
                    return None
                obj = json.loads(row[0])
                if not change(obj):
                    self._db.execute("ROLLBACK")
                    return obj
                version = self._bump(kind, namespace, name)
                obj["metadata"]["resourceVersion"] = str(version)
                self._db.execute("UPDATE objects SET body=?, version=? WHERE kind=? AND namespace=? AND name=?",
                                 (json.dumps(obj), version, kind, self._ns(kind, namespace), name))
                self._db.execute("COMMIT")
                return obj
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    def update_status(self, kind: str, name: str, namespace: str, status: Obj) -> Obj | None:
        def change(obj: Obj) -> bool:
            if obj.get("status") == status:
                return False
            obj["status"] = status
            return True

        return self._mutate(kind, name, namespace, change)

    def merge_status(self, kind: str, name: str, namespace: str, **fields: Any) -> Obj | None:
        """Set some status fields, keeping the others as they are now."""
        return self._set_fields(kind, name, namespace, "status", fields)

    def _set_fields(self, kind: str, name: str, namespace: str, part: str, fields: dict[str, Any]) -> Obj | None:
        """Set some fields of the object's `part` (status, spec) atomically, keeping the rest."""
        def change(obj: Obj) -> bool:
            target = obj.setdefault(part, {})
            if all(target.get(k) == v for k, v in fields.items()):
                return False
            target.update(fields)
            return True

        return self._mutate(kind, name, namespace, change)

    def patch_metadata(self, kind: str, name: str, namespace: str, **fields: Any) -> Obj | None:
        def change(obj: Obj) -> bool:
            obj["metadata"].update(fields)
            return True

        return self._mutate(kind, name, namespace, change)

    def patch_spec(self, kind: str, name: str, namespace: str, **fields: Any) -> Obj | None:
        """Set some spec fields atomically (a controller's own fields: a claim's volumeName),
        keeping whatever else was written meanwhile."""
        return self._set_fields(kind, name, namespace, "spec", fields)

    def annotate(self, kind: str, name: str, namespace: str, **annotations: str | None) -> Obj | None:
        """Set (or, with None, remove) annotations atomically."""
        def change(obj: Obj) -> bool:
            current = obj["metadata"].setdefault("annotations", {})
            for key, value in annotations.items():
                if value is None:
                    current.pop(key, None)
                else:
                    current[key] = value
            return True

        return self._mutate(kind, name, namespace, change)

    def delete(self, kind: str, name: str, namespace: str = "default") -> bool:
        """Remove an object; one with finalizers is only marked (deletionTimestamp), as Kubernetes does."""
        with self._lock:
            obj = self.get(kind, name, namespace)
            if obj is None:
                return False
            if obj["metadata"].get("finalizers"):
                if not obj["metadata"].get("deletionTimestamp"):
                    obj["metadata"]["deletionTimestamp"] = now()
                    self._write(obj)
                return True
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("DELETE FROM objects WHERE kind=? AND namespace=? AND name=?",
                             (kind, self._ns(kind, namespace), name))
            self._bump(kind, namespace, name)
            self._db.execute("COMMIT")
            return True

    def add_event(self, obj: Obj, type_: str, reason: str, message: str) -> None:
        """Record an event; the same one again (object, type, reason, message) only bumps its
        count and last time, as Kubernetes' event correlator does."""
        meta = obj["metadata"]
        key = (obj["kind"], namespace_of(obj), meta["name"], meta.get("uid", ""), type_, reason, message)
        stamp = now()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                bumped = self._db.execute(
                    "UPDATE events SET count = count + 1, time = ? WHERE seq = (SELECT MAX(seq) FROM events WHERE "
                    "kind=? AND namespace=? AND name=? AND uid=? AND type=? AND reason=? AND message=?)",
                    (stamp, *key)).rowcount
                if not bumped:
                    self._db.execute(
                        "INSERT INTO events (kind, namespace, name, uid, type, reason, message, time, first_time, count) "
                        "VALUES (?,?,?,?,?,?,?,?,?,1)", (*key, stamp, stamp))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def events(self, obj: Obj) -> list[Obj]:
        """The object's events, oldest last seen first; `time` is when each was last seen.
        Matched by uid (kubectl describe's involvedObject.uid): a deleted namesake's events,
        written after it went, are not this object's."""
        sql = "SELECT type, reason, message, time, first_time, count FROM events WHERE kind=? AND namespace=? AND name=?"
        args = [obj["kind"], namespace_of(obj), obj["metadata"]["name"]]
        if obj["metadata"].get("uid"):
            sql += " AND uid=?"
            args.append(obj["metadata"]["uid"])
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY time, seq", args).fetchall()
        return [{"type": t, "reason": r, "message": m, "time": ts, "firstTime": first or ts, "count": count}
                for t, r, m, ts, first, count in rows]


def remove_finalizer(store: ObjectStore, obj: Obj, finalizer: str) -> None:
    """Drop one finalizer; an object being deleted goes away when none remain."""
    meta = obj["metadata"]
    left = [f for f in meta.get("finalizers", []) if f != finalizer]
    store.patch_metadata(obj["kind"], meta["name"], meta.get("namespace", ""), finalizers=left)
    if not left and meta.get("deletionTimestamp"):
        store.delete(obj["kind"], meta["name"], meta.get("namespace", "default"))


def set_condition(status: Obj, type_: str, state: bool, reason: str = "", message: str = "") -> None:
    """Set one Kubernetes-style condition in status['conditions'], keeping the transition time."""
    conditions = status.setdefault("conditions", [])
    value = "True" if state else "False"
    for c in conditions:
        if c["type"] == type_:
            if c["status"] != value:
                c["lastTransitionTime"] = now()
            c.update(status=value, reason=reason, message=message, lastHeartbeatTime=now())
            return
    conditions.append({"type": type_, "status": value, "reason": reason, "message": message,
                       "lastTransitionTime": now(), "lastHeartbeatTime": now()})
