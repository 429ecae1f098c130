"""The driver core: volumes and publications here, snapshots and group snapshots in
csi/snapshot_ops.py (a mixin of the same core).

Every change follows one order — catalog row `creating`, backend bytes, row `ready`
(and `deleting`, bytes removed, row removed) — so `repair()` can tell, after a crash,
exactly what to finish or undo. Methods raise CsiError; the gRPC layer stays thin.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from csi import validation as v
from csi.backends.base import Backend, Exporter
from csi.capacity import Capacity, PoolUsage, human
from csi.catalog import CREATING, DELETING, READY, Catalog, Publication, Volume
from csi.lun_slots import backend_of, group_spec
from csi.errors import already_exists, exhausted, invalid, not_found, out_of_range, precondition, shown
from csi.locks import KeyedLocks
from csi.pool_image import PoolBacking
from csi.snapshot_ops import SnapshotOps
from csi.validation import Capability

log = logging.getLogger("pvlun.csi")


class LunService(SnapshotOps):
    def __init__(self, catalog: Catalog, backend: Backend, max_volumes_per_node: int = 256,
                 overcommit: float = 1.0, backing: PoolBacking | None = None):
        self.catalog = catalog
        self.backend = backend
        self.locks = KeyedLocks()
        self.max_volumes_per_node = max_volumes_per_node
        # what is provisioned, what is usable: on the host space behind the pool, if we know it
        measure = (lambda: backing.adjust(backend.space())) if backing else backend.space
        grow = backing.grow if backing is not None and backing.image else None
        self.ledger = Capacity(catalog, measure, overcommit, grow)
        self.exporter = backend if isinstance(backend, Exporter) else None
        # told of a create that brought a LUN group near its limit (the control plane makes it an event)
        self.on_warning: Callable[[str], None] = lambda message: None

    # ---- crash repair -------------------------------------------------------------
    def repair(self) -> dict[str, int]:
        """Finish or undo whatever a crash interrupted; make the pool match the catalog."""
        counts = {"leftovers": len(self.backend.remove_leftovers()), "undone": 0, "orphans": 0, "lost": 0}
        for group in self.catalog.groups():
            if group.state != READY:
                for snap in self.catalog.snapshots(group_id=group.id, state=None):
                    self.backend.delete_snapshot(snap.id)
                    self.catalog.remove_snapshot(snap.id)
                self.catalog.remove_group(group.id)
                counts["undone"] += 1
        for volume_id, state in list(self.catalog.all_ids("volumes")):
            if state != READY:
                self.backend.delete_volume(volume_id)
                self.catalog.remove_volume(volume_id)
                counts["undone"] += 1
        for snapshot_id, state in list(self.catalog.all_ids("snapshots")):
            if state != READY:
                self.backend.delete_snapshot(snapshot_id)
                self.catalog.remove_snapshot(snapshot_id)
                counts["undone"] += 1
        stored_volumes, stored_snapshots = self.backend.stored_ids()
        known_volumes = {i for i, _ in self.catalog.all_ids("volumes")}
        known_snapshots = {i for i, _ in self.catalog.all_ids("snapshots")}
        for orphan in stored_volumes - known_volumes:
            self.backend.delete_volume(orphan)
            counts["orphans"] += 1
        for orphan in stored_snapshots - known_snapshots:
            self.backend.delete_snapshot(orphan)
            counts["orphans"] += 1
        for volume_id in known_volumes:
            if volume_id not in stored_volumes:
                log.error("volume %s is in the catalog but its LUN is gone", volume_id)
                counts["lost"] += 1
                continue
            record = self.catalog.volume(volume_id)
            size = self.backend.volume_size(volume_id)
            if record and size > record.size:  # an expansion finished on disk, not in the catalog
                self.catalog.update_volume(volume_id, size=size)
        counts["lost"] += len(known_snapshots - stored_snapshots)
        self.ledger.forget()  # recounted from the catalog on next use
        return counts

    # ---- volumes ---------------------------------------------------------------
    def create_volume(
        self, name: str, required: int, limit: int, capabilities: list[Capability],
        parameters: dict[str, str], mutable: dict[str, str], source_kind: str = "", source_id: str = "",
        secrets: dict[str, str] | None = None,
    ) -> Volume:
        v.check_name(name)
        v.require(capabilities, "volume_capabilities")
        for cap in capabilities:
            v.check_capability(cap)
        v.check_parameters(parameters)
        export = self.wants_export(parameters)
        mutable = {**v.check_mutable(parameters, allow_other=True), **v.check_mutable(mutable)}
        with self.locks.hold("volume-name:" + name):
            existing = self.catalog.volume_by_name(name)
            if existing:
                return self._same_volume(existing, required, limit, capabilities, parameters, source_kind, source_id)
            with self.locks.hold(source_id):  # from the check to the copy: a concurrent delete waits
                source_size = self._source_size(source_kind, source_id)
                # a restore or clone without a capacity range gets its source's size
                size = v.size_from_range(required or source_size, limit, source_size)
                if source_size and limit and source_size > limit:
                    raise out_of_range(f"the source holds {source_size} bytes, more than limit_bytes {limit}")
                with self.ledger.lock:
                    if source_kind:
                        self.ledger.check_real_use("clones or restores")
                    self.ledger.check_room(size, f"{human(size)} was asked for")
                    volume = Volume(v.new_id("vol"), name, size, CREATING, [c.as_dict() for c in capabilities],
                                    dict(parameters), mutable, source_kind, source_id)
                    self.catalog.add_volume(volume)
                    self.ledger.account(size)
                warning = self._fill(volume, source_kind, source_id, (secrets or {}) if export else None)
            if warning:
                self.on_warning(warning)
            self.catalog.update_volume(volume.id, state=READY)
            volume.state = READY
            return volume

    def _source_size(self, kind: str, source_id: str) -> int:
        if kind == "snapshot":
            snap = self.catalog.snapshot(source_id) if v.is_id(v.SNAPSHOT_ID, source_id) else None
            if not snap or snap.state != READY:
                raise not_found(f"source snapshot {shown(source_id)} does not exist")
            return snap.size
        if kind == "volume":
            vol = self.catalog.volume(source_id) if v.is_id(v.VOLUME_ID, source_id) else None
            if not vol or vol.state != READY:
                raise not_found(f"source volume {shown(source_id)} does not exist")
            return vol.size
        return 0

    def _fill(self, volume: Volume, kind: str, source_id: str, export_secrets: dict[str, str] | None) -> str:
        """Make the LUN's bytes and, with `export_secrets`, its export; undone on failure.
        Returns the exporter's warning (a LUN group near its limit), or ""."""
        try:
            if kind == "snapshot":
                self.backend.restore_volume(volume.id, source_id, volume.size)
            elif kind == "volume":
                self.backend.clone_volume(volume.id, source_id, volume.size)
            else:
                self.backend.create_volume(volume.id, volume.size)
            if export_secrets is not None:
                return self.exporter.export(volume.id, volume.parameters, export_secrets)
            return ""
        except BaseException:
            with self.ledger.lock:
                self.backend.delete_volume(volume.id)
                self.catalog.remove_volume(volume.id)
                self.ledger.account(-volume.size)
            raise

    def wants_export(self, parameters: dict[str, str]) -> bool:
        """Whether a volume of these parameters is exported (backend iscsi); refuses, before
        anything is made, a backend this driver does not run or a malformed group."""
        if self.exporter is None:
            if backend_of(parameters, "file") != "file":
                raise precondition("this driver runs only the file backend; start pvlun serve with "
                                   "--backend iscsi (or --iscsi-portal) for StorageClasses with backend: iscsi")
            return False
        if not self.exporter.wants(parameters):
            return False
        group_spec(parameters)
        return True

    def _same_volume(self, existing: Volume, required: int, limit: int, capabilities: list[Capability],
                     parameters: dict[str, str], source_kind: str, source_id: str) -> Volume:
        if existing.state != READY:
            raise precondition(f"volume {shown(existing.name)} is being created or deleted; retry")
        problems = []
        if required and existing.size < required:
            problems.append(f"size {existing.size} < required {required}")
        if limit and existing.size > limit:
            problems.append(f"size {existing.size} > limit {limit}")
        if (existing.source_kind, existing.source_id) != (source_kind, source_id):
            problems.append("a different content source")
        if existing.parameters != parameters:
            problems.append("different parameters")
        stored = {Capability.from_dict(c) for c in existing.capabilities}
        if not set(capabilities) <= stored:
            problems.append("different capabilities")
        if problems:
            raise already_exists(f"volume {shown(existing.name)} already exists with {', '.join(problems)}")
        return existing

    def get_volume(self, volume_id: str) -> Volume:
        v.require(volume_id, "volume_id")
        volume = self.catalog.volume(volume_id) if v.is_id(v.VOLUME_ID, volume_id) else None
        if not volume or volume.state != READY:
            raise not_found(f"volume {shown(volume_id)} does not exist")
        return volume

    def delete_volume(self, volume_id: str) -> None:
        v.require(volume_id, "volume_id")
        if not v.is_id(v.VOLUME_ID, volume_id):
            return  # never ours: already "deleted"
        with self.locks.hold(volume_id):
            volume = self.catalog.volume(volume_id)
            if not volume:
                return
            nodes = [p.node_id for p in self.catalog.publications(volume_id)]
            if nodes:
                raise precondition(f"volume {volume_id} is still published on {', '.join(nodes)}; unpublish it first")
            self.catalog.update_volume(volume_id, state=DELETING)
            with self.ledger.lock:
                self.backend.delete_volume(volume_id)
                self.catalog.remove_volume(volume_id)
                self.ledger.account(-volume.size)

    def expand_volume(self, volume_id: str, required: int, limit: int) -> tuple[Volume, bool]:
        """Grow a volume; returns it and whether the node must grow it too."""
        v.require(volume_id, "volume_id")
        if not required and not limit:
            raise invalid("capacity_range is required")
        with self.locks.hold(volume_id):
            volume = self.get_volume(volume_id)
            if limit and volume.size > limit:
                raise out_of_range(f"volume is {volume.size} bytes, already above limit_bytes {limit}; volumes cannot shrink")
            # a retry (the resizer's, after a timeout or a restart) gets the same answer as the
            # first call: one whose node expansion is still to come must not be told it is done
            node_needed = bool(self.catalog.publications(volume_id)) or any(
                c["access_type"] == "mount" for c in volume.capabilities)
            if required <= volume.size:
                return volume, node_needed
            size = v.size_from_range(required, limit)
            with self.ledger.lock:
                self.ledger.check_room(size - volume.size, f"growing needs {human(size - volume.size)} more")
                self.backend.expand_volume(volume_id, size)
                self.catalog.update_volume(volume_id, size=size)
                self.ledger.account(size - volume.size)
            volume.size = size
            return volume, node_needed

    def modify_volume(self, volume_id: str, mutable: dict[str, str]) -> Volume:
        v.require(volume_id, "volume_id")
        found = v.check_mutable(mutable)
        with self.locks.hold(volume_id):
            volume = self.get_volume(volume_id)
            volume.mutable = {**volume.mutable, **found}
            self.catalog.update_volume(volume_id, mutable=volume.mutable)
            return volume

    def list_volumes(self, max_entries: int, token: str) -> tuple[list[Volume], str]:
        return v.page(self.catalog.volumes, max_entries, token, v.VOLUME_ID)

    def volume_healthy(self, volume_id: str) -> tuple[bool, str]:
        if self.backend.volume_exists(volume_id):
            return True, "LUN present"
        return False, f"the LUN of volume {volume_id} is missing from the {self.backend.name} pool"

    # ---- publications ---------------------------------------------------------
    def publish(self, volume_id: str, node_id: str, cap: Capability, readonly: bool) -> dict[str, str]:
        v.require(volume_id, "volume_id")
        v.check_node_id(node_id)
        v.check_capability(cap)
        with self.locks.hold(volume_id):
            volume = self.get_volume(volume_id)
            if not self.exported(volume_id) and not self.catalog.node_known(node_id):
                # a volume no target exports is a file backend LUN, whatever the default backend is
                raise not_found(f"node {shown(node_id)} is not known to this driver (no node plugin registered it): "
                                "the file backend is single-node, it serves only node plugins on the host that "
                                "holds its pool (a StorageClass with backend: iscsi serves other hosts)")
            stored = [Capability.from_dict(c) for c in volume.capabilities]
            if stored and (cap.access_type not in {c.access_type for c in stored}):
                raise invalid(f"volume {volume_id} was created for {stored[0].access_type} access, not {cap.access_type}")
            pubs = {p.node_id: p for p in self.catalog.publications(volume_id)}
            mine = pubs.pop(node_id, None)
            if mine:
                if mine.readonly != readonly or Capability.from_dict(mine.capability) != cap:
                    raise already_exists(f"volume {volume_id} is already published on {node_id} with another capability or readonly flag")
                return self.backend.publish_context(volume_id, node_id)
            writers = [p for p in pubs.values() if not p.readonly]
            # what earlier publications were promised binds too: exclusivity, a single writer
            modes = {node: Capability.from_dict(p.capability).mode for node, p in pubs.items()}
            exclusive = [node for node, mode in modes.items() if mode in v.SINGLE_NODE_MODES]
            if pubs and (cap.mode in v.SINGLE_NODE_MODES or exclusive):
                raise precondition(f"volume {volume_id} is already published on {', '.join(exclusive or pubs)} "
                                   f"for single-node access")
            if writers and not readonly and (cap.mode != "MULTI_NODE_MULTI_WRITER" or any(
                    modes[p.node_id] != "MULTI_NODE_MULTI_WRITER" for p in writers)):
                raise precondition(f"volume {volume_id} already has a writer on {writers[0].node_id}")
            if self.catalog.count_on_node(node_id) >= self.max_volumes_per_node:
                raise exhausted(f"node {node_id} already has {self.max_volumes_per_node} volumes published")
            self.catalog.publish(Publication(volume_id, node_id, readonly, cap.as_dict()))
            return self.backend.publish_context(volume_id, node_id)

    def unpublish(self, volume_id: str, node_id: str) -> None:
        v.require(volume_id, "volume_id")
        if not v.is_id(v.VOLUME_ID, volume_id):
            return
        with self.locks.hold(volume_id):
            nodes = [node_id] if node_id else [p.node_id for p in self.catalog.publications(volume_id)]
            for node in nodes:
                self.catalog.unpublish(volume_id, node)
                if self.exporter is not None:
                    self.exporter.unpublish(volume_id, node)

    def exported(self, volume_id: str) -> bool:
        """Whether nodes of other hosts reach the volume (an iSCSI LUN)."""
        return self.exporter is not None and self.exporter.exported(volume_id)

    def published_nodes(self, volume_id: str) -> list[str]:
        return [p.node_id for p in self.catalog.publications(volume_id)]

    # ---- capacity (csi/capacity.py) ---------------------------------------------------
    def available_capacity(self, parameters: dict[str, str] | None = None) -> int:
        """What GetCapacity reports: what a new volume may still take (0 when the volume's
        LUN group has no slot left); CsiError for parameters CreateVolume refuses."""
        if parameters is not None:
            v.check_parameters(parameters)
        if self.exporter is not None and parameters is not None and self.exporter.wants(parameters):
            if self.exporter.free_slots(parameters) == 0:
                return 0
        return self.ledger.available()

    def pool_usage(self, fresh: bool = False) -> PoolUsage:
        """The pool's real use, for /metrics and the control plane's warnings."""
        return self.ledger.usage(fresh)
