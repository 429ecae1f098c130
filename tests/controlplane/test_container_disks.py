"""containerDisk volumes and kernelBoot end to end: images pushed to a real registry (Debian's
docker-registry on loopback, TLS and htpasswd), VMs shaped like KubeVirt's vm-cirros.yaml and
vmi-kernel-boot.yaml applied to `pvlun serve`, real QEMU (TCG) booting the tick guest and the
Debian kernel; the node's cache per digest, the throw-away overlay, hostile images refused."""

from __future__ import annotations

import glob
import hashlib
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from container_registry import Registry, docker_config_secret, install_ca
from guest_output import MARKER

from virt.guest_images import build_initramfs, build_tick_disk, kernel_path


@pytest.fixture(scope="module")
def reg(tmp_path_factory):
    registry = Registry(tmp_path_factory.mktemp("registry"))
    yield registry
    registry.stop()


@pytest.fixture(scope="module")
def images(reg, tmp_path_factory) -> dict[str, str]:
    """name → image reference, pushed once for the module."""
    d = tmp_path_factory.mktemp("images")
    tick = build_tick_disk(d / "tick.raw")
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(tick), str(d / "tick.qcow2")], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "/etc/shadow", "-F", "raw",
                    str(d / "backing.qcow2"), "1M"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(d / "huge.qcow2"), "4T"], check=True)
    kernel = kernel_path()
    initrd = build_initramfs(d / "initrd.img", release=kernel.name.removeprefix("vmlinuz-"))
    layers = {
        "tick": [{"disk/disk.qcow2": (d / "tick.qcow2").read_bytes()}],
        "backing": [{"disk/disk.qcow2": (d / "backing.qcow2").read_bytes()}],
        "huge": [{"disk/disk.qcow2": (d / "huge.qcow2").read_bytes()}],
        "link": [{"disk/disk.qcow2": ("symlink", "/etc/shadow")}],
        "kernel": [{"boot/vmlinuz-virt": kernel.read_bytes()}, {"boot/initramfs-virt": initrd.read_bytes()}],
    }
    return {name: reg.push(f"vm/{name}:v1", data) for name, data in layers.items()}


@pytest.fixture(scope="module")
def node(serve, reg):
    inst = serve("--accel", "tcg")
    install_ca(inst.data_dir, reg)  # the node trusts the registry's CA, as containerd's certs.d would
    inst.apply(docker_config_secret("regcred", reg.host))
    return inst


def cirros_like(name: str, image: str, *, run: bool = True) -> str:
    """KubeVirt's vm-cirros.yaml with our image (and its pull secret)."""
    return f"""apiVersion: kubevirt.io/v1
kind: VirtualMachine
metadata:
  labels:
    kubevirt.io/vm: {name}
  name: {name}
spec:
  running: {str(run).lower()}
  template:
    metadata:
      labels:
        kubevirt.io/vm: {name}
    spec:
      domain:
        devices:
          autoattachPodInterface: false
          disks:
          - disk:
              bus: virtio
            name: containerdisk
          - disk:
              bus: virtio
            name: cloudinitdisk
        resources:
          requests:
            memory: 64Mi
      terminationGracePeriodSeconds: 0
      volumes:
      - containerDisk:
          image: {image}
          imagePullSecret: regcred
        name: containerdisk
      - cloudInitNoCloud:
          userData: |
            #!/bin/sh
            echo 'printed from cloud-init userdata'
        name: cloudinitdisk
"""


def cached_files(inst) -> list[str]:
    return [p for p in glob.glob(os.path.join(inst.data_dir, "container-disks", "sha256-*", "*"))
            if not p.endswith(".json")]


def sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def overlay(inst, vm: str) -> str:
    return os.path.join(inst.data_dir, "vms", "default", vm, inst.nodes()[0], "containerdisk.overlay.qcow2")


def qemu_open_modes(pid: int) -> dict[str, int]:
    """The files QEMU holds open → their access mode (os.O_RDONLY, os.O_RDWR)."""
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            flags = int(Path(f"/proc/{pid}/fdinfo/{fd}").read_text().split("flags:")[1].split()[0], 8)
        except (OSError, IndexError):
            continue
        out[target] = flags & os.O_ACCMODE
    return out


def delete_vm(inst, vm: str) -> None:
    inst.cli("delete", "vm", vm)
    inst.wait(lambda: inst.get("VirtualMachine", vm) is None, 60, f"{vm} deleted")


