"""A snapshot-strategy clone from another namespace leaves its temporary VolumeSnapshot in the
source namespace, where no owner reference can point at the DataVolume: as CDI does, the
DataVolume carries `cdi.kubevirt.io/dataVolumeFinalizer` meanwhile, and deleting it midway
deletes that snapshot. Driven through the reconcile functions on a real SQLite store (no CSI
driver: the snapshot never becomes ready, so the clone stays midway for as long as the test
wants)."""

from __future__ import annotations

import os
import sys

from controlplane.admission import load_documents
from controlplane.context import Context
from controlplane.store import SQLiteStore
from importer.clone_flow import CROSS_NAMESPACE_FINALIZER, tmp_snapshot_name
from importer.reconcile import reconcile_datavolume

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "controlplane"))
from manifests import clone_grant  # noqa: E402

SETUP = """apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {name: snap-sc}
provisioner: csi.pvlun.dev
allowVolumeExpansion: true
---
apiVersion: cdi.kubevirt.io/v1beta1
kind: StorageProfile
metadata: {name: snap-sc}
spec: {cloneStrategy: snapshot}
---
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshotClass
metadata: {name: pvlun-snapshots}
driver: csi.pvlun.dev
deletionPolicy: Delete
"""


def _source(store: SQLiteStore, ns: str) -> None:
    store.apply({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "shared", "namespace": ns},
                 "spec": {"storageClassName": "snap-sc", "volumeMode": "Block", "accessModes": ["ReadWriteOnce"],
                          "resources": {"requests": {"storage": "16Mi"}}}})
    store.update_status("PersistentVolumeClaim", "shared", ns, {"phase": "Bound", "capacity": {"storage": "16Mi"}})


def _clone(store: SQLiteStore, name: str, src_ns: str) -> dict:
    return store.apply({"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
                        "metadata": {"name": name, "namespace": "default"},
                        "spec": {"source": {"pvc": {"name": "shared", "namespace": src_ns}},
                                 "storage": {"storageClassName": "snap-sc", "volumeMode": "Block",
                                             "resources": {"requests": {"storage": "16Mi"}}}}})


def _world(tmp_path) -> tuple[SQLiteStore, Context]:
    store = SQLiteStore(str(tmp_path / "objects.db"))
    for doc in load_documents(SETUP + "---\n" + clone_grant("images", "default")):
        store.apply(doc)
    for ns in ("images", "default"):
        _source(store, ns)
    return store, Context(store, None, str(tmp_path / "data"), ["node-1"])


def _midway(store: SQLiteStore, ctx: Context, name: str, src_ns: str) -> dict:
    """Reconcile until the temporary snapshot exists (the clone then waits for it to be ready)."""
    dv = _clone(store, name, src_ns)
    for _ in range(5):
        reconcile_datavolume(ctx, store.get("DataVolume", name, "default"))
        if store.get("VolumeSnapshot", tmp_snapshot_name(dv), src_ns) is not None:
            return store.get("DataVolume", name, "default")
    raise AssertionError(f"no temporary snapshot: {store.get('DataVolume', name, 'default').get('status')}")


def test_deleting_a_cross_namespace_clone_midway_deletes_its_temporary_snapshot(tmp_path):
    store, ctx = _world(tmp_path)
    dv = _midway(store, ctx, "x-ns", "images")
    assert dv["status"]["phase"] == "SnapshotForSmartCloneInProgress"
    assert CROSS_NAMESPACE_FINALIZER in dv["metadata"]["finalizers"]
    snap = store.get("VolumeSnapshot", tmp_snapshot_name(dv), "images")
    assert snap["metadata"]["labels"]["cdi.kubevirt.io/OwnedByUID"] == dv["metadata"]["uid"]
    store.delete("DataVolume", "x-ns", "default")
    held = store.get("DataVolume", "x-ns", "default")
    assert held is not None and held["metadata"].get("deletionTimestamp")  # its finalizer holds it
    reconcile_datavolume(ctx, held)
    assert store.get("VolumeSnapshot", tmp_snapshot_name(dv), "images") is None
    assert store.get("DataVolume", "x-ns", "default") is None


def test_a_clone_within_its_namespace_has_no_finalizer_its_snapshot_is_owned(tmp_path):
    store, ctx = _world(tmp_path)
    dv = _midway(store, ctx, "same-ns", "default")
    assert CROSS_NAMESPACE_FINALIZER not in dv["metadata"].get("finalizers", [])
    snap = store.get("VolumeSnapshot", tmp_snapshot_name(dv), "default")
    assert [r["uid"] for r in snap["metadata"]["ownerReferences"]] == [dv["metadata"]["uid"]]
