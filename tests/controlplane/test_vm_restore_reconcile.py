"""VirtualMachineRestore reconcile on an embedded store, no guest booted: the restored claims are
bound by hand (the provisioner's part), so each pass of the restore is seen. What it deletes, the
claims it takes and makes, and the hostile contents and restores it refuses with Failed — never a
traceback, never a VM held stopped by a restore that cannot finish."""

from __future__ import annotations

import copy
import json

import pytest

from controlplane.context import Context
from controlplane.store import SQLiteStore
from virt.vm_restore import reconcile_vm_restore

NS = "default"


def vm_spec() -> dict:
    disks = [{"name": n, "disk": {"bus": "virtio"}} for n in ("root", "shared", "scratch")]
    return {"runStrategy": "Halted",
            "dataVolumeTemplates": [
                {"metadata": {"name": "vm1-root"},
                 "spec": {"source": {"blank": {}}, "storage": {"resources": {"requests": {"storage": "1Mi"}}}}},
                {"metadata": {"name": "vm1-scratch"},
                 "spec": {"source": {"blank": {}}, "storage": {"resources": {"requests": {"storage": "1Mi"}}}}}],
            "template": {"spec": {"domain": {"memory": {"guest": "64Mi"}, "devices": {"disks": disks}},
                                  "volumes": [{"name": "root", "dataVolume": {"name": "vm1-root"}},
                                              {"name": "shared", "dataVolume": {"name": "golden-shared"}},
                                              {"name": "scratch", "dataVolume": {"name": "vm1-scratch"}}]}}}


