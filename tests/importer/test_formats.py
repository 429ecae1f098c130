"""Detection by content (never by name) and qemu-img inspection under limits."""

from __future__ import annotations

import pytest

from importer import errors, formats
from importer.errors import ImportFailed

from importer_support import qemu_img

EXPECTED = {
    "raw": "raw", "qcow2": "qcow2", "vmdk": "vmdk", "vdi": "vdi", "vhd": "vhd", "vhdx": "vhdx", "iso": "iso",
    "raw.gz": "gzip", "raw.xz": "xz", "raw.zst": "zstd", "raw.tar": "tar", "qcow2.tar.gz": "gzip",
}


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_detect_by_magic_bytes(kind, images):
    with open(images.path(kind), "rb") as f:
        head = f.read(formats.HEAD_SIZE)
    assert formats.detect(head) == EXPECTED[kind]


def test_fixed_vhd_is_recognised_by_its_footer(tmp_path, images):
    fixed = tmp_path / "fixed.vhd"
    qemu_img("convert", "-O", "vpc", "-o", "subformat=fixed", str(images.path("raw")), str(fixed))
    data = fixed.read_bytes()
    assert formats.detect(data[: formats.HEAD_SIZE]) == "raw"
    assert formats.detect(data[: formats.HEAD_SIZE], data[-512:]) == "vhd"


@pytest.mark.parametrize("kind", ["qcow2", "vmdk", "vdi", "vhd", "vhdx"])
def test_inspect_reports_virtual_size(kind, images):
    node = formats.local_image(str(images.path(kind)), kind)
    info = formats.inspect(node)
    assert info.virtual_size >= 6 << 20
    formats.verify_integrity(node, file_size=images.path(kind).stat().st_size)


def test_inspect_refuses_backing_file_even_if_the_header_check_is_bypassed(tmp_path):
    base = tmp_path / "base.raw"
    base.write_bytes(b"\0" * 4096)
    overlay = tmp_path / "overlay.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", str(base), "-F", "raw", str(overlay))
    with pytest.raises(ImportFailed) as info:
        formats.inspect(formats.local_image(str(overlay), "qcow2"))
    assert info.value.reason == errors.BACKING_FILE


def test_inspect_runs_under_limits():
    assert formats.QEMU_LIMITS.address_space == 1 << 30 and formats.QEMU_LIMITS.cpu_seconds == 30
