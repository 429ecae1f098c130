"""Backend `iscsi`: the file backend's LUN files, each exported as one LUN of a tgtd target.

Bytes, snapshots and clones are the file backend's (reflinks in the same pool, unchanged);
this adds where a node reaches a volume: target `iqn.2026-12.dev.pvlun:<group>-<n>`, LUN
number, portal. Volumes made for `backend: iscsi` (a StorageClass parameter, or the serve
default) are exported; others stay plain file volumes and keep the file backend's publish
context, so one pool serves both.

ControllerPublish binds the node's initiator (lun_slots.initiator_for_node) to the target's
ACL; tgt's ACLs are per target, so a node published one LUN of a target can log in to that
target and see its other LUNs (it reaches only what the ACL and CHAP let it; per-LUN masking
is not a tgt feature). Unpublish unbinds it when none of the target's LUNs is published there.

tgtd keeps nothing when it stops: `reexport` puts every target, LUN, account and ACL back
from the tables, with the same tids and numbers, at start-up and whenever the watcher finds
tgtd gone (it restarts it first).
"""

from __future__ import annotations

import logging
import threading

from csi.backends.file import FileBackend
from csi.catalog import Catalog
from csi.errors import invalid, precondition, unavailable
from csi.iscsi_exports import Export, ExportTable, accounting
from csi.lun_slots import backend_of, free_slots, group_spec, initiator_for_node, near_limit, place, target_iqn
from host.command import CommandError
from host.tgt import TgtDaemon, TgtError, check_chap
from csi.validation import QEMU_DIRECT_KEY

log = logging.getLogger("pvlun.iscsi")

# the keys Kubernetes' iSCSI volumes use in their CHAP Secrets (open-iscsi's setting names)
CHAP_USER_KEY = "node.session.auth.username"
CHAP_SECRET_KEY = "node.session.auth.password"
WATCH_EVERY = 0.5  # seconds between looks at tgtd


def chap_from(secrets: dict[str, str]) -> tuple[str, str]:
    """(user, secret) from a CreateVolume's secrets (the provisioner secret), ("", "") if none."""
    user, secret = secrets.get(CHAP_USER_KEY, ""), secrets.get(CHAP_SECRET_KEY, "")
    if not user and not secret:
        return "", ""
    if not user or not secret:
        raise invalid(f"the provisioner secret has only one of {CHAP_USER_KEY} and {CHAP_SECRET_KEY}; CHAP needs both")
    try:
        check_chap(user, secret)
    except TgtError as exc:
        raise invalid(f"the provisioner secret's {CHAP_USER_KEY}/{CHAP_SECRET_KEY}: {exc}") from None
    return user, secret


