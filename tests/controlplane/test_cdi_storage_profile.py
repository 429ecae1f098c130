"""CDI's StorageProfile through `pvlun serve`: one per StorageClass of pvlun's driver, what a
DataVolume's `spec.storage` gets when it leaves the access and volume modes out, and an
administrator's spec overriding what pvlun knows."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from controlplane.storage_profiles import DRIVER_PROPERTY_SETS
from pvlun.local_run import start_daemon, stop_daemon

from test_datavolume import dv


def blank(name: str, storage: str) -> str:
    """A blank DataVolume whose spec.storage says only `storage` (and a size)."""
    text = dv(name, "    blank: {}", size="16Mi")
    return text.replace("    volumeMode: Block\n    accessModes: [ReadWriteOnce]\n", storage)


def status_of(inst, name: str) -> dict:
    return (inst.get("StorageProfile", name, "") or {}).get("status") or {}


def claim_modes(inst, name: str) -> tuple[list, str]:
    pvc = inst.wait(lambda: inst.get("PersistentVolumeClaim", name), 20, f"claim {name}")
    return pvc["spec"]["accessModes"], pvc["spec"]["volumeMode"]


def test_every_class_of_the_driver_has_a_profile_and_others_none(instance):
    instance.wait(lambda: status_of(instance, "pvlun"), 20, "the default class's profile")
    assert status_of(instance, "pvlun") == {"storageClass": "pvlun", "provisioner": "csi.pvlun.dev",
                                            "claimPropertySets": DRIVER_PROPERTY_SETS, "cloneStrategy": "csi-clone",
                                            "dataImportCronSourceFormat": "pvc"}
    instance.apply("""apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: fast
provisioner: csi.pvlun.dev
---
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: elsewhere
provisioner: other.example.com
""")
    instance.wait(lambda: status_of(instance, "fast").get("storageClass") == "fast", 20, "fast's profile")
    out = instance.cli("get", "storageprofiles")
    assert "fast" in out.stdout and "pvlun" in out.stdout and "elsewhere" not in out.stdout
    assert instance.get("StorageProfile", "elsewhere", "") is None
    instance.cli("delete", "sc", "fast")  # its profile goes with it (ownerReferences)
    instance.wait(lambda: instance.get("StorageProfile", "fast", "") is None, 20, "fast's profile collected")


def test_storage_without_modes_gets_the_profiles_and_a_spec_override_wins(instance):
    # the default class: the first property set, or the first with the volume mode given
    instance.apply(blank("no-modes", ""))
    assert claim_modes(instance, "no-modes") == (["ReadWriteOnce"], "Filesystem")
    instance.apply(blank("block-only", "    volumeMode: Block\n"))
    assert claim_modes(instance, "block-only") == (["ReadWriteOnce"], "Block")
    # an administrator's override: live-migratable Block for everything of class fast
    instance.apply("""apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: shared
provisioner: csi.pvlun.dev
---
apiVersion: cdi.kubevirt.io/v1beta1
kind: StorageProfile
metadata:
  name: shared
spec:
  claimPropertySets:
  - accessModes: [ReadWriteMany]
    volumeMode: Block
  cloneStrategy: copy
""")
    instance.wait(lambda: status_of(instance, "shared").get("cloneStrategy") == "copy", 20, "the override")
    assert status_of(instance, "shared")["claimPropertySets"] == [{"accessModes": ["ReadWriteMany"], "volumeMode": "Block"}]
    instance.apply(blank("on-shared", "    storageClassName: shared\n"))
    assert claim_modes(instance, "on-shared") == (["ReadWriteMany"], "Block")
    # what a DataVolume gives is never replaced
    instance.apply(blank("given", "    storageClassName: shared\n    volumeMode: Filesystem\n    accessModes: [ReadWriteOnce]\n"))
    assert claim_modes(instance, "given") == (["ReadWriteOnce"], "Filesystem")
    for name in ("no-modes", "block-only", "on-shared", "given"):
        instance.wait(lambda: (instance.get("DataVolume", name).get("status") or {}).get("phase") == "Succeeded",
                      30, f"{name} Succeeded")


def test_storage_profile_fields_are_checked_at_apply(instance):
    out = instance.apply("""apiVersion: cdi.kubevirt.io/v1beta1
kind: StorageProfile
metadata:
  name: pvlun
spec:
  cloneStrategy: teleport
""", check=False)
    assert out.returncode != 0 and "spec.cloneStrategy" in out.stderr
    out = instance.apply("""apiVersion: cdi.kubevirt.io/v1beta1
kind: StorageProfile
metadata:
  name: pvlun
spec:
  dataImportCronSourceFormat: snapshot
""", check=False)
    assert out.returncode != 0 and "spec.dataImportCronSourceFormat" in out.stderr



def test_classes_applied_by_separate_commands_each_get_their_profile_at_once(tmp_path):
    """Every CLI is another process writing the catalog, and here no other process keeps it
    open: the daemon must see each write (a descriptor of catalog.db closed in the daemon once
    dropped SQLite's locks, and the second command's class went unseen)."""
    data_dir = str(tmp_path / "d")
    os.makedirs(data_dir)
    proc = start_daemon(data_dir)
    names = ("one-by-one-a", "one-by-one-b", "one-by-one-c")

    def pvlun(*args: str, input: str | None = None) -> str:
        done = subprocess.run([sys.executable, "-m", "pvlun.cli", *args, "--data-dir", data_dir], input=input,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    try:
        for name in names:
            pvlun("apply", "-f", "-", input=f"apiVersion: storage.k8s.io/v1\nkind: StorageClass\nmetadata:\n"
                                            f"  name: {name}\nprovisioner: csi.pvlun.dev\n")
        deadline = time.monotonic() + 10
        while not all(name in (listed := pvlun("get", "storageprofiles")) for name in names):
            assert time.monotonic() < deadline, f"profiles after 10 s: {listed}"
            time.sleep(0.1)
    finally:
        stop_daemon(proc, data_dir)
