"""`pvlun serve --backend iscsi` with a StorageClass that names its CHAP secrets the way the
external-provisioner reads them: the provisioner secret makes the target's CHAP account, the
node-stage secret logs in — through the node's userspace path for the import, and through
QEMU's own libiscsi for a `qemuDirect` VM. The password reaches no log, no argv, no object but
the Secret; a named secret that is missing fails the import with its name."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from guest_output import MARKER

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "csi"))
from iscsi_target_support import free_control_port, free_port  # noqa: E402

from host.tgt import Tgtadm  # noqa: E402
from virt.guest_images import tick_vm_manifest  # noqa: E402

PASSWORD = "embedded-chap-pw-93"
CLASS = """apiVersion: v1
kind: Secret
metadata: {name: chap, namespace: infra}
stringData: {node.session.auth.username: vmchap, node.session.auth.password: %s}
---
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {name: %s}
provisioner: csi.pvlun.dev
parameters:
  qemuDirect: "true"
  csi.storage.k8s.io/provisioner-secret-name: chap
  csi.storage.k8s.io/provisioner-secret-namespace: infra
  csi.storage.k8s.io/node-stage-secret-name: %s
  csi.storage.k8s.io/node-stage-secret-namespace: infra
""" 


@pytest.fixture(scope="module")
def chap_serve(serve):
    control = free_control_port()
    inst = serve("--backend", "iscsi", "--iscsi-portal", f"127.0.0.1:{free_port()}",
                 "--iscsi-control-port", str(control), "--accel", "tcg")
    inst.control = control
    return inst


def vm_on(name: str, url: str, storage_class: str) -> str:
    return tick_vm_manifest(name, url).replace("        volumeMode: Block\n",
                                               f"        volumeMode: Block\n        storageClassName: {storage_class}\n")


def test_a_qemu_direct_vm_on_a_chap_class_boots_and_the_password_stays_in_its_secret(chap_serve, tick_image):
    inst = chap_serve
    inst.apply(CLASS % (PASSWORD, "chap-direct", "chap"))
    out = inst.apply(vm_on("chapvm", tick_image, "chap-direct"), "--wait")
    assert "virtualmachine/chapvm Running" in out.stdout, out.stdout + out.stderr
    inst.wait(lambda: MARKER in inst.all_serial_logs("chapvm"), 60, "chapvm's marker")
    (volume,) = inst.vmi_status("chapvm")["volumeStatus"]
    assert volume["access"] == "iscsi-direct"  # QEMU logged in itself, with the node-stage secret
    (target,) = [t for t in Tgtadm(inst.control).show().values() if t.luns]
    assert target.accounts == ["vmchap"]  # the provisioner secret made the account: no anonymous login
    pv = inst.get("PersistentVolume", inst.get("PersistentVolumeClaim", "chapvm-root")["spec"]["volumeName"], "")
    assert pv["spec"]["csi"]["nodeStageSecretRef"] == {"name": "chap", "namespace": "infra"}
    assert not any(k.startswith("csi.storage.k8s.io/") for k in pv["spec"]["csi"]["volumeAttributes"])
    with open(f"/proc/{inst.qemu_pid('chapvm')}/cmdline", "rb") as f:
        assert PASSWORD.encode() not in f.read()
    logs = "".join(p.read_text(errors="replace") for p in Path(inst.data_dir).rglob("*.log"))
    assert PASSWORD not in logs
    inst.cli("delete", "vm", "chapvm")


def test_a_missing_node_stage_secret_fails_the_import_with_its_name(chap_serve, tick_image):
    inst = chap_serve
    inst.apply(CLASS % (PASSWORD, "chap-missing", "nowhere"))
    out = inst.apply(vm_on("nosecret", tick_image, "chap-missing"), check=False)
    assert out.returncode == 0, out.stderr
    dv = inst.wait(lambda: (inst.get("DataVolume", "nosecret-root") or {}).get("status", {}).get("phase") == "Failed"
                   and inst.get("DataVolume", "nosecret-root"), 60, "the import to fail")
    said = " ".join(c.get("message", "") for c in dv["status"]["conditions"])
    assert "node-stage secret infra/nowhere not found" in said
    assert PASSWORD not in said
    inst.cli("delete", "vm", "nosecret")
