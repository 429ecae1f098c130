"""Deletion safety: a claim being cloned, a claim being snapshotted and a snapshot being
restored are not destroyed under their reader. As Kubernetes' sidecars do, the source carries
a protection finalizer while the copy runs, its deletion waits (deletionTimestamp set, the
object still there), and the source goes once the copy is done — which holds every byte.

The pool is a plain directory on ext4 (no reflink): a copy of 384 MiB takes long enough to
delete its source in the middle. On the reflink pool, deleting a snapshot that restored claims
came from leaves them whole."""

from __future__ import annotations

import hashlib
import os
import threading
import time

import pytest

from manifests import snapshot
from controlplane.source_protection import CLONING, SNAPSHOT_AS_SOURCE

MiB = 1 << 20
DATA = 384 * MiB


def claim(name: str, source: tuple[str, str] | None = None, size: str = "512Mi") -> str:
    text = f"""apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: {name}
spec:
  volumeMode: Block
  accessModes: [ReadWriteOnce]
  resources:
    requests:
      storage: {size}
"""
    if source:
        group = "snapshot.storage.k8s.io" if source[0] == "VolumeSnapshot" else '""'
        text += f"  dataSource:\n    apiGroup: {group}\n    kind: {source[0]}\n    name: {source[1]}\n"
    return text


