"""A Filesystem claim whose disk.img its owner replaced with a symbolic link to a root-only file
of the host (a pod can, in cluster mode; so can a guest that had the volume before): the
daemon never follows it. A VM using the claim does not start (the event says why, no volume
stays attached), a host-assisted clone of it fails with the reason, `pvlun export` refuses it
in one line — and the host file keeps its owner, mode and bytes, and is in no volume or file."""

from __future__ import annotations

import os
import stat
import subprocess

import pytest
from test_datavolume import dv

CANARY = b"ROOT-ONLY-CANARY " * 4096


@pytest.fixture(scope="module")
def linked(instance, tmp_path_factory):
    """A Filesystem claim `linked` whose disk.img is a link to a root-only canary; the canary."""
    secret = tmp_path_factory.mktemp("secret")
    secret.chmod(0o700)
    canary = secret / "canary"
    canary.write_bytes(CANARY)
    canary.chmod(0o600)
    instance.apply(dv("linked", "    blank: {}", size="64Mi", mode="Filesystem"), "--wait")
    lun = instance.lun_path("linked")
    for request in ("rm disk.img", f"symlink disk.img {canary}"):  # the volume is detached: edit its ext4
        subprocess.run(["debugfs", "-w", "-R", request, lun], check=True, capture_output=True)
    listing = subprocess.run(["debugfs", "-R", "stat disk.img", lun], capture_output=True, text=True).stdout
    assert "Type: symlink" in listing, listing
    return canary


def untouched(canary) -> bool:
    st = os.stat(canary)
    return (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600) and canary.read_bytes() == CANARY


def holds_canary(path: str) -> bool:
    with open(path, "rb") as f:
        return CANARY[:4096] in f.read()


def test_a_vm_on_the_claim_does_not_start_and_the_host_file_stays_root_only(instance, linked):
    instance.apply("""apiVersion: kubevirt.io/v1
kind: VirtualMachine
metadata:
  name: linked-vm
spec:
  runStrategy: Manual
  template:
    spec:
      domain:
        devices:
          autoattachPodInterface: false
          disks:
          - name: root
            disk: {bus: virtio}
        memory: {guest: 64Mi}
      volumes:
      - name: root
        persistentVolumeClaim: {claimName: linked}
""")
    instance.cli("vm", "start", "linked-vm")
    vm = instance.get("VirtualMachine", "linked-vm")
    events = instance.wait(lambda: [e for e in instance.store.events(vm) if "symbolic link" in e["message"]], 30,
                           "the refusal event")
    assert "volume root (claim linked): disk.img is a symbolic link" in events[0]["message"]
    assert str(linked) not in events[0]["message"]
    instance.wait_printable("linked-vm", "Stopped", 15)  # a Manual VM whose run failed stays stopped
    assert instance.attachments("linked-vm") == [] and untouched(linked)


def test_a_host_assisted_clone_of_the_claim_fails_with_the_reason(instance, linked):
    instance.apply(dv("linked-copy", "    pvc:\n      name: linked", size="64Mi", mode="Block"))
    status = instance.wait(lambda: ((instance.get("DataVolume", "linked-copy") or {}).get("status") or {})
                           .get("phase") == "Failed" and instance.get("DataVolume", "linked-copy")["status"], 60,
                           "the clone Failed")
    reason = " ".join(c.get("message", "") for c in status.get("conditions", []))
    assert "claim linked: disk.img is a symbolic link" in reason, status
    pvc = instance.get("PersistentVolumeClaim", "linked-copy")
    if pvc is not None and instance.get("PersistentVolume", pvc["spec"].get("volumeName") or ""):  # none once deleted
        assert not holds_canary(instance.lun_path("linked-copy"))
    assert untouched(linked)


def test_export_of_the_claim_is_refused_in_one_line(instance, linked, tmp_path):
    out = tmp_path / "out.raw"
    proc = instance.cli("export", "pvc", "linked", "-o", str(out), check=False)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert "disk.img is a symbolic link" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists() and untouched(linked)
    assert instance.store.list("VolumeAttachment") == [] or all(
        a["spec"].get("owner") != "export/default/linked" for a in instance.store.list("VolumeAttachment"))