class IscsiBackend:
    name = "iscsi"

    def __init__(self, file: FileBackend, catalog: Catalog, tgtd: TgtDaemon, default: str = "file",
                 bstype: str = "rdwr"):
        self.file = file
        self.catalog = catalog
        self.tgtd = tgtd
        self.admin = tgtd.admin
        self.default = default
        self.bstype = bstype
        self.table = ExportTable(catalog.path)
        self.lock = threading.RLock()
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self.restarts = 0

    def __getattr__(self, name: str):
        """Everything about bytes is the file backend's."""
        return getattr(self.file, name)

    # ---- tgtd's life ----------------------------------------------------------------------
    def start(self) -> None:
        """Start tgtd, export what the tables hold, and watch tgtd from now on. Call after
        LunService.repair: rows of volumes the catalog no longer has are dropped first."""
        for export in self.table.exports():
            if self.catalog.volume(export.volume_id) is None:
                log.info("dropping the export of %s: the catalog has no such volume", export.volume_id)
                self.table.remove(export.volume_id)
        self.tgtd.start()
        self.reexport()
        self._watcher = threading.Thread(target=self._watch, name="tgtd-watch", daemon=True)
        self._watcher.start()

    def stop(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(10)
        with self.lock:
            self.tgtd.stop()
        self.table.close()

    def _watch(self) -> None:
        while not self._stop.wait(WATCH_EVERY):
            try:
                with self.lock:
                    if self._stop.is_set() or self.tgtd.alive():
                        continue
                    log.warning("tgtd (control port %d) is gone; starting it again and re-exporting %d LUNs",
                                self.tgtd.control_port, len(self.table.exports()))
                    self.tgtd.start()
                    self.reexport()
                    self.restarts += 1
            except Exception:  # a failed attempt is retried at the next look
                log.exception("restarting tgtd")

    def reexport(self) -> dict[str, int]:
        """Make tgtd hold every target, LUN, CHAP binding and ACL of the tables (what it has
        already is left alone); returns counts of what was added."""
        counts = {"targets": 0, "luns": 0, "acls": 0}
        with self.lock:
            present = self.admin.show()
            for tid, group, index, _ in self.table.targets():
                if tid not in present:
                    self.admin.new_target(tid, target_iqn(group, index))
                    counts["targets"] += 1
            accounts = set(self.admin.accounts())
            for export in self.table.exports():
                target = present.get(export.tid)
                if target is None or export.lun not in target.luns:
                    try:
                        self.admin.add_lun(export.tid, export.lun, self.file.volume_path(export.volume_id),
                                           self.bstype)
                    except CommandError as exc:  # its file is gone: the others still come back
                        log.error("cannot re-export %r: %s", export, exc)
                        continue
                    counts["luns"] += 1
                if export.chap_user:
                    if export.chap_user not in accounts:
                        self.admin.new_account(export.chap_user, export.chap_secret)
                        accounts.add(export.chap_user)
                    if target is None or export.chap_user not in target.accounts:
                        self.admin.bind_account(export.tid, export.chap_user)
                        present = self.admin.show()
                for pub in self.catalog.publications(export.volume_id):
                    initiator = initiator_for_node(pub.node_id)
                    if initiator not in self._acl(export.tid, present):
                        self.admin.bind_initiator(export.tid, initiator)
                        present = self.admin.show()
                        counts["acls"] += 1
        if any(counts.values()):
            log.info("re-exported to tgtd: %s", counts)
        return counts

    @staticmethod
    def _acl(tid: int, present) -> list[str]:
        target = present.get(tid)
        return target.acl if target is not None else []

    # ---- volumes ----------------------------------------------------------------------------
    def wants(self, parameters: dict[str, str]) -> bool:
        """Whether a volume with these StorageClass parameters is exported over iSCSI."""
        return backend_of(parameters, self.default) == "iscsi"

    def exported(self, volume_id: str) -> bool:
        return self.table.export(volume_id) is not None

    def export(self, volume_id: str, parameters: dict[str, str], secrets: dict[str, str]) -> str:
        """Give a new volume its LUN; returns a warning when its group is near its limit."""
        spec = group_spec(parameters)
        user, secret = chap_from(secrets)
        self._check_running()
        with self.lock:
            if user:
                known = {e.chap_user: e.chap_secret for e in self.table.exports() if e.chap_user}
                if user in known and known[user] != secret:
                    raise precondition(f"CHAP user {user} already exists with another secret: the provisioner "
                                       f"secret's {CHAP_SECRET_KEY} must be the same for every volume of that user")
            used = self.table.used(spec.group)
            index, lun = place(used, spec)
            tid, made = self.table.target_tid(spec.group, index, spec.luns_per_target)
            present = self.admin.show()
            if tid not in present:
                self.admin.new_target(tid, target_iqn(spec.group, index))
            self.admin.add_lun(tid, lun, self.file.volume_path(volume_id), self.bstype)
            try:
                if user:
                    if user not in self.admin.accounts():
                        self.admin.new_account(user, secret)
                    if tid not in present or user not in present[tid].accounts:
                        self.admin.bind_account(tid, user)
                self.table.add(volume_id, tid, lun, user, secret)
            except BaseException:
                self.admin.delete_lun(tid, lun)
                raise
            used.setdefault(index, set()).add(lun)
            if made:
                log.info("opened target %s (tid %d) for group %s", target_iqn(spec.group, index), tid, spec.group)
            warning = near_limit(used, spec)
            if warning:
                log.warning("%s", warning)
            return warning

    def _check_running(self) -> None:
        if not self.tgtd.alive():
            raise unavailable("the iSCSI target (tgtd) is not running; pvlun is starting it again, retry")

    def _unexport(self, export: Export) -> None:
        """Take the LUN off its target (if tgtd runs: start-up repair deletes before it
        starts, and a restarted tgtd re-exports only what the table still holds)."""
        with self.lock:
            if self.tgtd.alive():
                target = self.admin.show().get(export.tid)
                if target is not None and export.lun in target.luns:
                    self.admin.delete_lun(export.tid, export.lun)
            self.table.remove(export.volume_id)

    def delete_volume(self, volume_id: str) -> None:
        export = self.table.export(volume_id)
        if export is not None:
            self._unexport(export)
        self.file.delete_volume(volume_id)

    def expand_volume(self, volume_id: str, size: int) -> None:
        self.file.expand_volume(volume_id, size)
        export = self.table.export(volume_id)
        if export is not None:
            self._check_running()  # the file has grown; a restarted tgtd opens it at its new size
            with self.lock:
                self.admin.reopen_lun(export.tid, export.lun, self.file.volume_path(volume_id))

    # ---- publications -----------------------------------------------------------------------
    def publish_context(self, volume_id: str, node_id: str) -> dict[str, str]:
        """For an exported volume: let the node's initiator in, and say where the LUN is."""
        export = self.table.export(volume_id)
        if export is None:
            return self.file.publish_context(volume_id, node_id)
        self._check_running()
        initiator = initiator_for_node(node_id)
        with self.lock:
            if initiator not in self._acl(export.tid, self.admin.show()):
                self.admin.bind_initiator(export.tid, initiator)
        context = {"backend": "iscsi", "portal": self.tgtd.portal,
                   "targetIQN": target_iqn(export.group, export.index),
                   "lun": str(export.lun), "initiatorName": initiator, "volumeID": volume_id}
        if export.chap_user:
            context["chapUser"] = export.chap_user  # the secret reaches the node as its node-stage secret
        volume = self.catalog.volume(volume_id)
        if volume is not None and volume.parameters.get(QEMU_DIRECT_KEY) == "true":
            context[QEMU_DIRECT_KEY] = "true"  # the StorageClass lets QEMU log in itself (virt/iscsi_direct.py)
        return context

    def unpublish(self, volume_id: str, node_id: str) -> None:
        """After the catalog forgot the publication: unbind the node's initiator from the
        target unless another of its LUNs is still published on that node."""
        export = self.table.export(volume_id)
        if export is None:
            return
        with self.lock:
            if not self.tgtd.alive():  # a restarted tgtd lets in only the nodes still published
                return
            siblings = [e.volume_id for e in self.table.exports() if e.tid == export.tid]
            if any(p.node_id == node_id for v in siblings for p in self.catalog.publications(v)):
                return
            initiator = initiator_for_node(node_id)
            if initiator in self._acl(export.tid, self.admin.show()):
                self.admin.unbind_initiator(export.tid, initiator)

    # ---- accounting -------------------------------------------------------------------------
    def free_slots(self, parameters: dict[str, str]) -> int | None:
        spec = group_spec(parameters)
        return free_slots(self.table.used(spec.group), spec)

    def accounting(self) -> list[dict]:
        return accounting(self.table, self.catalog)