def test_container_disk_vm_boots_and_a_second_vm_reuses_the_cached_image(node, reg, images):
    node.apply(cirros_like("cirros", images["tick"]), "--wait")
    node.wait(lambda: MARKER in node.all_serial_logs("cirros"), 30, "the guest's marker")
    pulls = reg.blob_gets("vm/tick")
    assert pulls >= 1
    (cached,) = cached_files(node)
    before = (sha256(cached), os.stat(cached).st_mtime_ns)
    assert os.path.exists(overlay(node, "cirros"))
    modes = qemu_open_modes(node.qemu_pid("cirros"))
    assert modes[cached] == os.O_RDONLY and modes[overlay(node, "cirros")] == os.O_RDWR

    node.apply(cirros_like("cirros2", images["tick"]), "--wait")
    node.wait(lambda: MARKER in node.all_serial_logs("cirros2"), 30, "the second guest's marker")
    assert reg.blob_gets("vm/tick") == pulls, "the second VM of the same image pulled it again"
    assert cached_files(node) == [cached]

    for vm in ("cirros", "cirros2"):
        assert "is Stopped" in node.cli("vm", "stop", vm, "--wait", "--timeout", "60").stdout
        assert not os.path.exists(overlay(node, vm)), "the overlay outlived its run"
    assert (sha256(cached), os.stat(cached).st_mtime_ns) == before, "the cached image was written"


def test_kernel_boot_from_a_container_image(node, images):
    manifest = f"""apiVersion: kubevirt.io/v1
kind: VirtualMachine
metadata:
  name: kboot
spec:
  runStrategy: Always
  template:
    spec:
      domain:
        devices:
          autoattachPodInterface: false
        firmware:
          kernelBoot:
            container:
              image: {images['kernel']}
              imagePullSecret: regcred
              initrdPath: /boot/initramfs-virt
              kernelPath: /boot/vmlinuz-virt
            kernelArgs: console=ttyS0 panic=-1 pvlun.data=vda pvlun.marker=PVLUN-KERNEL-BOOT
        resources:
          requests:
            memory: 256Mi
      terminationGracePeriodSeconds: 0
      volumes:
      - name: scratch
        emptyDisk:
          capacity: 1Mi
"""
    node.apply(manifest, "--wait")
    # the init of the image's initrd prints the marker kernelArgs gave it, on a line of its own (the
    # kernel's own "Command line:" echo holds it too, mid-line)
    node.wait(lambda: re.search(r"^PVLUN-KERNEL-BOOT\r?$", node.all_serial_logs("kboot"), re.M), 120,
              "the initrd's marker")
    assert "PVLUN-SHA256" in node.all_serial_logs("kboot")
    delete_vm(node, "kboot")


@pytest.mark.parametrize("name,reason", [
    ("backing", "names a backing file"),
    ("huge", "declares 4398046511104 bytes"),
    ("link", "/disk/disk.qcow2 in the image is a link, not a regular file"),
])
def test_hostile_image_fails_the_vmi_with_a_clear_reason(node, images, name, reason):
    vm = f"hostile-{name}"
    node.apply(cirros_like(vm, images[name]))
    status = node.wait(lambda: (lambda s: s.get("phase") == "Failed" and s)(node.vmi_status(vm)), 60,
                       f"{vm}'s VMI Failed")  # one read: the VM's next run may reset it meanwhile
    assert reason in status["reason"] and images[name] in status["reason"], status["reason"]
    assert "/container-disks/" not in status["reason"]
    assert not os.path.exists(overlay(node, vm))
    delete_vm(node, vm)


# ---------------------------------------------------------------- the node's cache, per digest

def raw_disk(marker: bytes) -> bytes:
    return marker.ljust(64 << 10, b"\0")


@pytest.fixture
def cache(reg, tmp_path):
    from importer.container_disks import ImageCache

    install_ca(str(tmp_path), reg)
    return ImageCache(str(tmp_path / "container-disks"), certs_dir=str(tmp_path / "certs.d"))


@pytest.fixture(scope="module")
def pull_secret(reg) -> dict[str, str]:
    import base64
    import yaml

    data = yaml.safe_load(docker_config_secret("x", reg.host))["data"]
    return {k: base64.b64decode(v).decode() for k, v in data.items()}


def test_a_moved_tag_pulls_its_new_digest_and_always_pulls_no_blob_for_a_known_digest(reg, cache, pull_secret):
    first = reg.push("vm/moving:v1", [{"disk/disk.img": raw_disk(b"first")}])
    a = cache.disk(first, policy="Always", pull_secret=pull_secret)
    assert a.format == "raw" and Path(a.path).read_bytes().startswith(b"first")
    pulls = reg.blob_gets("vm/moving")
    again = cache.disk(first, policy="Always", pull_secret=pull_secret)  # the manifest asked again, no blob
    assert again == a and reg.blob_gets("vm/moving") == pulls

    reg.push("vm/moving:v1", [{"disk/disk.img": raw_disk(b"second")}])
    assert cache.disk(first, policy="IfNotPresent", pull_secret=pull_secret) == a  # the node has it: not asked
    b = cache.disk(first, policy="Always", pull_secret=pull_secret)
    assert b.digest != a.digest and Path(b.path).read_bytes().startswith(b"second")
    assert Path(a.path).read_bytes().startswith(b"first")  # the old digest's file is left as it was
    assert cache.disk(first, policy="Never") == b  # the reference now means the new digest on this node
    pinned = cache.disk(first.rsplit(":", 1)[0] + "@" + a.digest, policy="Never")
    assert pinned == a


