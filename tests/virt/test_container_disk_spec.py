"""containerDisk and kernelBoot in a VMI spec: what is accepted (KubeVirt's shapes), what is
refused at apply with the field, and the QEMU argv they become (pure: nothing runs)."""

from __future__ import annotations

import json

import pytest

from controlplane.vm_images import ContainerImage, KernelBoot
from controlplane.vm_spec import SpecError, parse_virtual_machine
from virt.container_volumes import cluster_refusal
from virt.qemu_args import BaseImage, DiskAttachment, KernelFiles, build_qemu_argv

IMAGE = "registry:5000/kubevirt/cirros-container-disk-demo:devel"


def vm(volumes=(), firmware=None, disks=()):
    domain = {"resources": {"requests": {"memory": "128Mi"}},
              "devices": {"disks": list(disks), "autoattachPodInterface": False}}
    if firmware is not None:
        domain["firmware"] = firmware
    return parse_virtual_machine({
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "metadata": {"name": "c"},
        "spec": {"running": False, "template": {"spec": {"domain": domain, "volumes": list(volumes)}}}}).template


def container_disk(**body):
    return {"name": "containerdisk", "containerDisk": {"image": IMAGE, **body}}


def kernel_boot(**extra):
    container = {"image": IMAGE, "kernelPath": "/boot/vmlinuz-virt", "initrdPath": "/boot/initramfs-virt"}
    container.update(extra.pop("container", {}))
    return {"kernelBoot": {"container": container, "kernelArgs": "console=ttyS0", **extra}}


def refused(spec_fn) -> SpecError:
    with pytest.raises(SpecError) as info:
        spec_fn()
    return info.value


def test_container_disk_shaped_like_vm_cirros_is_accepted():
    spec = vm([container_disk(), {"name": "cloudinitdisk", "cloudInitNoCloud": {"userData": "#!/bin/sh\n"}}],
              disks=[{"name": "containerdisk", "disk": {"bus": "virtio"}}])
    assert spec.volume("containerdisk").container == ContainerImage(IMAGE)
    digest = "registry.example/vm/disk@sha256:" + "a" * 64
    spec = vm([container_disk(image=digest, path="/custom/disk.img", imagePullPolicy="Never",
                              imagePullSecret="regcred")])
    assert spec.volume("containerdisk").container == ContainerImage(digest, "Never", "regcred", "/custom/disk.img")


def test_kernel_boot_shaped_like_vmi_kernel_boot_is_accepted():
    spec = vm(firmware=kernel_boot())
    assert spec.kernel_boot == KernelBoot(ContainerImage(IMAGE), "/boot/vmlinuz-virt", "/boot/initramfs-virt",
                                          "console=ttyS0")
    assert "kernelBoot" in cluster_refusal(spec) and cluster_refusal(vm([container_disk()]))
    assert cluster_refusal(vm([{"name": "e", "emptyDisk": {"capacity": "1Mi"}}])) is None


@pytest.mark.parametrize("body,field", [
    ({"image": ""}, "volumes[0].containerDisk.image"),
    ({"image": "cirros:latest"}, "volumes[0].containerDisk.image"),  # no registry host
    ({"image": "reg.example/UPPER:tag"}, "volumes[0].containerDisk.image"),
    ({"image": "reg.example/a:b,c=d"}, "volumes[0].containerDisk.image"),
    ({"image": "reg.example/a\n:b"}, "volumes[0].containerDisk.image"),
    ({"path": "/disk/../../etc/shadow"}, "volumes[0].containerDisk.path"),
    ({"path": "disk.img"}, "volumes[0].containerDisk.path"),
    ({"imagePullPolicy": "Sometimes"}, "volumes[0].containerDisk.imagePullPolicy"),
    ({"imagePullSecret": "../x"}, "volumes[0].containerDisk.imagePullSecret"),
    ({"extra": 1}, "volumes[0].containerDisk.extra"),
])
def test_bad_container_disk_is_refused_with_its_field(body, field):
    error = refused(lambda: vm([container_disk(**body)]))
    assert error.path.endswith(field), error


@pytest.mark.parametrize("extra,field", [
    ({"kernelArgs": "console=ttyS0\n-device evil"}, "kernelBoot.kernelArgs"),
    ({"kernelArgs": "x" * 2049}, "kernelBoot.kernelArgs"),
    ({"kernelArgs": "a\x00b"}, "kernelBoot.kernelArgs"),
    ({"container": {"kernelPath": None}}, "kernelBoot.container.kernelPath"),
    ({"container": {"kernelPath": "/boot/../../etc/shadow"}}, "kernelBoot.container.kernelPath"),
    ({"container": {"image": None}}, "kernelBoot.container.image"),
])
def test_bad_kernel_boot_is_refused_with_its_field(extra, field):
    error = refused(lambda: vm(firmware=kernel_boot(**extra)))
    assert error.path.endswith(field), error


def test_overlay_argv_names_the_cached_image_read_only_and_cuts_its_own_backing():
    spec = vm([container_disk()])
    att = DiskAttachment("/run/vm/containerdisk.overlay.qcow2", block=False, direct_io=False, fd=7,
                         overlay_of=BaseImage("/cache/sha256-x/disk", "qcow2", fd=8))
    argv = build_qemu_argv(spec, {"containerdisk": att}, accel="tcg", qmp_fd=3, serial_fd=4)
    nodes = {n["node-name"]: n for n in (json.loads(argv[i + 1]) for i, a in enumerate(argv) if a == "-blockdev")}
    assert nodes["bfile-containerdisk"] == {"driver": "file", "filename": "/dev/fdset/8",
                                            "node-name": "bfile-containerdisk", "read-only": True}
    assert nodes["bfmt-containerdisk"] == {"driver": "qcow2", "node-name": "bfmt-containerdisk",
                                           "file": "bfile-containerdisk", "read-only": True, "backing": None}
    top = nodes["fmt-containerdisk"]
    assert top["driver"] == "qcow2" and top["backing"] == "bfmt-containerdisk" and top["read-only"] is False
    assert nodes["file-containerdisk"]["filename"] == "/dev/fdset/7"
    assert "fd=8,set=8,opaque=/cache/sha256-x/disk" in argv


def test_kernel_args_are_one_argv_element_and_files_are_inherited():
    spec = vm(firmware=kernel_boot())
    argv = build_qemu_argv(spec, {}, accel="tcg", qmp_fd=3, serial_fd=4,
                           kernel=KernelFiles(9, 10, "console=ttyS0 a,b=c -device x"))
    i = argv.index("-kernel")
    assert argv[i:i + 6] == ["-kernel", "/proc/self/fd/9", "-initrd", "/proc/self/fd/10",
                             "-append", "console=ttyS0 a,b=c -device x"]
    with pytest.raises(ValueError):
        KernelFiles(9, None, "a\nb")


def test_cluster_mode_launcher_pods_refuse_kernel_boot_with_the_field():
    from virt.pods import vmi_spec

    vmi = {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance", "metadata": {"name": "k"},
           "spec": {"domain": {"resources": {"requests": {"memory": "128Mi"}}, **kernel_boot_domain()}}}
    with pytest.raises(SpecError) as info:
        vmi_spec(vmi)
    assert info.value.path == "spec.domain.firmware.kernelBoot" and "cluster mode" in str(info.value)


def kernel_boot_domain() -> dict:
    return {"firmware": kernel_boot()}
