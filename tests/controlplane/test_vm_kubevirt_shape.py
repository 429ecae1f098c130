"""A VirtualMachine shaped like KubeVirt's examples/vm-alpine-datavolume.yaml (empty machine
type, a disk without bus, rng, a pod network with a masquerade interface without model,
terminationGracePeriodSeconds 0) plus fields pvlun keeps without running, applied to a real
`pvlun serve`: the tick guest boots, and Warning events name each ignored field."""

from __future__ import annotations

import pytest
from guest_output import MARKER


@pytest.fixture(scope="module")
def inst(serve):
    return serve("--accel", "tcg")


def manifest(url: str) -> str:
    return f"""---
apiVersion: kubevirt.io/v1
kind: VirtualMachine
metadata:
  labels:
    kubevirt.io/vm: vm-alpine-datavolume
  name: vm-alpine-datavolume
spec:
  dataVolumeTemplates:
  - metadata:
      creationTimestamp: null
      name: alpine-dv
    spec:
      pvc:
        accessModes:
        - ReadWriteOnce
        resources:
          requests:
            storage: 64Mi
      source:
        http:
          url: "{url}"
  running: true
  template:
    metadata:
      labels:
        kubevirt.io/vm: vm-alpine-datavolume
    spec:
      evictionStrategy: LiveMigrate
      nodeSelector:
        kubernetes.io/os: linux
      domain:
        machine:
          type: ""
        devices:
          disks:
          - disk: {{}}
            name: datavolumedisk1
          interfaces:
          - name: default
            masquerade: {{}}
          rng: {{}}
          watchdog:
            name: wd
            i6300esb:
              action: poweroff
        resources:
          requests:
            memory: 64Mi
      networks:
      - name: default
        pod: {{}}
      terminationGracePeriodSeconds: 0
      volumes:
      - dataVolume:
          name: alpine-dv
        name: datavolumedisk1
"""


def test_kubevirt_example_shape_boots_and_warns_about_what_it_ignores(inst, tick_image):
    name = "vm-alpine-datavolume"
    out = inst.apply(manifest(tick_image), "--wait")
    assert f"virtualmachine/{name} Running" in out.stdout, out.stdout + out.stderr
    inst.wait(lambda: MARKER in inst.all_serial_logs(name), 30, "the tick guest's marker")
    with open(f"/proc/{inst.qemu_pid(name)}/cmdline", "rb") as f:
        argv = f.read().decode().split("\0")
    assert "q35" in argv and "virtio-rng-pci,rng=rng0,id=ua-rng" in argv and "watchdog=poweroff" in argv
    assert any(a.startswith("virtio-blk-pci,") for a in argv) and any(a.startswith("virtio-net-pci,") for a in argv)

    def warnings(kind: str) -> list[str]:
        obj = inst.get(kind, name)
        return sorted(e["message"] for e in inst.store.events(obj) if e["type"] == "Warning"
                      and e["reason"] == "FieldIgnored")

    vm_warnings = inst.wait(lambda: len(warnings("VirtualMachine")) == 2 and warnings("VirtualMachine"), 10,
                            "the VM's FieldIgnored events")
    assert vm_warnings[0].startswith("spec.template.spec.evictionStrategy: ignored, a node drain neither")
    assert vm_warnings[1].startswith("spec.template.spec.nodeSelector: ignored, pvlun serve places VMs")
    vmi_warnings = inst.wait(lambda: len(warnings("VirtualMachineInstance")) == 2
                             and warnings("VirtualMachineInstance"), 10, "the VMI's FieldIgnored events")
    assert [m.split(":")[0] for m in vmi_warnings] == ["spec.evictionStrategy", "spec.nodeSelector"]
    described = inst.cli("describe", "vm", name).stdout
    assert "FieldIgnored" in described and "spec.template.spec.evictionStrategy: ignored" in described
    inst.cli("vm", "stop", name, "--wait")
