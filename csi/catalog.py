"""The catalog: every volume, snapshot, group snapshot and publication, in SQLite (WAL).

Each record carries a state: `creating` and `deleting` rows are operations in flight.
A crash leaves them behind; `LunService.repair()` finishes or undoes them at start-up,
so the catalog and the pool always agree.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

SCHEMA = """
CREATE TABLE IF NOT EXISTS volumes (
    id TEXT PRIMARY KEY,
    name TEXT UNIQUE NOT NULL,
    size INTEGER NOT NULL,
    state TEXT NOT NULL,
    capabilities TEXT NOT NULL DEFAULT '[]',
    parameters TEXT NOT NULL DEFAULT '{}',
    mutable TEXT NOT NULL DEFAULT '{}',
    source_kind TEXT NOT NULL DEFAULT '',
    source_id TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS snapshots (
    id TEXT PRIMARY KEY,
    name TEXT UNIQUE NOT NULL,
    volume_id TEXT NOT NULL,
    size INTEGER NOT NULL,
    state TEXT NOT NULL,
    group_id TEXT NOT NULL DEFAULT '',
    parameters TEXT NOT NULL DEFAULT '{}',
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS snapshots_volume ON snapshots(volume_id);
CREATE TABLE IF NOT EXISTS group_snapshots (
    id TEXT PRIMARY KEY,
    name TEXT UNIQUE NOT NULL,
    state TEXT NOT NULL,
    volume_ids TEXT NOT NULL,
    parameters TEXT NOT NULL DEFAULT '{}',
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS publications (
    volume_id TEXT NOT NULL,
    node_id TEXT NOT NULL,
    readonly INTEGER NOT NULL,
    capability TEXT NOT NULL,
    PRIMARY KEY (volume_id, node_id)
);
CREATE TABLE IF NOT EXISTS nodes (
    id TEXT PRIMARY KEY,
    registered REAL NOT NULL
);
"""

CREATING, READY, DELETING = "creating", "ready", "deleting"

# Members of a group snapshot are stored under names no request can use: the prefix holds
# a control character, which check_name refuses, so CreateSnapshot never meets a member.
MEMBER_PREFIX = "\x1fgroup/"


def member_name(group_name: str, volume_id: str) -> str:
    """The stored name of a group member (group names are unique, so these are too)."""
    return f"{MEMBER_PREFIX}{group_name}-{volume_id}"


@dataclass
class Volume:
    id: str
    name: str
    size: int
    state: str
    capabilities: list[dict[str, Any]] = field(default_factory=list)
    parameters: dict[str, str] = field(default_factory=dict)
    mutable: dict[str, str] = field(default_factory=dict)
    source_kind: str = ""  # "", "snapshot" or "volume"
    source_id: str = ""
    created: float = 0.0


@dataclass
class Snapshot:
    id: str
    name: str
    volume_id: str
    size: int
    state: str
    group_id: str = ""
    parameters: dict[str, str] = field(default_factory=dict)
    created: float = 0.0


@dataclass
class GroupSnapshot:
    id: str
    name: str
    state: str
    volume_ids: list[str]
    parameters: dict[str, str] = field(default_factory=dict)
    created: float = 0.0


@dataclass
class Publication:
    volume_id: str
    node_id: str
    readonly: bool
    capability: dict[str, Any]


_JSON_FIELDS = {"capabilities", "parameters", "mutable", "volume_ids", "capability"}


def _row(cls, row: sqlite3.Row | None):
    if row is None:
        return None
    values = {k: (json.loads(row[k]) if k in _JSON_FIELDS else row[k]) for k in row.keys()}
    if cls is Publication:
        values["readonly"] = bool(values["readonly"])
    return cls(**values)


def _encode(value: Any) -> Any:
    return json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else value


def create_private(path: str) -> None:
    """Create the database file readable by its owner only (it holds the Secrets users
    apply); SQLite gives its -wal and -shm files the same mode."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass


CATALOG_RESERVE = 8 << 20  # blocks held beyond the end of catalog.db and its WAL (twice the WAL's 1000-page cycle)


def reserve_space(path: str) -> None:
    """Give catalog.db and its WAL real blocks past their ends (`fallocate --keep-size`: their
    sizes do not change, SQLite sees the same files) while the host still has them: when
    something else fills the host to its last byte, the catalog's next writes and checkpoints
    land on blocks it already holds, so status, events and detaches keep being recorded.
    A child process does it: closing a descriptor of the database in this process would drop
    the POSIX locks SQLite holds on it, and other processes' writes would go unseen. Best
    effort: a host already full keeps what it has."""
    from host.command import CommandError, run

    for name in (path, path + "-wal"):
        if os.path.exists(name):
            try:
                run(["fallocate", "--keep-size", "--length", str(CATALOG_RESERVE), name], timeout=30)
            except CommandError:
                pass


def close_checkpointed(db: sqlite3.Connection) -> None:
    """Close a connection after folding the WAL back into the database file (and emptying
    it), so that a clean stop leaves no -wal file to grow or to replay."""
    try:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    except sqlite3.Error:  # another process is mid-transaction: the last closer folds it
        pass
    db.close()


class Catalog:
    """A thread-safe handle on catalog.db; one connection, short transactions."""

    def __init__(self, path: str):
        self.path = path
        create_private(path)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        # catalogs written before the member namespace named members "<group name>-<volume id>"
        self._db.execute("UPDATE snapshots SET name = ? || name WHERE group_id != '' AND substr(name, 1, 1) != ?",
                         (MEMBER_PREFIX, MEMBER_PREFIX[0]))

    def close(self) -> None:
        with self._lock:
            close_checkpointed(self._db)

    def _query(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def _exec(self, sql: str, args: tuple = ()) -> int:
        with self._lock:
            return self._db.execute(sql, args).rowcount

    def _insert(self, table: str, record: Any) -> None:
        values = {k: _encode(v) for k, v in vars(record).items()}
        cols = ", ".join(values)
        marks = ", ".join("?" for _ in values)
        self._exec(f"INSERT INTO {table} ({cols}) VALUES ({marks})", tuple(values.values()))

    def _update(self, table: str, key: str, **changes: Any) -> None:
        sets = ", ".join(f"{k} = ?" for k in changes)
        self._exec(f"UPDATE {table} SET {sets} WHERE id = ?", (*(_encode(v) for v in changes.values()), key))

    # volumes
    def add_volume(self, volume: Volume) -> None:
        volume.created = volume.created or time.time()
        self._insert("volumes", volume)

    def volume(self, volume_id: str) -> Volume | None:
        rows = self._query("SELECT * FROM volumes WHERE id = ?", (volume_id,))
        return _row(Volume, rows[0] if rows else None)

    def volume_by_name(self, name: str) -> Volume | None:
        rows = self._query("SELECT * FROM volumes WHERE name = ?", (name,))
        return _row(Volume, rows[0] if rows else None)

    def update_volume(self, volume_id: str, **changes: Any) -> None:
        self._update("volumes", volume_id, **changes)

    def remove_volume(self, volume_id: str) -> None:
        with self._lock:
            self._exec("DELETE FROM publications WHERE volume_id = ?", (volume_id,))
            self._exec("DELETE FROM volumes WHERE id = ?", (volume_id,))

    def volumes(self, *, start: str = "", limit: int = -1, state: str | None = READY) -> list[Volume]:
        """Volumes ordered by ID, from `start` on (the paging token)."""
        sql = "SELECT * FROM volumes WHERE id >= ?" + (" AND state = ?" if state else "")
        args: tuple = (start, state) if state else (start,)
        rows = self._query(sql + " ORDER BY id LIMIT ?", (*args, limit))
        return [_row(Volume, r) for r in rows]

    def provisioned_bytes(self) -> int:
        """The sum of the sizes of all volumes and all snapshots, in any state (a snapshot
        may come to hold its whole size once its volume is rewritten)."""
        return self._query("SELECT (SELECT COALESCE(SUM(size), 0) FROM volumes)"
                           " + (SELECT COALESCE(SUM(size), 0) FROM snapshots)")[0][0]

    def count_volumes(self) -> int:
        return self._query("SELECT COUNT(*) FROM volumes")[0][0]

    # snapshots
    def count_snapshots(self) -> int:
        return self._query("SELECT COUNT(*) FROM snapshots")[0][0]

    def add_snapshot(self, snapshot: Snapshot) -> None:
        snapshot.created = snapshot.created or time.time()
        self._insert("snapshots", snapshot)

    def snapshot(self, snapshot_id: str) -> Snapshot | None:
        rows = self._query("SELECT * FROM snapshots WHERE id = ?", (snapshot_id,))
        return _row(Snapshot, rows[0] if rows else None)

    def snapshot_by_name(self, name: str) -> Snapshot | None:
        rows = self._query("SELECT * FROM snapshots WHERE name = ?", (name,))
        return _row(Snapshot, rows[0] if rows else None)

    def update_snapshot(self, snapshot_id: str, **changes: Any) -> None:
        self._update("snapshots", snapshot_id, **changes)

    def remove_snapshot(self, snapshot_id: str) -> None:
        self._exec("DELETE FROM snapshots WHERE id = ?", (snapshot_id,))

    def snapshots(
        self, *, start: str = "", limit: int = -1, volume_id: str = "", group_id: str = "",
        state: str | None = READY,
    ) -> list[Snapshot]:
        sql, args = "SELECT * FROM snapshots WHERE id >= ?", [start]
        for column, value in (("volume_id", volume_id), ("group_id", group_id), ("state", state)):
            if value:
                sql += f" AND {column} = ?"
                args.append(value)
        rows = self._query(sql + " ORDER BY id LIMIT ?", (*args, limit))
        return [_row(Snapshot, r) for r in rows]

    # group snapshots
    def add_group(self, group: GroupSnapshot) -> None:
        group.created = group.created or time.time()
        self._insert("group_snapshots", group)

    def group(self, group_id: str) -> GroupSnapshot | None:
        rows = self._query("SELECT * FROM group_snapshots WHERE id = ?", (group_id,))
        return _row(GroupSnapshot, rows[0] if rows else None)

    def group_by_name(self, name: str) -> GroupSnapshot | None:
        rows = self._query("SELECT * FROM group_snapshots WHERE name = ?", (name,))
        return _row(GroupSnapshot, rows[0] if rows else None)

    def update_group(self, group_id: str, **changes: Any) -> None:
        self._update("group_snapshots", group_id, **changes)

    def remove_group(self, group_id: str) -> None:
        self._exec("DELETE FROM group_snapshots WHERE id = ?", (group_id,))

    def groups(self, state: str | None = None) -> list[GroupSnapshot]:
        sql = "SELECT * FROM group_snapshots" + (" WHERE state = ?" if state else "")
        return [_row(GroupSnapshot, r) for r in self._query(sql, (state,) if state else ())]

    # publications
    def publications(self, volume_id: str) -> list[Publication]:
        rows = self._query("SELECT * FROM publications WHERE volume_id = ? ORDER BY node_id", (volume_id,))
        return [_row(Publication, r) for r in rows]

    def publish(self, publication: Publication) -> None:
        self._insert("publications", publication)

    def unpublish(self, volume_id: str, node_id: str) -> None:
        self._exec("DELETE FROM publications WHERE volume_id = ? AND node_id = ?", (volume_id, node_id))

    def published_volumes(self) -> set[str]:
        """Every volume published on some node (what the node side may have staged)."""
        return {r[0] for r in self._query("SELECT DISTINCT volume_id FROM publications")}

    def count_on_node(self, node_id: str) -> int:
        return self._query("SELECT COUNT(*) FROM publications WHERE node_id = ?", (node_id,))[0][0]

    # nodes
    def register_node(self, node_id: str) -> None:
        self._exec("INSERT OR REPLACE INTO nodes (id, registered) VALUES (?, ?)", (node_id, time.time()))

    def node_known(self, node_id: str) -> bool:
        return bool(self._query("SELECT 1 FROM nodes WHERE id = ?", (node_id,)))

    def all_ids(self, table: str) -> Iterator[tuple[str, str]]:
        for row in self._query(f"SELECT id, state FROM {table}"):
            yield row["id"], row["state"]
