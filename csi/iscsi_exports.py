"""Which volume is which LUN of which target: the iscsi backend's own tables, in the catalog's
database (catalog.db, 0600: it holds the CHAP secrets, as it holds the Secrets users apply).

tgtd forgets everything when it stops; these rows are what pvlun puts back, with the same
target names, tids and LUN numbers, so an initiator's paths stay valid over a restart.
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass

from csi.catalog import Catalog
from csi.lun_slots import target_iqn

SCHEMA = """
CREATE TABLE IF NOT EXISTS iscsi_targets (
    tid INTEGER PRIMARY KEY AUTOINCREMENT,
    grp TEXT NOT NULL,
    idx INTEGER NOT NULL,
    luns_per_target INTEGER NOT NULL,
    UNIQUE (grp, idx)
);
CREATE TABLE IF NOT EXISTS iscsi_luns (
    volume_id TEXT PRIMARY KEY,
    tid INTEGER NOT NULL,
    lun INTEGER NOT NULL,
    chap_user TEXT NOT NULL DEFAULT '',
    chap_secret TEXT NOT NULL DEFAULT '',
    UNIQUE (tid, lun)
);
"""


@dataclass(frozen=True)
class Export:
    volume_id: str
    tid: int
    group: str
    index: int
    lun: int
    chap_user: str = ""
    chap_secret: str = ""

    def __repr__(self) -> str:  # never the secret, also not in a traceback's locals
        return f"Export({self.volume_id}, {self.group}-{self.index}, tid {self.tid}, LUN {self.lun})"


class ExportTable:
    def __init__(self, path: str):
        self._lock = threading.RLock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _q(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    _SELECT = ("SELECT l.volume_id, l.tid, t.grp, t.idx, l.lun, l.chap_user, l.chap_secret "
               "FROM iscsi_luns l JOIN iscsi_targets t ON t.tid = l.tid")

    def exports(self) -> list[Export]:
        return [Export(*r) for r in self._q(self._SELECT + " ORDER BY t.grp, t.idx, l.lun")]

    def export(self, volume_id: str) -> Export | None:
        rows = self._q(self._SELECT + " WHERE l.volume_id = ?", (volume_id,))
        return Export(*rows[0]) if rows else None

    def used(self, group: str) -> dict[int, set[int]]:
        """Target index -> LUN numbers taken, for lun_slots.place."""
        used: dict[int, set[int]] = {}
        for idx, lun in self._q("SELECT t.idx, l.lun FROM iscsi_luns l JOIN iscsi_targets t ON t.tid = l.tid "
                                "WHERE t.grp = ?", (group,)):
            used.setdefault(idx, set()).add(lun)
        return used

    def targets(self) -> list[tuple[int, str, int, int]]:
        """(tid, group, index, luns_per_target) of every target ever opened."""
        return self._q("SELECT tid, grp, idx, luns_per_target FROM iscsi_targets ORDER BY grp, idx")

    def target_tid(self, group: str, index: int, luns_per_target: int) -> tuple[int, bool]:
        """The tid of a group's target, made if new; (tid, made)."""
        with self._lock:
            rows = self._q("SELECT tid FROM iscsi_targets WHERE grp = ? AND idx = ?", (group, index))
            if rows:
                return rows[0][0], False
            cur = self._db.execute("INSERT INTO iscsi_targets (grp, idx, luns_per_target) VALUES (?, ?, ?)",
                                   (group, index, luns_per_target))
            return cur.lastrowid, True

    def add(self, volume_id: str, tid: int, lun: int, chap_user: str, chap_secret: str) -> None:
        self._q("INSERT INTO iscsi_luns (volume_id, tid, lun, chap_user, chap_secret) VALUES (?, ?, ?, ?, ?)",
                (volume_id, tid, lun, chap_user, chap_secret))

    def remove(self, volume_id: str) -> None:
        self._q("DELETE FROM iscsi_luns WHERE volume_id = ?", (volume_id,))


def accounting(table: ExportTable, catalog: Catalog) -> list[dict]:
    """One row per target: group, IQN, tid, LUNs used, the limit, the nodes it is published on
    (with how many of its LUNs each)."""
    rows = []
    by_tid: dict[int, list[Export]] = {}
    for e in table.exports():
        by_tid.setdefault(e.tid, []).append(e)
    for tid, group, index, limit in table.targets():
        nodes: dict[str, int] = {}
        for e in by_tid.get(tid, []):
            for p in catalog.publications(e.volume_id):
                nodes[p.node_id] = nodes.get(p.node_id, 0) + 1
        rows.append({"group": group, "target": target_iqn(group, index), "tid": tid,
                     "used": len(by_tid.get(tid, [])), "limit": limit, "nodes": dict(sorted(nodes.items()))})
    return rows