def fill(inst, name: str) -> str:
    """Write DATA bytes (no zero block: nothing a sparse copy could skip) and return their sha256."""
    digest = hashlib.sha256()
    with open(lun_path(inst, name), "r+b") as f:
        for i in range(DATA // MiB):
            block = (i.to_bytes(4, "little") + b"\xa5" * 60) * (MiB // 64)
            digest.update(block)
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    return digest.hexdigest()


def head_sha(inst, name: str) -> str:
    digest = hashlib.sha256()
    with open(lun_path(inst, name), "rb") as f:
        for _ in range(DATA // MiB):
            digest.update(f.read(MiB))
    return digest.hexdigest()


def bound(inst, name: str) -> bool:
    return ((inst.get("PersistentVolumeClaim", name) or {}).get("status") or {}).get("phase") == "Bound"


def has_finalizer(inst, kind: str, name: str, finalizer: str) -> bool:
    return finalizer in ((inst.get(kind, name) or {}).get("metadata") or {}).get("finalizers", [])


def lun_path(inst, name: str) -> str:
    """The claim's LUN file, in the instance's own pool (--pool) or its data dir's."""
    path = inst.lun_path(name)
    pool = getattr(inst, "pool", None)
    return os.path.join(pool, "volumes", os.path.basename(path)) if pool else path


@pytest.fixture(scope="module")
def plain(serve, tmp_path_factory):
    pool = str(tmp_path_factory.mktemp("plainpool"))
    inst = serve("--pool", pool, "--nodes", "1")
    inst.pool = pool
    return inst


def delete_while_held(inst, kind: str, name: str, finalizer: str, start) -> dict | None:
    """Run `start()` (the apply that begins the copy) and delete the source (through the store,
    as `pvlun delete` does) the moment its protection finalizer shows, from a watcher started
    before: the copy may take only a few tenths of a second. The source as it is just after."""
    seen: dict = {}

    def watch() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if has_finalizer(inst, kind, name, finalizer):
                inst.store.delete(kind, name)
                seen["after"] = inst.get(kind, name)
                return
            time.sleep(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    start()
    watcher.join()
    assert "after" in seen, f"the {finalizer} finalizer never showed on {kind} {name}"
    return seen["after"]


def cold(path: str) -> None:
    """Drop the LUN's cached pages: the copy then reads the disk, not memory, and takes a while."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def test_a_claim_deleted_while_it_is_cloned_waits_for_the_clone(plain):
    plain.apply(claim("golden"))
    plain.wait(lambda: bound(plain, "golden"), what="golden bound")
    want = fill(plain, "golden")
    cold(lun_path(plain, "golden"))
    source = delete_while_held(plain, "PersistentVolumeClaim", "golden", CLONING,
                               lambda: plain.apply(claim("copy-1", ("PersistentVolumeClaim", "golden"))))
    assert source is not None and source["metadata"].get("deletionTimestamp"), \
        "the source of a clone in progress went at once"
    plain.wait(lambda: bound(plain, "copy-1"), 60, "the clone bound")
    assert head_sha(plain, "copy-1") == want
    plain.wait(lambda: plain.get("PersistentVolumeClaim", "golden") is None, 30, "the source deleted after the clone")
    assert not any(e["reason"] == "VolumeFailedDelete" for e in plain.store.events(source))


def test_a_snapshot_deleted_while_a_claim_is_restored_from_it_waits(plain):
    plain.apply(claim("base"))
    plain.wait(lambda: bound(plain, "base"), what="base bound")
    want = fill(plain, "base")
    plain.apply(snapshot("base-snap", "base"))
    plain.wait(lambda: ((plain.get("VolumeSnapshot", "base-snap") or {}).get("status") or {}).get("readyToUse"),
               60, "the snapshot ready")
    snap = delete_while_held(plain, "VolumeSnapshot", "base-snap", SNAPSHOT_AS_SOURCE,
                             lambda: plain.apply(claim("restored", ("VolumeSnapshot", "base-snap"))))
    assert snap is not None and snap["metadata"].get("deletionTimestamp")
    plain.wait(lambda: bound(plain, "restored"), 60, "the restore bound")
    assert head_sha(plain, "restored") == want
    plain.wait(lambda: plain.get("VolumeSnapshot", "base-snap") is None, 30, "the snapshot deleted after the restore")
    assert not any(e["reason"] == "SnapshotDeleteError" for e in plain.store.events(snap))


def test_a_clone_asked_of_a_claim_being_deleted_is_never_made(plain):
    """As the external-provisioner: a claim being deleted is no clone source (it waits Pending,
    saying why), while the clone already running from it completes."""
    plain.apply(claim("leaving"))
    plain.wait(lambda: bound(plain, "leaving"), what="leaving bound")
    want = fill(plain, "leaving")
    cold(lun_path(plain, "leaving"))
    leaving = delete_while_held(plain, "PersistentVolumeClaim", "leaving", CLONING,
                                lambda: plain.apply(claim("reader", ("PersistentVolumeClaim", "leaving"))))
    assert leaving is not None and leaving["metadata"].get("deletionTimestamp")  # held by the first clone
    plain.apply(claim("late", ("PersistentVolumeClaim", "leaving")))
    plain.wait(lambda: bound(plain, "reader"), 60, "the first clone bound")
    assert head_sha(plain, "reader") == want
    plain.wait(lambda: plain.get("PersistentVolumeClaim", "leaving") is None, 30, "the source gone")
    late = plain.get("PersistentVolumeClaim", "late")
    conds = (late.get("status") or {}).get("conditions") or []
    assert late["status"]["phase"] == "Pending"
    assert any("default/leaving" in c.get("message", "") for c in conds), conds


def test_deleting_a_snapshot_leaves_the_claims_restored_from_it_whole(instance):
    instance.apply(claim("shared", size="64Mi"))
    instance.wait(lambda: bound(instance, "shared"), what="shared bound")
    with open(instance.lun_path("shared"), "r+b") as f:
        f.write(b"golden bytes " * 4096)
    instance.apply(snapshot("shared-snap", "shared"))
    instance.wait(lambda: ((instance.get("VolumeSnapshot", "shared-snap") or {}).get("status") or {}).get("readyToUse"),
                  what="the snapshot ready")
    for name in ("twin-a", "twin-b"):
        instance.apply(claim(name, ("VolumeSnapshot", "shared-snap"), size="64Mi"))
    instance.wait(lambda: bound(instance, "twin-a") and bound(instance, "twin-b"), what="both restores bound")
    instance.cli("delete", "volumesnapshot", "shared-snap")
    instance.wait(lambda: instance.get("VolumeSnapshot", "shared-snap") is None, what="the snapshot gone")
    for name in ("twin-a", "twin-b"):
        with open(instance.lun_path(name), "rb") as f:
            assert f.read(13 * 4096) == b"golden bytes " * 4096
