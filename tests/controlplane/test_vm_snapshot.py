"""VirtualMachineSnapshot / VirtualMachineRestore (snapshot.kubevirt.io/v1beta1) on a real
`pvlun serve`: the sequence guest (virt/sequence_guest.py) writes a rising number to disk A,
then disk B, each write synced; a snapshot taken while it runs holds B == A or B == A - 1 on
the restored claims — a state that existed — on the file and on the iscsi backend."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "csi"))
from iscsi_target_support import free_control_port, free_port  # noqa: E402

from host.tgt import Tgtadm  # noqa: E402

from controlplane.csi_client import CsiClient  # noqa: E402
from csi.proto import csi_pb2 as pb  # noqa: E402
from virt import sequence_guest  # noqa: E402

API = "snapshot.kubevirt.io/v1beta1"


def snapshot_yaml(name: str, vm: str, extra: str = "") -> str:
    return f"""apiVersion: {API}
kind: VirtualMachineSnapshot
metadata: {{name: {name}}}
spec:
  source: {{apiGroup: kubevirt.io, kind: VirtualMachine, name: {vm}}}
{extra}"""


def restore_yaml(name: str, snapshot: str, target: str, extra: str = "") -> str:
    return f"""apiVersion: {API}
kind: VirtualMachineRestore
metadata: {{name: {name}}}
spec:
  target: {{apiGroup: kubevirt.io, kind: VirtualMachine, name: {target}}}
  virtualMachineSnapshotName: {snapshot}
{extra}"""


NEW_MAC, NEW_UUID = "02:00:00:aa:bb:cc", "5d307ca9-b3ef-428c-8861-06e72d69f223"
IDENTITY_PATCHES = f"""  patches:
  - '{{"op": "add", "path": "/spec/template/spec/domain/devices/interfaces",
      "value": [{{"name": "default", "masquerade": {{}}}}]}}'
  - '{{"op": "add", "path": "/spec/template/spec/networks", "value": [{{"name": "default", "pod": {{}}}}]}}'
  - '{{"op": "add", "path": "/spec/template/spec/domain/devices/interfaces/0/macAddress", "value": "{NEW_MAC}"}}'
  - '{{"op": "add", "path": "/spec/template/spec/domain/firmware", "value": {{"uuid": "{NEW_UUID}"}}}}'
  - '{{"op": "add", "path": "/metadata/labels/app", "value": "copy"}}'
