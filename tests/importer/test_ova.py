"""VMware exports: an OVA is a tar of an OVF descriptor, a manifest and streamOptimized
VMDK disks. The disk is found by its content; the text files beside it are passed over."""

from __future__ import annotations

import hashlib
import subprocess
import tarfile

import pytest

from importer.errors import ImportFailed
from importer.pipeline import Target

from importer_support import MiB, assert_disk, block_target, published, run_import

OVF = b"""<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1"><References>
<File ovf:href="vm-disk1.vmdk" ovf:id="file1"/></References></Envelope>
"""


def make_ova(tmp_path, images, members: list[str]) -> str:
    vmdk = tmp_path / "vm-disk1.vmdk"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized",
                    str(images.expected["raw"]), str(vmdk)], check=True)
    ovf = tmp_path / "vm.ovf"
    ovf.write_bytes(OVF)
    mf = tmp_path / "vm.mf"
    mf.write_text("".join(f"SHA256({p.name})= {hashlib.sha256(p.read_bytes()).hexdigest()}\n" for p in (ovf, vmdk)))
    ova = tmp_path / "vm.ova.bin"
    with tarfile.open(ova, "w") as tar:  # OVF first, as the OVF spec requires
        for name in members:
            tar.add(tmp_path / name, arcname=name)
    return str(ova)


def test_ova_imports_its_vmdk_not_its_ovf_descriptor(images, public, tmp_path, scratch):
    ova = published(public, make_ova(tmp_path, images, ["vm.ovf", "vm-disk1.vmdk", "vm.mf"]), "vm.ova")
    lun = block_target(tmp_path, 16 * MiB)
    result, _ = run_import({"http": {"url": f"file://{ova}"}}, Target(str(lun), 16 * MiB), scratch, allow_file=True)
    assert (result.format, result.layers) == ("vmdk", ("tar",))
    assert_disk(lun, images.expected["raw"])


def test_tar_of_only_text_files_fails_naming_them(images, public, tmp_path, scratch):
    make_ova(tmp_path, images, [])
    ova = tmp_path / "text-only.bin"
    with tarfile.open(ova, "w") as tar:
        tar.add(tmp_path / "vm.ovf", arcname="vm.ovf")
        tar.add(tmp_path / "vm.mf", arcname="vm.mf")
    ova = published(public, ova)
    lun = block_target(tmp_path, 16 * MiB)
    with pytest.raises(ImportFailed) as failed:
        run_import({"http": {"url": f"file://{ova}"}}, Target(str(lun), 16 * MiB), scratch, allow_file=True)
    assert failed.value.reason == "InvalidImage"
    assert "no disk image" in failed.value.message and "vm.ovf" in failed.value.message
