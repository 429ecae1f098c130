"""Hostile images, built at test time with qemu-img and a few patched bytes (for the
test_hostile_* modules); `checks_off` leaves only the sandbox between an image and the host."""

from __future__ import annotations

import struct
import subprocess
import uuid
from pathlib import Path

import pytest

from importer import formats, references
from importer_support import qemu_img


@pytest.fixture
def checks_off(monkeypatch):
    """Every check of image metadata and integrity switched off: only the sandbox is left."""
    monkeypatch.setattr(formats, "precheck_header", lambda fmt, head: None)
    monkeypatch.setattr(references, "refuse_references", lambda info: None)
    monkeypatch.setattr(references, "refuse_failed_open", lambda stderr, spec, own: None)
    monkeypatch.setattr(formats, "verify_integrity", lambda node, file_size=None: None)


def vmdk_text(path: Path, create_type: str, extents: list[str]) -> None:
    """A VMDK text descriptor: qemu opens the extent files it lists."""
    path.write_text(f'# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType="{create_type}"\n\n'
                    "# Extent description\n" + "\n".join(extents) + '\n\n# The Disk Data Base\n#DDB\nddb.adapterType = "ide"\n')


def vmdk_embedded(path: Path, subformat: str, create_type: str, extents: list[str], *, capacity_zero: bool = True,
                  parent: str | None = None) -> None:
    """A sparse (KDMV) VMDK whose embedded descriptor is patched: with capacity 0 in its header
    qemu treats that descriptor as a descriptor file and opens its extents."""
    qemu_img("create", "-f", "vmdk", "-o", f"subformat={subformat}", str(path), "1M")
    path.write_bytes(vmdk_patched(path.read_bytes(), create_type, extents, capacity_zero=capacity_zero, parent=parent))


def vmdk_patched(image: bytes, create_type: str, extents: list[str], *, capacity_zero: bool = True,
                 parent: str | None = None) -> bytes:
    """The same sparse VMDK, same length, with its embedded descriptor's createType and extent
    lines replaced (and, with `capacity_zero`, read as a descriptor file that opens them)."""
    data = bytearray(image)
    desc_sector, desc_sectors = struct.unpack_from("<QQ", data, 28)
    lines = []
    for line in bytes(data[desc_sector * 512:(desc_sector + desc_sectors) * 512]).rstrip(b"\0").decode().splitlines():
        if line.startswith("createType="):
            line = f'createType="{create_type}"'
        elif line.startswith("RW "):
            if not extents:
                continue
            line = "\n".join(extents)
        elif line.startswith("parentCID=") and parent:
            line = f'parentCID=12345678\nparentFileNameHint="{parent}"'
        lines.append(line)
    text = ("\n".join(lines) + "\n").encode()
    assert len(text) <= desc_sectors * 512
    data[desc_sector * 512:(desc_sector + desc_sectors) * 512] = text.ljust(desc_sectors * 512, b"\0")
    if capacity_zero:
        struct.pack_into("<Q", data, 12, 0)
    return bytes(data)


def qcow2_data_file(path: Path, name: str, work: Path) -> None:
    """A qcow2 whose clusters live in an external raw data file named `name` (any spelling):
    made with a placeholder of the same length, whose name is then replaced in the header."""
    placeholder = "d" * len(name)
    subprocess.run(["qemu-img", "create", "-f", "qcow2", "-o",
                    f"data_file={placeholder},data_file_raw=on,preallocation=metadata", str(path), "1M"],
                   check=True, capture_output=True, cwd=work)
    data = path.read_bytes()
    assert data.count(placeholder.encode()) == 1
    path.write_bytes(data.replace(placeholder.encode(), name.encode()))


def vhd_checksum(footer: bytearray) -> None:
    struct.pack_into(">I", footer, 64, 0)
    struct.pack_into(">I", footer, 64, ~sum(footer) & 0xFFFFFFFF)


def vhd_differencing(path: Path) -> None:
    qemu_img("create", "-f", "vpc", str(path), "1M")
    data = bytearray(path.read_bytes())
    for at in (0, len(data) - 512):
        footer = data[at:at + 512]
        struct.pack_into(">I", footer, 60, 4)
        vhd_checksum(footer)
        data[at:at + 512] = footer
    path.write_bytes(data)


def vdi_differencing(path: Path) -> None:
    qemu_img("create", "-f", "vdi", str(path), "1M")
    data = bytearray(path.read_bytes())
    struct.pack_into("<I", data, 0x4C, 4)
    path.write_bytes(data)


def vhdx_with_parent(path: Path) -> None:
    """Set HasParent in the VHDX file parameters (region table -> metadata table -> item)."""
    qemu_img("create", "-f", "vhdx", str(path), "1M")
    data = bytearray(path.read_bytes())
    metadata, parameters = (uuid.UUID(u).bytes_le for u in ("8B7CA206-4790-4B9A-B8FE-575F050F886E",
                                                             "CAA16737-FA36-4D43-B3B6-33F0AA44E76B"))
    table = 0x30000
    entries = [table + 16 + 32 * i for i in range(struct.unpack_from("<I", data, table + 8)[0])]
    region = next(struct.unpack_from("<Q", data, e + 16)[0] for e in entries if data[e:e + 16] == metadata)
    items = [region + 32 + 32 * i for i in range(struct.unpack_from("<H", data, region + 10)[0])]
    item = region + next(struct.unpack_from("<I", data, e + 16)[0] for e in items if data[e:e + 16] == parameters)
    struct.pack_into("<I", data, item + 4, struct.unpack_from("<I", data, item + 4)[0] | 2)
    path.write_bytes(data)


def fixed_vhd(raw: Path, out: Path) -> None:
    qemu_img("convert", "-f", "raw", "-O", "vpc", "-o", "subformat=fixed,force_size=on", str(raw), str(out))