"""


@pytest.fixture(scope="module")
def seq_images(web) -> str:
    sequence_guest.build_boot_disk(os.path.join(web.root, "boot.img"))
    sequence_guest.build_disk_a(os.path.join(web.root, "seqa.img"))
    return web.url


def status(inst, kind: str, name: str) -> dict:
    return (inst.get(kind, name) or {}).get("status") or {}


def wait_snapshot(inst, name: str, timeout: float = 60) -> dict:
    inst.wait(lambda: status(inst, "VirtualMachineSnapshot", name).get("phase") in ("Succeeded", "Failed"),
              timeout, f"snapshot {name}")
    got = status(inst, "VirtualMachineSnapshot", name)
    assert got["phase"] == "Succeeded" and got["readyToUse"] is True, got
    return got


def wait_restore(inst, name: str, timeout: float = 60) -> dict:
    inst.wait(lambda: status(inst, "VirtualMachineRestore", name).get("complete"), timeout, f"restore {name}")
    return status(inst, "VirtualMachineRestore", name)


def claims_of(inst, restore: str) -> dict[str, str]:
    return {r["volumeName"]: r["persistentVolumeClaim"] for r in status(inst, "VirtualMachineRestore", restore)["restores"]}


def boot_writing(inst, name: str, url: str, storage_class: str = "") -> None:
    inst.apply(sequence_guest.vm_manifest(name, url, storage_class=storage_class))
    inst.wait(lambda: "PVLUN-SEQ-RUNNING" in inst.all_serial_logs(name), 180, f"{name}'s guest writing")


def snapshot_running_then_restore_in_place(inst, vm: str) -> tuple[dict, dict[str, str], tuple[int, int], tuple[int, int]]:
    """Snapshot the writing guest, stop it, restore the snapshot to it: (snapshot status, restored
    claims by volume, (A, B) restored, (A, B) the old disks held at the stop)."""
    inst.apply(snapshot_yaml(f"{vm}-snap", vm))
    snap = wait_snapshot(inst, f"{vm}-snap")
    inst.cli("vm", "stop", vm, "--wait", "--timeout", "60")
    last = sequence_guest.read_pair(inst.lun_path(f"{vm}-a"), inst.lun_path(f"{vm}-b"))
    inst.apply(restore_yaml(f"{vm}-back", f"{vm}-snap", vm))
    wait_restore(inst, f"{vm}-back")
    claims = claims_of(inst, f"{vm}-back")
    restored = sequence_guest.read_pair(inst.lun_path(claims["a"]), inst.lun_path(claims["b"]))
    return snap, claims, restored, last


def assert_consistent(restored: tuple[int, int], last: tuple[int, int]) -> None:
    a, b = restored
    assert a >= 3, restored  # taken while it wrote (it said so after its third pair)
    assert b in (a, a - 1), f"disk B holds {b}, disk A {a}: a state that never existed"
    assert last[0] > a, (restored, last)  # it went on writing after the snapshot: that change is gone


def test_running_vm_snapshot_restores_both_disks_consistent_and_the_change_since_is_gone(serve, seq_images):
    inst = serve("--accel", "tcg")
    boot_writing(inst, "seq", seq_images)
    # a restore to a running VM: FailImmediate fails at once, the default waits for it to stop
    inst.apply(snapshot_yaml("early", "seq"))
    wait_snapshot(inst, "early")
    inst.apply(restore_yaml("refused", "early", "seq", "  targetReadinessPolicy: FailImmediate\n"))
    inst.wait(lambda: any(c["type"] == "Failure" and c["status"] == "True"
                          for c in status(inst, "VirtualMachineRestore", "refused").get("conditions", [])),
              30, "the FailImmediate restore to fail")
    assert status(inst, "VirtualMachineRestore", "refused")["complete"] is False
    assert "not stopped" in inst.cli("get", "vmrestore", "refused").stdout
    inst.apply(restore_yaml("waits", "early", "seq"))
    inst.wait(lambda: "Waiting for target" in str(status(inst, "VirtualMachineRestore", "waits").get("conditions")),
              30, "the restore to wait for its target")
    assert inst.printable("seq") == "Running" and not status(inst, "VirtualMachineRestore", "waits")["complete"]
    inst.cli("delete", "vmrestore", "waits")

    # a paused guest: snapshotted as it is, and paused it stays; Retain keeps the content after the snapshot
    inst.cli("vm", "pause", "seq", "--wait", "--timeout", "30")
    inst.apply(snapshot_yaml("paused", "seq", "  deletionPolicy: Retain\n"))
    paused = wait_snapshot(inst, "paused")
    assert paused["indications"] == ["Online", "Paused", "NoGuestAgent"]
    assert inst.printable("seq") == "Paused" and inst.vmi_status("seq")["paused"] is True
    kept = inst.get("VirtualMachineSnapshotContent", paused["virtualMachineSnapshotContentName"])
    assert "ownerReferences" not in kept["metadata"]
    inst.cli("delete", "vmsnapshot", "paused")
    inst.wait(lambda: inst.get("VirtualMachineSnapshot", "paused") is None, 30, "the Retain snapshot to go")
    assert inst.get("VirtualMachineSnapshotContent", kept["metadata"]["name"]) is not None
    assert all(inst.get("VolumeSnapshot", b["volumeSnapshotName"]) for b in kept["spec"]["volumeBackups"])
    inst.cli("delete", "vmsnapshotcontent", kept["metadata"]["name"])  # now its volume snapshots go with it
    inst.wait(lambda: not any(inst.get("VolumeSnapshot", b["volumeSnapshotName"])
                              for b in kept["spec"]["volumeBackups"]), 30, "the kept content's volume snapshots")
    inst.cli("vm", "unpause", "seq", "--wait", "--timeout", "30")

    snap, claims, restored, last = snapshot_running_then_restore_in_place(inst, "seq")
    assert snap["indications"] == ["Online", "NoGuestAgent"], snap
    assert sorted(snap["snapshotVolumes"]["includedVolumes"]) == ["a", "b", "boot"]
    content = inst.get("VirtualMachineSnapshotContent", snap["virtualMachineSnapshotContentName"])
    assert content["spec"]["source"]["virtualMachine"]["spec"]["runStrategy"] == "Always"
    assert float(content["metadata"]["annotations"]["pvlun.dev/guest-pause-seconds"]) < 1.0
    assert any(e["reason"] == "GuestQuiesced" for e in inst.store.events(inst.get("VirtualMachineSnapshot", "seq-snap")))
    assert_consistent(restored, last)
    described = inst.cli("describe", "vmsnapshot", "seq-snap").stdout
    assert "Indications:  Online, NoGuestAgent" in described and "ReadyToUse:   True" in described, described
    assert "GuestQuiesced" in described

    restore = inst.get("VirtualMachineRestore", "seq-back")
    uid = restore["metadata"]["uid"]
    assert claims == {v: f"restore-{uid}-{v}" for v in ("a", "b", "boot")}
    vm = inst.get("VirtualMachine", "seq")
    assert vm["spec"]["runStrategy"] == "Halted"  # stopped it stays, as the user left it
    assert {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in vm["spec"]["template"]["spec"]["volumes"]} \
        == claims
    assert sorted(restore["status"]["deletedDataVolumes"]) == ["seq-a", "seq-b", "seq-boot"]
    assert "restoreInProgress" not in vm["status"]
    # while a restore of its disks is in progress (KubeVirt's status.restoreInProgress) the VM does not start
    inst.store.merge_status("VirtualMachine", "seq", "default", restoreInProgress="seq-back")
    inst.cli("vm", "start", "seq")
    inst.wait(lambda: "VirtualMachineRestore seq-back in progress" in str(inst.get("VirtualMachine", "seq")["status"]),
              30, "the start to wait for the restore")
    assert inst.get("VirtualMachineInstance", "seq") is None
    inst.cli("vm", "stop", "seq")
    inst.wait(lambda: inst.get("VirtualMachine", "seq")["spec"]["runStrategy"] == "Halted", 30, "seq to be Halted")
    vm_status = dict(inst.get("VirtualMachine", "seq")["status"])
    del vm_status["restoreInProgress"]
    inst.store.update_status("VirtualMachine", "seq", "default", vm_status)
    inst.wait(lambda: inst.get("PersistentVolumeClaim", "seq-a") is None, 30, "the old claims to go")

    # a snapshot of the stopped VM: no Online
    inst.apply(snapshot_yaml("stopped", "seq"))
    assert wait_snapshot(inst, "stopped").get("indications") == []

    # the running snapshot restored to a new VM with an identity of its own (KubeVirt's spec.patches: a NIC
    # with its MAC address, a firmware UUID, a label): it boots and goes on from the snapshot's number
    inst.apply(restore_yaml("clone", "seq-snap", "seq-new", IDENTITY_PATCHES))
    wait_restore(inst, "clone")
    spec = inst.get("VirtualMachine", "seq-new")["spec"]  # made stopped, as KubeVirt makes it
    assert spec.get("runStrategy") == "Halted" or spec.get("running") is False
    inst.cli("vm", "start", "seq-new")
    inst.wait(lambda: f"PVLUN-SEQ-START {restored[0]}\n" in inst.all_serial_logs("seq-new").replace("\r", ""),
              180, "the new VM to boot from the restored disks")
    new_vm = inst.get("VirtualMachine", "seq-new")
    assert new_vm["metadata"]["labels"] == {"app": "copy"}
    domain = new_vm["spec"]["template"]["spec"]["domain"]
    assert domain["devices"]["interfaces"][0]["macAddress"] == NEW_MAC and domain["firmware"]["uuid"] == NEW_UUID
    argv = Path(f"/proc/{inst.qemu_pid('seq-new')}/cmdline").read_bytes().split(b"\0")
    assert f"mac={NEW_MAC}".encode() in b",".join(argv) and argv[argv.index(b"-uuid") + 1] == NEW_UUID.encode()
    assert "app" not in (inst.get("VirtualMachine", "seq")["metadata"].get("labels") or {})  # the source: its own
    assert new_vm["metadata"]["annotations"]["restore.kubevirt.io/lastRestoreUID"].startswith("clone-")
    assert all(c["metadata"]["ownerReferences"][0]["uid"] == new_vm["metadata"]["uid"]
               for c in (inst.get("PersistentVolumeClaim", n) for n in claims_of(inst, "clone").values()))
    inst.cli("vm", "stop", "seq-new", "--wait", "--timeout", "60")
    # a restored claim's name that another claim has is refused before anything is made
    taken = claims_of(inst, "clone")["a"]
    inst.apply(restore_yaml("clash", "seq-snap", "seq-other",
                            f"  volumeRestoreOverrides: [{{volumeName: a, restoreName: {taken}}}]\n"))
    inst.wait(lambda: "is not this restore's" in str(status(inst, "VirtualMachineRestore", "clash").get("conditions")),
              30, "the clashing restore to fail")
    assert inst.get("VirtualMachine", "seq-other") is None

    # deleting the snapshot deletes its content and volume snapshots; restored claims keep their data
    vs_names = [b["volumeSnapshotName"] for b in content["spec"]["volumeBackups"]]
    handles = [inst.get("VolumeSnapshotContent", n, "")["status"]["snapshotHandle"] for n in vs_names]
    csi = CsiClient.of_daemon(inst.data_dir)
    listed = lambda: [e.snapshot.snapshot_id for h in handles  # noqa: E731
                      for e in csi.controller.ListSnapshots(pb.ListSnapshotsRequest(snapshot_id=h)).entries]
    assert sorted(listed()) == sorted(handles)  # one CSI group snapshot's members
    inst.cli("delete", "vmsnapshot", "seq-snap")
    inst.wait(lambda: inst.get("VirtualMachineSnapshotContent", content["metadata"]["name"]) is None
              and all(inst.get("VolumeSnapshot", n) is None and inst.get("VolumeSnapshotContent", n, "") is None
                      for n in vs_names), 30, "the snapshot's content and volume snapshots to go")
    assert listed() == []  # the group snapshot is gone from the driver
    csi.close()
    assert sequence_guest.read_pair(inst.lun_path(claims["a"]), inst.lun_path(claims["b"])) == restored
    out = inst.cli("get", "vmsnapshot").stdout
    assert re.search(r"stopped\s+VirtualMachine\s+seq\s+Succeeded\s+true", out), out
    # a deleted VM comes back from its snapshot, as it was then (stopped)
    old_uid = inst.get("VirtualMachine", "seq")["metadata"]["uid"]
    inst.cli("delete", "vm", "seq")
    inst.wait(lambda: inst.get("VirtualMachine", "seq") is None, 60, "seq to be deleted")
    inst.apply(restore_yaml("undelete", "stopped", "seq"))
    wait_restore(inst, "undelete")
    back = inst.get("VirtualMachine", "seq")
    assert back["metadata"]["uid"] != old_uid and back["spec"]["runStrategy"] == "Halted"
    assert {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in back["spec"]["template"]["spec"]["volumes"]} \
        == claims_of(inst, "undelete")
    a, b = (inst.lun_path(claims_of(inst, "undelete")[v]) for v in ("a", "b"))
    assert sequence_guest.read_pair(a, b) == restored  # the stopped snapshot was of the restored disks
    for vm_name in ("seq", "seq-new"):
        inst.cli("delete", "vm", vm_name)


def test_running_vm_snapshot_is_consistent_on_the_iscsi_backend(serve, seq_images):
    control = free_control_port()
    inst = serve("--backend", "iscsi", "--iscsi-portal", f"127.0.0.1:{free_port()}",
                 "--iscsi-control-port", str(control), "--accel", "tcg")
    boot_writing(inst, "iseq", seq_images)
    assert sum(len(t.luns) for t in Tgtadm(control).show().values()) >= 3  # the VM's disks are iSCSI LUNs
    snap, _claims, restored, last = snapshot_running_then_restore_in_place(inst, "iseq")
    assert snap["indications"] == ["Online", "NoGuestAgent"]
    assert_consistent(restored, last)
    inst.cli("delete", "vm", "iseq")