def test_pull_policy_never_secret_and_path(reg, cache, pull_secret, images):
    from importer.container_disks import ImageUnavailable

    with pytest.raises(ImageUnavailable, match="not present on the node and its imagePullPolicy is Never"):
        cache.disk(images["tick"], policy="Never")
    with pytest.raises(ImageUnavailable) as info:
        cache.disk(images["tick"], policy="Always")  # no pull secret: the registry says no
    assert info.value.reason == "Unauthorized"
    with pytest.raises(ImageUnavailable, match="holds no file /boot/nothing"):
        cache.file(images["kernel"], "/boot/nothing", pull_secret=pull_secret)
    ref = reg.push("vm/custom:v1", [{"custom/my.qcow2": raw_disk(b"custom"), "disk/other": b"x"}])
    disk = cache.disk(ref, "/custom/my.qcow2", pull_secret=pull_secret)
    assert Path(disk.path).read_bytes().startswith(b"custom")


def test_a_file_declaring_more_than_its_bound_is_refused_before_it_is_read(reg, cache, pull_secret):
    import tarfile

    from importer.container_disks import MAX_BOOT_FILE, ImageUnavailable

    header = tarfile.TarInfo("boot/vmlinuz")
    header.size = MAX_BOOT_FILE + 1
    ref = reg.push("vm/liar:v1", [header.tobuf(format=tarfile.PAX_FORMAT) + b"\0" * 1024])
    with pytest.raises(ImageUnavailable, match=f"declares {MAX_BOOT_FILE + 1} bytes, more than"):
        cache.file(ref, "/boot/vmlinuz", pull_secret=pull_secret)
    assert not glob.glob(os.path.join(cache.root, "sha256-*", "*"))
    assert [n for n in os.listdir(os.path.join(cache.root, "tmp")) if not n.startswith("lock-")] == []


@pytest.mark.parametrize("options,reason", [
    (["-f", "qcow2", "-o", "data_file={tmp}/data.raw"], "uses an external data file"),
    (["-f", "vmdk"], "holds a qcow2 or raw disk, not vmdk"),
])
def test_a_disk_naming_another_file_or_of_another_format_is_refused_and_not_cached(reg, cache, pull_secret,
                                                                                    tmp_path, options, reason):
    from importer.container_disks import ImageUnavailable

    disk = tmp_path / "disk.img"
    subprocess.run(["qemu-img", "create", "-q", *[o.format(tmp=tmp_path) for o in options], str(disk), "1M"],
                   check=True)
    ref = reg.push(f"vm/other-{options[1]}:v1", [{"disk/disk.img": disk.read_bytes()}])
    with pytest.raises(ImageUnavailable, match=reason):
        cache.disk(ref, pull_secret=pull_secret)
    assert not glob.glob(os.path.join(cache.root, "sha256-*", "*"))


def test_a_vmi_alone_shaped_as_vmi_nocloud_boots_its_container_disk(node, images):
    """KubeVirt's vmi-nocloud.yaml shape (containerDisk, cloudInitNoCloud, emptyDisk), applied
    alone: no VM; deleting it takes its throw-away overlay with it."""
    template = yaml.safe_load(cirros_like("vmi-nocloud", images["tick"]))["spec"]["template"]
    template["spec"]["domain"]["devices"]["disks"].append({"disk": {"bus": "virtio"}, "name": "emptydisk"})
    template["spec"]["volumes"].append({"emptyDisk": {"capacity": "64Mi"}, "name": "emptydisk"})
    node.apply(yaml.safe_dump({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
                               "metadata": {"name": "vmi-nocloud", "labels": {"special": "vmi-nocloud"}},
                               "spec": template["spec"]}), "--wait", "--timeout", "120")
    node.wait(lambda: MARKER in node.all_serial_logs("vmi-nocloud"), 30, "the guest's marker")
    assert node.vmi_status("vmi-nocloud")["phase"] == "Running" and node.get("VirtualMachine", "vmi-nocloud") is None
    assert os.path.exists(overlay(node, "vmi-nocloud"))
    node.cli("delete", "vmi", "vmi-nocloud")
    node.wait(lambda: node.get("VirtualMachineInstance", "vmi-nocloud") is None, 60, "the VMI gone")
    assert not os.path.exists(overlay(node, "vmi-nocloud"))