def claim(name: str) -> dict:
    return {"metadata": {"name": name},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Mi"}}}}


@pytest.fixture
def world(tmp_path):
    """vm1 (stopped) with its own DataVolumes vm1-root and vm1-scratch, and golden-shared, a
    DataVolume it uses and does not own; snapshot snap1 of its root and shared volumes."""
    store = SQLiteStore(str(tmp_path / "objects.db"))
    ctx = Context(store, None, str(tmp_path / "data"), ["node-1"])
    vm = store.apply({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
                      "metadata": {"name": "vm1", "namespace": NS}, "spec": vm_spec()})
    owner = [{"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "name": "vm1", "uid": vm["metadata"]["uid"]}]
    for name, refs in (("vm1-root", owner), ("vm1-scratch", owner), ("golden-shared", [])):
        store.apply({"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
                     "metadata": {"name": name, "namespace": NS, **({"ownerReferences": refs} if refs else {})},
                     "spec": {"source": {"blank": {}}, "storage": {"resources": {"requests": {"storage": "1Mi"}}}}})
    snap = store.apply({"apiVersion": "snapshot.kubevirt.io/v1beta1", "kind": "VirtualMachineSnapshot",
                        "metadata": {"name": "snap1", "namespace": NS},
                        "spec": {"source": {"apiGroup": "kubevirt.io", "kind": "VirtualMachine", "name": "vm1"}}})
    store.update_status("VirtualMachineSnapshot", "snap1", NS,
                        {"readyToUse": True, "phase": "Succeeded", "virtualMachineSnapshotContentName": "content1"})
    store.apply({"apiVersion": "snapshot.kubevirt.io/v1beta1", "kind": "VirtualMachineSnapshotContent",
                 "metadata": {"name": "content1", "namespace": NS},
                 "spec": {"virtualMachineSnapshotName": snap["metadata"]["name"],
                          "source": {"virtualMachine": {"metadata": {"name": "vm1", "uid": vm["metadata"]["uid"]},
                                                        "spec": vm_spec()}},
                          "volumeBackups": [{"volumeName": v, "volumeSnapshotName": f"vs-{v}",
                                             "persistentVolumeClaim": claim(f"claim-{v}")}
                                            for v in ("root", "shared")]}})
    for v in ("root", "shared"):
        store.apply({"apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
                     "metadata": {"name": f"vs-{v}", "namespace": NS},
                     "spec": {"source": {"persistentVolumeClaimName": f"claim-{v}"}}})
    yield ctx
    store.close()


def restore(ctx: Context, target: str = "vm1", name: str = "r1", **spec) -> dict:
    """A restore stored as it is (no admission: as a hostile writer could), one pass run."""
    ctx.store.apply({"apiVersion": "snapshot.kubevirt.io/v1beta1", "kind": "VirtualMachineRestore",
                     "metadata": {"name": name, "namespace": NS},
                     "spec": {"target": {"apiGroup": "kubevirt.io", "kind": "VirtualMachine", "name": target},
                              "virtualMachineSnapshotName": "snap1", **spec}})
    return run(ctx, name)


def run(ctx: Context, name: str = "r1") -> dict:
    reconcile_vm_restore(ctx, ctx.store.get("VirtualMachineRestore", name, NS))
    return ctx.store.get("VirtualMachineRestore", name, NS)


def bind_all(ctx: Context) -> None:
    for pvc in ctx.store.list("PersistentVolumeClaim", NS):
        ctx.store.update_status("PersistentVolumeClaim", pvc["metadata"]["name"], NS, {"phase": "Bound"})


def failure(obj: dict) -> str:
    """The Failure condition's message ("" if it has none); a failed restore is never complete."""
    status = obj.get("status") or {}
    found = [c["message"] for c in status.get("conditions") or [] if c["type"] == "Failure" and c["status"] == "True"]
    if found:
        assert status["complete"] is False
    return found[0] if found else ""


def held(ctx: Context) -> object:
    return (ctx.store.get("VirtualMachine", "vm1", NS).get("status") or {}).get("restoreInProgress")


def test_in_place_restore_deletes_only_the_data_volumes_the_vm_owned_and_no_longer_has(world):
    got = restore(world)
    assert not failure(got) and held(world) == "r1"
    bind_all(world)
    got = run(world)
    assert got["status"]["complete"] is True, got["status"]
    # root's template is gone (restored into a claim): its DataVolume goes; scratch is not in the
    # snapshot's backups, so its template stays and so does it; golden-shared was never the VM's
    assert got["status"]["deletedDataVolumes"] == ["vm1-root"]
    assert world.store.get("DataVolume", "vm1-root", NS) is None
    assert world.store.get("DataVolume", "golden-shared", NS) is not None
    assert world.store.get("DataVolume", "vm1-scratch", NS) is not None
    assert held(world) is None


def test_a_template_data_volume_the_vm_does_not_own_is_kept(world):
    dv = world.store.get("DataVolume", "vm1-root", NS)
    dv["metadata"]["ownerReferences"][0]["uid"] = "someone-else"
    world.store.apply(dv)
    restore(world)
    bind_all(world)
    got = run(world)
    assert got["status"]["complete"] is True and "deletedDataVolumes" not in got["status"]
    assert world.store.get("DataVolume", "vm1-root", NS) is not None


@pytest.mark.parametrize("spec, why", [
    ({"volumeRestoreOverrides": [{"volumeName": "root", "restoreName": "one"},
                                 {"volumeName": "shared", "restoreName": "one"}]}, "'one'"),
    ({"volumeRestorePolicy": "PrefixTargetName",
      "volumeRestoreOverrides": [{"volumeName": "root", "restoreName": "vm2-shared"}]}, "'vm2-shared'"),
])
def test_two_volumes_restored_into_one_claim_fail(world, spec, why):
    got = restore(world, "vm2", **spec)
    assert "restored into" in failure(got) and why in failure(got)
    assert world.store.list("PersistentVolumeClaim", NS) == [] and world.store.get("VirtualMachine", "vm2", NS) is None


def test_a_claim_of_an_earlier_restore_of_the_same_name_is_not_taken(world):
    got = restore(world, "vm2", volumeRestorePolicy="PrefixTargetName")
    bind_all(world)
    assert run(world)["status"]["complete"] is True
    world.store.delete("VirtualMachineRestore", "r1", NS)
    world.store.delete("VirtualMachine", "vm2", NS)  # its claims stay (no garbage collector here)
    got = restore(world, "vm2", volumeRestorePolicy="PrefixTargetName")  # the same name, another restore
    assert "PersistentVolumeClaim vm2-root (volume root) exists and is not this restore's" in failure(got)
    assert world.store.get("VirtualMachine", "vm2", NS) is None


def test_a_new_vm_from_a_content_pvlun_apply_would_refuse_is_not_made(world):
    content = world.store.get("VirtualMachineSnapshotContent", "content1", NS)
    content["spec"]["source"]["virtualMachine"]["spec"]["dataVolumeTemplates"][1]["metadata"]["name"] = "../etc"
    world.store.apply(content)
    got = restore(world, "vm2")
    assert "refused" in failure(got) and "metadata.name: '../etc' is not a valid name" in failure(got), failure(got)
    assert world.store.get("VirtualMachine", "vm2", NS) is None and world.store.list("PersistentVolumeClaim", NS) == []


def test_a_content_without_the_vms_metadata_fails_cleanly(world):
    content = world.store.get("VirtualMachineSnapshotContent", "content1", NS)
    del content["spec"]["source"]["virtualMachine"]["metadata"]
    world.store.apply(content)
    got = restore(world)
    assert "VirtualMachine vm1 exists and is not the snapshot's source" in failure(got)
    assert held(world) is None


def test_a_content_without_volume_snapshot_names_fails_cleanly(world):
    content = world.store.get("VirtualMachineSnapshotContent", "content1", NS)
    del content["spec"]["volumeBackups"][0]["volumeSnapshotName"]
    world.store.apply(content)
    assert "volumeSnapshotName" in failure(restore(world))


@pytest.mark.parametrize("override, field", [
    ({"labels": "abc"}, "spec.volumeRestoreOverrides[0].labels"),
    ({"labels": {"x": [1, 2]}}, "spec.volumeRestoreOverrides[0].labels.x"),
    ({"annotations": {"bad key!": "v"}}, "spec.volumeRestoreOverrides[0].annotations"),
])
def test_bad_override_labels_fail_the_restore(world, override, field):
    got = restore(world, "vm2", volumeRestoreOverrides=[{"volumeName": "root", **override}])
    assert field in failure(got), failure(got)
    assert world.store.list("PersistentVolumeClaim", NS) == []


def test_override_labels_reach_the_claim(world):
    restore(world, "vm2", volumeRestoreOverrides=[{"volumeName": "root", "restoreName": "mine",
                                                   "labels": {"app.example.com/tier": "db"}}])
    pvc = world.store.get("PersistentVolumeClaim", "mine", NS)
    assert pvc["metadata"]["labels"] == {"app.example.com/tier": "db"}
    assert pvc["metadata"]["annotations"]["restore.kubevirt.io/uid"] == \
        world.store.get("VirtualMachineRestore", "r1", NS)["metadata"]["uid"]


@pytest.mark.parametrize("gone", [("VirtualMachineSnapshot", "snap1"), ("VirtualMachineSnapshotContent", "content1"),
                                  ("VolumeSnapshot", "vs-shared")])
def test_a_snapshot_gone_before_the_claims_are_bound_fails_the_restore_and_frees_the_vm(world, gone):
    restore(world)
    assert held(world) == "r1"
    world.store.delete(gone[0], gone[1], NS)
    got = run(world)
    assert gone[1] in failure(got) or "VirtualMachineSnapshotContent" in failure(got), failure(got)
    assert "deleted" in failure(got)
    assert held(world) is None
    before = copy.deepcopy(world.store.get("VirtualMachine", "vm1", NS)["spec"])
    assert run(world)["status"]["complete"] is False and world.store.get("VirtualMachine", "vm1", NS)["spec"] == before


def test_a_restore_waits_for_a_snapshot_not_made_yet(world):
    world.store.delete("VirtualMachineSnapshot", "snap1", NS)
    got = restore(world)
    assert not failure(got) and "does not exist" in str(got["status"]["conditions"])


@pytest.mark.parametrize("where, value", [
    (("spec", "source", "virtualMachine", "spec", "template"), "abc"),
    (("spec", "source", "virtualMachine", "metadata"), "abc"),
    (("spec", "source", "virtualMachine", "metadata", "labels"), {"x": [1]}),
    (("spec", "volumeBackups", 0, "persistentVolumeClaim"), "abc"),
    (("spec", "volumeBackups", 0, "persistentVolumeClaim", "metadata", "annotations"), {"k": 1}),
    (("spec", "volumeBackups", 0, "persistentVolumeClaim", "spec", "accessModes"), "everyone"),
    (("spec", "volumeBackups"), "abc"),
])
def test_a_malformed_content_fails_the_restore_in_one_line(world, where, value):
    content = world.store.get("VirtualMachineSnapshotContent", "content1", NS)
    part = content
    for key in where[:-1]:
        part = part[key]
    part[where[-1]] = value
    world.store.apply(content)
    for target in ("vm2", "vm1"):
        got = restore(world, target, name=f"to-{target}")
        assert failure(got) and "\n" not in failure(got)
        assert world.store.list("PersistentVolumeClaim", NS) == [] and held(world) is None
    assert world.store.get("VirtualMachine", "vm2", NS) is None


# ---- spec.patches: applied to a VM the restore creates, as KubeVirt does

MAC = "02:00:00:aa:bb:cc"
UUID = "5d307ca9-b3ef-428c-8861-06e72d69f223"


def patch(op: str, path: str, value: object = None, **more: object) -> str:
    """One patch of spec.patches as a user writes it: a JSON text."""
    return json.dumps({"op": op, "path": path, **({} if value is None else {"value": value}), **more})


IDENTITY = [patch("add", "/spec/template/spec/domain/devices/interfaces",
                  [{"name": "default", "masquerade": {}, "macAddress": "02:00:00:00:00:01"}]),
            patch("add", "/spec/template/spec/networks", [{"name": "default", "pod": {}}]),
            patch("replace", "/spec/template/spec/domain/devices/interfaces/0/macAddress", MAC),
            patch("add", "/spec/template/spec/domain/firmware", {"uuid": UUID}),
            patch("test", "/spec/runStrategy", "Halted"),
            patch("add", "/metadata/labels/app", "copy")]


def test_patches_give_the_new_vm_its_own_mac_uuid_and_labels(world):
    got = restore(world, "vm2", patches=IDENTITY)
    assert not failure(got)
    vm2 = world.store.get("VirtualMachine", "vm2", NS)
    domain = vm2["spec"]["template"]["spec"]["domain"]
    assert domain["devices"]["interfaces"][0]["macAddress"] == MAC and domain["firmware"]["uuid"] == UUID
    assert vm2["metadata"]["labels"] == {"app": "copy"}
    assert vm2["metadata"]["annotations"]["restore.kubevirt.io/lastRestoreUID"] == f"r1-{got['metadata']['uid']}"
    bind_all(world)
    assert run(world)["status"]["complete"] is True
    assert world.store.get("VirtualMachine", "vm2", NS)["spec"] == vm2["spec"]  # kept on the later pass
    assert world.store.get("VirtualMachine", "vm1", NS)["spec"] == vm_spec()  # the source untouched


def test_patches_of_a_restore_to_its_own_vm_are_not_applied_and_a_warning_says_so(world):
    restore(world, patches=[patch("add", "/metadata/labels/app", "copy")])
    bind_all(world)
    got = run(world)
    assert got["status"]["complete"] is True
    assert "labels" not in world.store.get("VirtualMachine", "vm1", NS)["metadata"]
    warnings = [e for e in world.store.events(got) if e["type"] == "Warning"]
    assert [e["reason"] for e in warnings] == ["RestorePatchesNotApplied"]
    assert "spec.patches applies only when the restore creates its target" in warnings[0]["message"]


@pytest.mark.parametrize("patches, why", [
    ([patch("replace", "/spec/template/spec/domain/devices/interfaces/0/macAddress", MAC)],
     "spec.patches[0] (replace /spec/template/spec/domain/devices/interfaces/0/macAddress) cannot be applied"),
    ([patch("add", "/metadata/labels/app", "copy"), patch("test", "/spec/runStrategy", "Always")],
     "spec.patches[1] (test /spec/runStrategy) cannot be applied"),
    ([patch("replace", "/spec/template/spec/domain/memory/guest", "lots")],
     "as spec.patches make it is refused: VirtualMachine 'vm2' is invalid: spec.template.spec.domain.memory.guest"),
    (IDENTITY[:2] + [patch("replace", "/spec/template/spec/domain/devices/interfaces/0/macAddress",
                           "01:00:5e:00:00:01")], "macAddress"),
    ([patch("add", "/metadata/labels/app", "not a value!")], "spec.patches make it invalid: metadata.labels.app"),
    ([patch("remove", "/metadata/annotations/restore.kubevirt.io~1lastRestoreUID")],
     "may not change the restore.kubevirt.io/ annotations"),
    ([patch("copy", f"/spec/template/spec/domain/x{i}", **{"from": "/spec/template"}) for i in range(64)],  # 2^64
     "makes the VirtualMachine"),
])
def test_a_patch_that_cannot_apply_or_makes_a_vm_apply_refuses_fails_the_restore(world, patches, why):
    got = restore(world, "vm2", patches=patches)
    assert why in failure(got), failure(got)
    assert "\n" not in failure(got) and len(failure(got)) <= 400
    assert world.store.get("VirtualMachine", "vm2", NS) is None and world.store.list("PersistentVolumeClaim", NS) == []


@pytest.mark.parametrize("patches, what", [
    ([patch("replace", "/spec/template/spec/volumes/0/persistentVolumeClaim/claimName", "theirs")],
     "the claim of volume 'root'"),
    ([patch("add", "/spec/template/spec/volumes/-",
            {"name": "extra", "persistentVolumeClaim": {"claimName": "theirs"}})],
     "the claim of volume 'extra'"),
    ([patch("replace", "/spec/template/spec/volumes/2/dataVolume/name", "theirs")], "the claim of volume 'scratch'"),
    ([patch("move", "/spec/template/spec/volumes/0/dataVolume",
            **{"from": "/spec/template/spec/volumes/0/persistentVolumeClaim"})], "the claim of volume 'root'"),
    ([patch("add", "/spec/dataVolumeTemplates/-", {"metadata": {"name": "theirs"},
                                                    "spec": {"source": {"pvc": {"name": "theirs"}}}})],
     "spec.dataVolumeTemplates"),
])
def test_a_patch_cannot_give_the_new_vm_a_claim_the_restore_did_not_make(world, patches, what):
    world.store.apply({"apiVersion": "v1", "kind": "PersistentVolumeClaim", **claim("theirs")})
    got = restore(world, "vm2", patches=patches)
    assert f"spec.patches may not change {what}" in failure(got), failure(got)
    assert world.store.get("VirtualMachine", "vm2", NS) is None
    assert [c["metadata"]["name"] for c in world.store.list("PersistentVolumeClaim", NS)] == ["theirs"]


def test_a_stored_restore_with_a_patch_admission_refuses_fails(world):
    got = restore(world, "vm2", patches=[patch("replace", "/metadata/name", "vm3")])
    assert "spec.patches[0].path: '/metadata/name' may not be patched" in failure(got), failure(got)
    assert world.store.get("VirtualMachine", "vm2", NS) is None and world.store.get("VirtualMachine", "vm3", NS) is None


def test_a_vm_made_by_someone_else_while_a_restore_makes_its_new_vm_is_never_overwritten(world):
    """The restore looked, saw no VM of its target's name, and someone made one before its
    write: the user's VM stays as it is (created, never applied over), the restore fails."""
    store = world.store
    theirs = {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
              "metadata": {"name": "vm2", "namespace": NS, "labels": {"owner": "alice"}},
              "spec": {**vm_spec(), "runStrategy": "Always", "dataVolumeTemplates": [],
                       "template": {"spec": {"domain": {"memory": {"guest": "64Mi"}, "devices": {}}}}}}
    create = store.create

    def racing_create(obj: dict) -> dict:
        if obj["kind"] == "VirtualMachine" and obj["metadata"]["name"] == "vm2":
            create(copy.deepcopy(theirs))  # hers lands between the restore's look and its write
        return create(obj)

    store.create = racing_create  # type: ignore[method-assign]
    got = restore(world, "vm2")
    assert "VirtualMachine vm2 was made by someone else while this restore ran" in failure(got)
    vm2 = store.get("VirtualMachine", "vm2", NS)
    assert vm2["metadata"]["labels"] == {"owner": "alice"} and vm2["spec"]["runStrategy"] == "Always"
