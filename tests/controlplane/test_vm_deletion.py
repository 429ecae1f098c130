"""Deleting a VirtualMachine ends everything it held (QEMU, attachments, VMI, run dirs), and
Kubernetes-style garbage collection takes its DataVolumes and their claims and volumes:
dependents go when every owner is gone, judged by uid."""

from __future__ import annotations

import os
import subprocess
import uuid

import grpc
import pytest
import yaml

from csi.proto import csi_pb2 as pb
from csi.proto import csi_pb2_grpc
from guest_output import MARKER, alive


@pytest.fixture(scope="module")
def gc(serve):
    return serve("--nodes", "2", "--accel", "tcg")


def csi_volumes(inst) -> dict[str, list[str]]:
    """The CSI driver's own view: volume id -> nodes it is published on."""
    with grpc.insecure_channel(f"unix://{inst.data_dir}/csi.sock") as channel:
        entries = csi_pb2_grpc.ControllerStub(channel).ListVolumes(pb.ListVolumesRequest(), timeout=10).entries
    return {e.volume.volume_id: sorted(e.status.published_node_ids) for e in entries}


def volume_of(inst, claim: str) -> tuple[str, str, str]:
    """(PV name, CSI volume id, LUN file) of a bound claim."""
    pv_name = inst.get("PersistentVolumeClaim", claim)["spec"]["volumeName"]
    handle = inst.get("PersistentVolume", pv_name)["spec"]["csi"]["volumeHandle"]
    return pv_name, handle, inst.lun_path(claim)


def gone(inst, *objects: tuple[str, str]) -> bool:
    return all(inst.get(kind, name) is None for kind, name in objects)


def test_deleting_a_running_vm_stops_qemu_releases_its_volume_and_collects_its_datavolume(gc, tick_image,
                                                                                            tick_vm_yaml):
    out = gc.apply(tick_vm_yaml("doomed", tick_image), "--wait")
    assert "virtualmachine/doomed Running" in out.stdout, out.stdout + out.stderr
    gc.wait(lambda: MARKER in gc.cli("logs", "vm/doomed").stdout, 30, "doomed's marker")
    pid = gc.qemu_pid("doomed")
    pv_name, handle, lun = volume_of(gc, "doomed-root")
    node = gc.nodes()[0]
    assert [a["spec"]["nodeName"] for a in gc.attachments("doomed")] == [node] and csi_volumes(gc)[handle] == [node]

    out = gc.cli("delete", "vm", "doomed")
    assert 'virtualmachine "doomed" deleted' in out.stdout
    gc.wait(lambda: gone(gc, ("VirtualMachine", "doomed")), 30, "the VM gone")
    assert not alive(pid)
    vm_ref = {"kind": "VirtualMachine", "metadata": {"name": "doomed", "namespace": "default"}}
    stopped = [e for e in gc.store.events(vm_ref) if e["reason"] == "Stopped"]
    assert stopped and stopped[-1]["message"] == "host-qmp-quit"  # powerdown ignored, then quit: not killed
    assert gc.attachments("doomed") == [] and gc.get("VirtualMachineInstance", "doomed") is None
    assert not os.path.exists(os.path.join(gc.data_dir, "vms", "default", "doomed"))  # run dirs, console history
    leftover = subprocess.run(["pgrep", "-f", "vms/default/doomed/"], capture_output=True, text=True)
    assert leftover.stdout == ""  # neither QEMU nor its sandbox
    # its dataVolumeTemplates' DataVolume, then the claim, then the volume itself
    gc.wait(lambda: gone(gc, ("DataVolume", "doomed-root"), ("PersistentVolumeClaim", "doomed-root"),
                         ("PersistentVolume", pv_name)), 30, "the DataVolume, claim and volume collected")
    assert handle not in csi_volumes(gc) and not os.path.exists(lun)
    err = gc.cli("logs", "vm/doomed", check=False)
    assert err.returncode == 1 and "not found" in err.stderr


def test_deleting_a_stopped_vm_collects_its_datavolume_without_starting_it(gc, tick_image, tick_vm_yaml):
    gc.apply(tick_vm_yaml("halted", tick_image, strategy="Halted"))
    gc.wait(lambda: ((gc.get("DataVolume", "halted-root") or {}).get("status") or {}).get("phase") == "Succeeded",
            60, "halted's DataVolume imported")
    gc.wait_printable("halted", "Stopped", 10)
    pv_name, handle, lun = volume_of(gc, "halted-root")
    gc.cli("delete", "vm", "halted")
    gc.wait(lambda: gone(gc, ("VirtualMachine", "halted"), ("DataVolume", "halted-root"),
                         ("PersistentVolumeClaim", "halted-root"), ("PersistentVolume", pv_name)), 30,
            "the VM and everything it owned gone")
    assert handle not in csi_volumes(gc) and not os.path.exists(lun)
    assert not os.path.exists(os.path.join(gc.data_dir, "vms", "default", "halted", "console.log"))  # never ran


def secret(name: str, *owners: dict) -> str:
    return yaml.safe_dump({"apiVersion": "v1", "kind": "Secret",
                           "metadata": {"name": name, "ownerReferences": list(owners)}, "data": {}})


def ref(kind: str, name: str, uid: str) -> dict:
    return {"apiVersion": "v1", "kind": kind, "name": name, "uid": uid}


def test_dependents_go_when_every_owner_is_gone_judged_by_uid(gc):
    gc.apply(yaml.safe_dump_all([{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": n}}
                                 for n in ("gc-owner", "gc-keeper")]))
    owner_uid = gc.get("ConfigMap", "gc-owner")["metadata"]["uid"]
    keeper = ref("ConfigMap", "gc-keeper", gc.get("ConfigMap", "gc-keeper")["metadata"]["uid"])
    never = str(uuid.uuid4())  # a uid no object ever had
    gc.apply("---\n".join([
        secret("gc-impostor", ref("ConfigMap", "gc-owner", never)),  # the name exists, the owner does not
        secret("gc-child", ref("ConfigMap", "gc-owner", owner_uid)),
        secret("gc-shared", ref("ConfigMap", "gc-owner", owner_uid), keeper),
        secret("gc-foreign", ref("Widget", "gc-owner", never)),  # a kind pvlun does not store: never judged
    ]))
    gc.wait(lambda: gone(gc, ("Secret", "gc-impostor")), 15, "the impostor's dependent collected")
    assert all(gc.get("Secret", n) for n in ("gc-child", "gc-shared", "gc-foreign"))

    # the owner is deleted and made again under the same name: a new uid, so not the owner
    gc.cli("delete", "configmap", "gc-owner")
    gc.apply(yaml.safe_dump({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "gc-owner"}}))
    assert gc.get("ConfigMap", "gc-owner")["metadata"]["uid"] != owner_uid
    gc.wait(lambda: gone(gc, ("Secret", "gc-child")), 15, "the dependent of the deleted owner collected")
    gc.wait(lambda: gc.get("Secret", "gc-shared")["metadata"]["ownerReferences"] == [keeper], 15,
            "the shared dependent kept, by its remaining owner only")
    assert gc.get("Secret", "gc-foreign") is not None
