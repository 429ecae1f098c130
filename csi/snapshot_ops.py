"""Snapshots and group snapshots of the driver core (LunService's second half).

They follow the core's one order — catalog row `creating`, backend bytes, row `ready` — and
are counted as provisioned at their volume's size (a reflink copy costs nothing now, but up
to that once its volume is rewritten), so `repair()` and the capacity ledger see them as
they see volumes. A mixin: it uses the core's catalog, backend, locks, ledger and get_volume.
"""

from __future__ import annotations

from csi import validation as v
from csi.backends.base import Backend
from csi.capacity import Capacity, human
from csi.catalog import CREATING, DELETING, READY, Catalog, GroupSnapshot, Snapshot, Volume, member_name
from csi.errors import already_exists, invalid, not_found, precondition, shown
from csi.locks import KeyedLocks


class SnapshotOps:
    catalog: Catalog
    backend: Backend
    locks: KeyedLocks
    ledger: Capacity

    def get_volume(self, volume_id: str) -> Volume: ...

    # ---- snapshots ---------------------------------------------------------
    def create_snapshot(self, name: str, volume_id: str, parameters: dict[str, str]) -> Snapshot:
        v.check_name(name)
        v.require(volume_id, "source_volume_id")
        v.check_map(parameters, "parameters")
        with self.locks.hold("snapshot-name:" + name):
            existing = self.catalog.snapshot_by_name(name)
            if existing and existing.group_id:  # cannot happen: members live in their own namespace
                raise already_exists(f"snapshot name {shown(name)} is taken by a member of group snapshot {existing.group_id}")
            if existing:
                if existing.volume_id != volume_id:
                    raise already_exists(f"snapshot {shown(name)} already exists for another volume ({existing.volume_id})")
                if existing.state != READY:
                    raise precondition(f"snapshot {shown(name)} is being created or deleted; retry")
                return existing
            with self.locks.hold(volume_id):
                volume = self.get_volume(volume_id)
                snap = Snapshot(v.new_id("snap"), name, volume_id, volume.size, CREATING, "", dict(parameters))
                self._reserve_snapshots([snap], f"the snapshot needs {human(volume.size)}")
                try:
                    self.backend.create_snapshot(snap.id, volume_id)
                except BaseException:
                    self._drop_snapshot(snap)
                    raise
            self.catalog.update_snapshot(snap.id, state=READY)
            snap.state = READY
            return snap

    def get_snapshot(self, snapshot_id: str) -> Snapshot:
        v.require(snapshot_id, "snapshot_id")
        snap = self.catalog.snapshot(snapshot_id) if v.is_id(v.SNAPSHOT_ID, snapshot_id) else None
        if not snap or snap.state != READY:
            raise not_found(f"snapshot {shown(snapshot_id)} does not exist")
        return snap

    def delete_snapshot(self, snapshot_id: str) -> None:
        v.require(snapshot_id, "snapshot_id")
        if not v.is_id(v.SNAPSHOT_ID, snapshot_id):
            return
        with self.locks.hold(snapshot_id):
            snap = self.catalog.snapshot(snapshot_id)
            if not snap:
                return
            if snap.group_id and self.catalog.group(snap.group_id):
                raise precondition(f"snapshot {snapshot_id} belongs to group snapshot {snap.group_id}; delete the group")
            self._drop_snapshot(snap)

    def _reserve_snapshots(self, snaps: list[Snapshot], asked: str) -> None:
        """Add `creating` rows for new snapshots if the pool can hold them: each may come to
        hold its volume's size once the volume is rewritten."""
        with self.ledger.lock:
            self.ledger.check_real_use("snapshots")
            self.ledger.check_room(sum(s.size for s in snaps), asked, volume=False)
            for snap in snaps:
                self.catalog.add_snapshot(snap)
                self.ledger.account(snap.size)

    def _drop_snapshot(self, snap: Snapshot) -> None:
        self.catalog.update_snapshot(snap.id, state=DELETING)
        with self.ledger.lock:
            self.backend.delete_snapshot(snap.id)
            self.catalog.remove_snapshot(snap.id)
            self.ledger.account(-snap.size)

    def list_snapshots(self, max_entries: int, token: str, snapshot_id: str, volume_id: str) -> tuple[list[Snapshot], str]:
        if snapshot_id:
            snap = self.catalog.snapshot(snapshot_id) if v.is_id(v.SNAPSHOT_ID, snapshot_id) else None
            ok = snap and snap.state == READY and (not volume_id or snap.volume_id == volume_id)
            return ([snap] if ok else []), ""
        if volume_id and not v.is_id(v.VOLUME_ID, volume_id):
            return [], ""
        return v.page(self.catalog.snapshots, max_entries, token, v.SNAPSHOT_ID, volume_id=volume_id)

    # ---- group snapshots -----------------------------------------------------
    def create_group(self, name: str, volume_ids: list[str], parameters: dict[str, str]) -> tuple[GroupSnapshot, list[Snapshot]]:
        v.check_name(name)
        v.require(volume_ids, "source_volume_ids")
        v.check_count(volume_ids, "source_volume_ids", v.MAX_GROUP_VOLUMES)
        v.check_map(parameters, "parameters")
        if len(set(volume_ids)) != len(volume_ids):
            raise invalid("source_volume_ids lists a volume twice")
        with self.locks.hold("group-name:" + name):
            existing = self.catalog.group_by_name(name)
            if existing:
                if sorted(existing.volume_ids) != sorted(volume_ids):
                    raise already_exists(f"group snapshot {shown(name)} already exists for other volumes")
                return existing, self.catalog.snapshots(group_id=existing.id)
            with self.locks.hold(*volume_ids):
                volumes = [self.get_volume(i) for i in volume_ids]
                group = GroupSnapshot(v.new_id("grp"), name, CREATING, list(volume_ids), dict(parameters))
                snaps = [Snapshot(v.new_id("snap"), member_name(name, vol.id), vol.id, vol.size, CREATING, group.id, dict(parameters))
                         for vol in volumes]
                self.catalog.add_group(group)
                try:
                    self._reserve_snapshots(snaps, f"the group snapshot needs {human(sum(s.size for s in snaps))}")
                except BaseException:
                    self.catalog.remove_group(group.id)
                    raise
                try:
                    self.backend.create_snapshots([(s.id, s.volume_id) for s in snaps])
                except BaseException:
                    for snap in snaps:
                        self._drop_snapshot(snap)
                    self.catalog.remove_group(group.id)
                    raise
            for snap in snaps:
                self.catalog.update_snapshot(snap.id, state=READY)
                snap.state = READY
            self.catalog.update_group(group.id, state=READY)
            group.state = READY
            return group, snaps

    def get_group(self, group_id: str, snapshot_ids: list[str]) -> tuple[GroupSnapshot, list[Snapshot]]:
        v.require(group_id, "group_snapshot_id")
        group = self.catalog.group(group_id) if v.is_id(v.GROUP_ID, group_id) else None
        if not group or group.state != READY:
            raise not_found(f"group snapshot {shown(group_id)} does not exist")
        snaps = self.catalog.snapshots(group_id=group_id)
        self._check_members(group_id, snaps, snapshot_ids)
        return group, snaps

    @staticmethod
    def _check_members(group_id: str, snaps: list[Snapshot], snapshot_ids: list[str]) -> None:
        if snapshot_ids and sorted(snapshot_ids) != sorted(s.id for s in snaps):
            raise invalid(f"snapshot_ids do not match the members of group snapshot {group_id}")

    def delete_group(self, group_id: str, snapshot_ids: list[str]) -> None:
        v.require(group_id, "group_snapshot_id")
        if not v.is_id(v.GROUP_ID, group_id):
            return
        with self.locks.hold(group_id):
            group = self.catalog.group(group_id)
            if not group:
                return
            snaps = self.catalog.snapshots(group_id=group_id, state=None)
            self._check_members(group_id, snaps, snapshot_ids)
        # a volume being made from a member holds that member's lock: the deletion waits for it
        with self.locks.hold(group_id, *(s.id for s in snaps)):
            snaps = self.catalog.snapshots(group_id=group_id, state=None)
            if not self.catalog.group(group_id):
                return
            self.catalog.update_group(group_id, state=DELETING)
            for snap in snaps:
                self._drop_snapshot(snap)
            self.catalog.remove_group(group_id)
