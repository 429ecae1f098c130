"""DataVolume clones by CDI's strategies through `pvlun serve`: which one runs and why (the
DataVolume's cloneType annotation and events), every one byte-exact against its source."""

from __future__ import annotations

import os
import time

import pytest

from test_datavolume import dv

MiB = 1 << 20
CLONE_TYPE = "cdi.kubevirt.io/cloneType"


def golden_bytes(size: int = 8 * MiB) -> bytes:
    """A disk with data at both ends and in the middle, holes between."""
    data = bytearray(size)
    data[:512] = b"PVLUN-GOLDEN".ljust(512, b"\x01")
    data[size // 2:size // 2 + MiB] = os.urandom(MiB)
    data[-4096:] = os.urandom(4096)
    return bytes(data)


@pytest.fixture(scope="module")
def golden(instance, web):
    """A 16 MiB Block DataVolume and a 16 MiB Filesystem one (disk.img), imported from the same raw disk."""
    want = golden_bytes()
    with open(os.path.join(web.root, "golden.raw"), "wb") as f:
        f.write(want)
    instance.apply(dv("golden-blk", f"    http:\n      url: {web.url}/golden.raw", size="16Mi") + "---\n"
                   + dv("golden-fs", f"    http:\n      url: {web.url}/golden.raw", size="16Mi", mode="Filesystem")
                   + "---\n" + SNAPSHOT_CLASS, "--wait")
    return want


SNAPSHOT_CLASS = """apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshotClass
metadata:
  name: pvlun-snapshots
driver: csi.pvlun.dev
deletionPolicy: Delete
"""


def storage_class(name: str, annotation: str | None = None, profile: str | None = None) -> str:
    text = f"""apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: {name}
"""
    if annotation:
        text += f"  annotations:\n    cdi.kubevirt.io/clone-strategy: {annotation}\n"
    text += "provisioner: csi.pvlun.dev\nallowVolumeExpansion: true\n"
    if profile:
        text += f"""---
apiVersion: cdi.kubevirt.io/v1beta1
kind: StorageProfile
metadata:
  name: {name}
spec:
  cloneStrategy: {profile}
"""
    return text


def clone(name: str, source: str, size: str = "16Mi", mode: str = "Block", sc: str | None = None) -> str:
    text = dv(name, f"    pvc:\n      name: {source}", size=size, mode=mode)
    return text + f"    storageClassName: {sc}\n" if sc else text


def disk_of(instance, claim: str) -> bytes:
    """The claim's disk: the LUN of a Block volume, disk.img inside a Filesystem one (debugfs reads it unmounted)."""
    path = instance.lun_path(claim)
    pvc = instance.get("PersistentVolumeClaim", claim)
    if pvc["spec"]["volumeMode"] == "Block":
        with open(path, "rb") as f:
            return f.read()
    import subprocess

    out = os.path.join(os.path.dirname(instance.data_dir), f"{claim}.disk.img")
    subprocess.run(["debugfs", "-R", f"dump /disk.img {out}", path], check=True, capture_output=True)
    try:
        with open(out, "rb") as f:
            return f.read()
    finally:
        os.unlink(out)


def holds(disk: bytes, want: bytes) -> bool:
    """The disk is the golden image, then zeros (a volume larger than the image)."""
    return disk[:len(want)] == want and not disk[len(want):].strip(b"\0")


def events_of(instance, name: str) -> list[tuple[str, str]]:
    return [(e.get("reason"), e.get("note") or e.get("message")) for e in instance.store.events(instance.get("DataVolume", name))]


def cloned(instance, name: str) -> dict:
    obj = instance.get("DataVolume", name)
    assert obj["status"]["phase"] == "Succeeded", (obj["status"], events_of(instance, name))
    return obj


def test_default_is_the_drivers_csi_clone_and_byte_exact(instance, golden):
    instance.apply(clone("c-default", "golden-blk"), "--wait")
    obj = cloned(instance, "c-default")
    assert obj["metadata"]["annotations"][CLONE_TYPE] == "csi-clone"
    assert instance.get("PersistentVolumeClaim", "c-default")["spec"]["dataSource"]["kind"] == "PersistentVolumeClaim"
    assert holds(disk_of(instance, "c-default"), golden)
    assert any(r == "CloneSucceeded" and "csi-clone" in m for r, m in events_of(instance, "c-default"))


@pytest.fixture(scope="module")
def snap_sc(instance) -> str:
    """A class whose StorageProfile says snapshot."""
    instance.apply(storage_class("snap-sc", profile="snapshot"))
    instance.wait(lambda: ((instance.get("StorageProfile", "snap-sc", "") or {}).get("status") or {})
                  .get("cloneStrategy") == "snapshot", 20, "snap-sc's profile")
    return "snap-sc"


def test_storage_profile_forces_snapshot_which_restores_from_a_temporary_snapshot_then_deletes_it(instance, golden,
                                                                                                  snap_sc):
    instance.apply(clone("c-snap", "golden-blk", sc="snap-sc"), "--wait")
    obj = cloned(instance, "c-snap")
    assert obj["metadata"]["annotations"][CLONE_TYPE] == "snapshot"
    source = instance.get("PersistentVolumeClaim", "c-snap")["spec"]["dataSource"]
    assert source["kind"] == "VolumeSnapshot" and source["name"] == "tmp-snapshot-" + obj["metadata"]["uid"]
    instance.wait(lambda: instance.get("VolumeSnapshot", source["name"]) is None, 20, "the temporary snapshot gone")
    assert holds(disk_of(instance, "c-snap"), golden)


@pytest.fixture(scope="module")
def copy_sc(instance) -> str:
    """A class annotated cdi.kubevirt.io/clone-strategy: copy."""
    instance.apply(storage_class("copy-sc", annotation="copy"))
    return "copy-sc"


def test_class_annotation_forces_copy_byte_exact(instance, golden, copy_sc):
    instance.apply(clone("c-copy", "golden-blk", sc=copy_sc), "--wait")
    obj = cloned(instance, "c-copy")
    assert obj["metadata"]["annotations"][CLONE_TYPE] == "copy"
    assert "dataSource" not in instance.get("PersistentVolumeClaim", "c-copy")["spec"]  # a blank claim, filled
    assert holds(disk_of(instance, "c-copy"), golden)
    assert any(r == "CloneSucceeded" and "copy clone strategy" in m and "verified" in m
               for r, m in events_of(instance, "c-copy"))


def test_forced_snapshot_without_a_snapshot_class_falls_back_to_copy_and_says_why(instance, golden):
    instance.apply(storage_class("nosnap-sc", profile="snapshot"))
    instance.cli("delete", "volumesnapshotclass", "pvlun-snapshots")
    try:
        instance.apply(clone("c-fallback", "golden-blk", sc="nosnap-sc"), "--wait")
    finally:
        instance.apply(SNAPSHOT_CLASS)
    obj = cloned(instance, "c-fallback")
    assert obj["metadata"]["annotations"][CLONE_TYPE] == "copy"
    pvc = instance.get("PersistentVolumeClaim", "c-fallback")
    assert "VolumeSnapshotClass" in pvc["metadata"]["annotations"]["cdi.kubevirt.io/cloneFallbackReason"]
    assert ("NoVolumeSnapshotClass", "clone strategy copy (asked for snapshot): no VolumeSnapshotClass of driver "
            "csi.pvlun.dev") in events_of(instance, "c-fallback")
    assert holds(disk_of(instance, "c-fallback"), golden)


@pytest.mark.parametrize("source, mode", [("golden-blk", "Filesystem"), ("golden-fs", "Block")])
def test_across_volume_modes_csi_clone_falls_back_to_copy_byte_exact(instance, golden, source, mode):
    name = f"x-{mode.lower()}"
    instance.apply(clone(name, source, size="32Mi", mode=mode), "--wait")
    obj = cloned(instance, name)
    assert obj["metadata"]["annotations"][CLONE_TYPE] == "copy"
    assert "IncompatibleVolumeModes" in [r for r, _ in events_of(instance, name)]
    assert holds(disk_of(instance, name), golden)


@pytest.mark.parametrize("sc", [None, "snap-sc"])
def test_a_larger_target_is_cloned_then_expanded(instance, golden, snap_sc, sc):
    name = f"big-{sc or 'csi'}"
    instance.apply(clone(name, "golden-blk", size="48Mi", sc=sc), "--wait")
    cloned(instance, name)
    pvc = instance.get("PersistentVolumeClaim", name)
    assert int(pvc["status"]["capacity"]["storage"]) == 48 * MiB
    assert "VolumeResizeSuccessful" in [e["reason"] for e in instance.store.events(pvc)]
    disk = disk_of(instance, name)
    assert len(disk) == 48 * MiB and holds(disk, golden)


def test_a_larger_filesystem_target_gets_its_filesystem_and_disk_image_grown(instance, golden):
    instance.apply(clone("big-fs", "golden-fs", size="64Mi", mode="Filesystem"), "--wait")
    obj = cloned(instance, "big-fs")
    assert obj["metadata"]["annotations"][CLONE_TYPE] == "csi-clone"
    disk = disk_of(instance, "big-fs")
    assert holds(disk, golden) and len(disk) > 48 * MiB


def test_twenty_concurrent_clones_of_one_golden_image_are_all_byte_exact(instance, golden, snap_sc, copy_sc):
    """All three strategies at once, on one golden image."""
    names = [f"crowd-{i}" for i in range(20)]
    instance.apply("---\n".join(clone(n, "golden-blk", sc=(copy_sc, snap_sc, None)[i % 3])
                                for i, n in enumerate(names)), "--wait", "--timeout", "240")
    bad = [n for n in names if not holds(disk_of(instance, cloned(instance, n)["metadata"]["name"]), golden)]
    assert not bad
    taken = [instance.get("DataVolume", n)["metadata"]["annotations"][CLONE_TYPE] for n in names]
    assert {s: taken.count(s) for s in set(taken)} == {"copy": 7, "snapshot": 7, "csi-clone": 6}


def test_a_clone_from_another_namespace_waits_for_the_source_namespaces_grant_then_clones(instance, golden, snap_sc):
    from manifests import clone_grant

    instance.apply(dv("shared", "    blank: {}", size="16Mi").replace("metadata:\n", "metadata:\n  namespace: images\n"),
                   "--wait")
    with open(instance.lun_path("shared", "images"), "r+b") as f:
        f.write(golden)
    instance.apply(clone("x-ns", "shared", sc=snap_sc).replace("      name: shared\n",
                                                               "      name: shared\n      namespace: images\n"))
    want = ("User system:serviceaccount:default:default has insufficient permissions in clone source namespace "
            "images: it needs a Role or ClusterRole granting create on datavolumes/source (apiGroup cdi.kubevirt.io), "
            "bound to it in namespace images")
    ready = instance.wait(lambda: next((c for c in (instance.get("DataVolume", "x-ns").get("status") or {})
                                        .get("conditions", []) if c["type"] == "Ready" and c.get("message") == want),
                                       None), 20, "the refusal")
    assert ready["reason"] == "CloneValidationFailed"
    assert instance.get("DataVolume", "x-ns")["status"]["phase"] == "Pending"
    assert instance.get("PersistentVolumeClaim", "x-ns") is None  # nothing made before the grant
    # a grant elsewhere (in the target namespace) is not the source's
    instance.apply(clone_grant("default", "default").replace("datavolume-cloner", "cloner-here"))
    time.sleep(1)
    assert instance.get("PersistentVolumeClaim", "x-ns") is None
    instance.apply(clone_grant("images", "default"))
    instance.wait(lambda: (instance.get("DataVolume", "x-ns").get("status") or {}).get("phase") == "Succeeded", 30,
                  "the clone once granted")
    assert holds(disk_of(instance, "x-ns"), golden)
    # by the snapshot strategy: its temporary snapshot in the source namespace is gone, and with
    # it the finalizer (CDI's cdi.kubevirt.io/dataVolumeFinalizer) that stood for it
    obj = instance.get("DataVolume", "x-ns")
    assert obj["metadata"]["annotations"][CLONE_TYPE] == "snapshot"
    instance.wait(lambda: instance.get("VolumeSnapshot", "tmp-snapshot-" + obj["metadata"]["uid"], "images") is None,
                  20, "the temporary snapshot in images gone")
    assert "cdi.kubevirt.io/dataVolumeFinalizer" not in instance.get("DataVolume", "x-ns")["metadata"].get("finalizers", [])


def test_a_snapshot_clone_of_the_disk_a_running_vm_uses_is_readable_and_boots_the_same(instance, golden, snap_sc,
                                                                                       tick_image, tick_vm_yaml):
    from guest_output import MARKER, alive
    from virt.bootsector import tick_boot_sector

    out = instance.apply(tick_vm_yaml("busy", tick_image), "--wait")
    assert "virtualmachine/busy Running" in out.stdout, out.stdout + out.stderr
    instance.wait(lambda: MARKER in instance.all_serial_logs("busy"), 60, "the guest's marker")
    pid = instance.qemu_pid("busy")
    instance.apply(clone("busy-copy", "busy-root", size="8Mi", sc=snap_sc), "--wait")  # the VM runs on meanwhile
    obj = cloned(instance, "busy-copy")
    assert obj["metadata"]["annotations"][CLONE_TYPE] == "snapshot"
    with open(instance.lun_path("busy-copy"), "rb") as f:
        assert f.read(512) == tick_boot_sector()  # crash-consistent: the boot sector intact
    assert instance.qemu_pid("busy") == pid and alive(pid)
    instance.cli("delete", "vm", "busy")


def test_a_filesystem_clone_much_smaller_than_its_source_fails_and_leaves_nothing(instance, golden):
    """A 4Mi Filesystem clone of a 16Mi Block golden image would hold a 16 MiB disk.img in a
    volume of 4 MiB (written past its end later, by the guest): CloneFailed, its claim deleted."""
    instance.apply(clone("too-small", "golden-blk", size="4Mi", mode="Filesystem"))

    def failed():
        status = instance.get("DataVolume", "too-small").get("status") or {}
        return status if status.get("phase") == "Failed" else None

    status = instance.wait(failed, 30, "the small clone refused")
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "CloneFailed" and "less than the 16777216 of the source's disk" in ready["message"]
    instance.wait(lambda: instance.get("PersistentVolumeClaim", "too-small") is None, 30, "its claim deleted")


def test_a_copy_of_the_disk_a_running_vm_writes_waits_until_it_stops(instance, copy_sc, tick_image, tick_vm_yaml):
    """A host-assisted copy of a disk a guest writes would be torn: it waits (CloneSourceInUse,
    as CDI's), and runs once the VM has let go of the disk."""
    from virt.bootsector import tick_boot_sector

    out = instance.apply(tick_vm_yaml("writer", tick_image), "--wait")
    assert "virtualmachine/writer Running" in out.stdout, out.stdout + out.stderr
    instance.apply(clone("writer-copy", "writer-root", size="8Mi", sc=copy_sc))

    def waiting():
        status = instance.get("DataVolume", "writer-copy").get("status") or {}
        return next((c for c in status.get("conditions", []) if c.get("reason") == "CloneSourceInUse"), None)

    cond = instance.wait(waiting, 20, "the copy waiting for the VM")
    assert "VirtualMachine default/writer" in cond["message"]
    assert (instance.get("DataVolume", "writer-copy").get("status") or {}).get("phase") == "CloneScheduled"
    instance.cli("vm", "stop", "writer", "--wait")
    instance.wait(lambda: (instance.get("DataVolume", "writer-copy").get("status") or {}).get("phase") == "Succeeded",
                  30, "the copy after the VM stopped")
    with open(instance.lun_path("writer-copy"), "rb") as f:
        assert f.read(512) == tick_boot_sector()
    instance.cli("delete", "vm", "writer")
