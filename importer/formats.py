"""What an image is, decided by its content, and whether it is safe to convert.

Detection reads magic bytes only (never a file name). Before any conversion an image is
inspected with `qemu-img info --output=json` under CDI's resource limits; backing files,
external data files and external extents are refused because they would make qemu read
files of the host. Corruption and truncation are caught by `qemu-img check` (or, for VHD,
which has no check, by comparing `qemu-img map` offsets with the file's length).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Sequence

from pvlun.command import CommandError, Limits, run

from . import errors
from .errors import ImportFailed

HEAD_SIZE = 64 * 1024  # enough for every magic we look at (ISO's CD001 sits at 0x8001)

COMPRESSIONS = ("gzip", "xz", "zstd")
IMAGE_FORMATS = ("qcow2", "vmdk", "vdi", "vhd", "vhdx")  # need qemu-img convert
RAW_FORMATS = ("raw", "iso")  # streamed as they are
QEMU_LIMITS = Limits(address_space=1 << 30, cpu_seconds=30)  # CDI's limits for qemu-img info

_QEMU_DRIVER = {"qcow2": "qcow2", "vmdk": "vmdk", "vdi": "vdi", "vhd": "vpc", "vhdx": "vhdx", "raw": "raw", "iso": "raw"}
_CHECKABLE = ("qcow2", "vdi", "vhdx", "vmdk")


def detect(head: bytes, tail: bytes = b"") -> str:
    """Name the format of a stream from its first bytes (and, for fixed VHD, its last 512)."""
    if head[:4] == b"QFI\xfb":
        return "qcow2"
    if head[:4] == b"KDMV" or head[:4] == b"COWD" or head.startswith(b"# Disk DescriptorFile"):
        return "vmdk"
    if len(head) >= 0x44 and struct.unpack_from("<I", head, 0x40)[0] == 0xBEDA107F:
        return "vdi"
    if head[:8] == b"conectix":
        return "vhd"
    if head[:8] == b"vhdxfile":
        return "vhdx"
    if head[:2] == b"\x1f\x8b":
        return "gzip"
    if head[:6] == b"\xfd7zXZ\x00":
        return "xz"
    if head[:4] == b"\x28\xb5\x2f\xfd":
        return "zstd"
    if head[257:262] == b"ustar":
        return "tar"
    if head[0x8001:0x8006] == b"CD001":
        return "iso"
    if len(tail) >= 512 and tail[-512:-504] == b"conectix":
        return "vhd"  # fixed VHD: raw data followed by a footer
    return "raw"


def qemu_driver(fmt: str) -> str:
    return _QEMU_DRIVER[fmt]


@dataclass(frozen=True)
class ImageInfo:
    format: str
    virtual_size: int
    actual_size: int | None


def precheck_header(fmt: str, head: bytes) -> None:
    """Refuse dangerous headers before qemu opens the image at all (qemu would open a data-file)."""
    if fmt == "qcow2" and len(head) >= 104:
        backing_offset = struct.unpack_from(">Q", head, 8)[0]
        version = struct.unpack_from(">I", head, 4)[0]
        cluster_bits = struct.unpack_from(">I", head, 20)[0]
        if version not in (2, 3) or not 9 <= cluster_bits <= 21:
            raise ImportFailed(errors.INVALID_IMAGE, f"not a valid qcow2 header (version {version}, cluster bits {cluster_bits})")
        if backing_offset:
            raise ImportFailed(errors.BACKING_FILE, "the qcow2 image names a backing file; only self-contained images are accepted")
        if version >= 3:
            incompatible = struct.unpack_from(">Q", head, 72)[0]
            if incompatible & 0x4:
                raise ImportFailed(errors.DATA_FILE, "the qcow2 image uses an external data file; only self-contained images are accepted")
    if fmt == "vmdk" and head.startswith(b"# Disk DescriptorFile"):
        raise ImportFailed(errors.BACKING_FILE, "a VMDK descriptor file refers to external extent files; upload a monolithic VMDK")


def _qemu_img(args: Sequence[str], what: str) -> str:
    try:
        return run(["qemu-img", *args], limits=QEMU_LIMITS, timeout=120).stdout.decode()
    except CommandError as exc:
        raise ImportFailed(errors.INVALID_IMAGE, f"{what} failed: {errors.tool_text(exc.stderr)}") from None


def inspect(source: str, fmt: str, *, objects: Sequence[str] = (), file_size: int | None = None) -> ImageInfo:
    """`qemu-img info` under limits; refuse backing files, data files and external extents.

    `source` is a local path or a `json:{...}` block spec; `objects` are `--object` values
    (secrets for HTTP authentication).
    """
    args = ["info", "--output=json"]
    for obj in objects:
        args += ["--object", obj]
    if not source.startswith("json:"):
        args += ["-f", qemu_driver(fmt)]
    info = json.loads(_qemu_img([*args, source], "qemu-img info"))
    if info.get("backing-filename") or info.get("full-backing-filename"):
        raise ImportFailed(errors.BACKING_FILE, "the image names a backing file; only self-contained images are accepted")
    specific = (info.get("format-specific") or {}).get("data") or {}
    if specific.get("data-file"):
        raise ImportFailed(errors.DATA_FILE, "the qcow2 image uses an external data file; only self-contained images are accepted")
    if len(specific.get("extents") or []) > 1:
        raise ImportFailed(errors.BACKING_FILE, "the VMDK image spans several extent files; only monolithic images are accepted")
    size = int(info.get("virtual-size") or 0)
    if size <= 0:
        raise ImportFailed(errors.INVALID_IMAGE, f"qemu-img reports no virtual size for this {fmt} image")
    return ImageInfo(fmt, size, info.get("actual-size"))


def verify_integrity(source: str, fmt: str, *, objects: Sequence[str] = (), file_size: int | None = None) -> None:
    """Catch truncated and corrupt images, which qemu would otherwise read as zeros."""
    opts: list[str] = []
    for obj in objects:
        opts += ["--object", obj]
    fmt_args = [] if source.startswith("json:") else ["-f", qemu_driver(fmt)]
    if fmt in _CHECKABLE:
        try:
            run(["qemu-img", "check", *opts, *fmt_args, source], limits=QEMU_LIMITS, timeout=300)
        except CommandError as exc:
            if exc.returncode == 3:  # leaked clusters only: harmless for reading
                return
            raise ImportFailed(
                errors.INVALID_IMAGE, f"the {fmt} image is corrupt or truncated: {errors.tool_text(exc.stderr or str(exc))}"
            ) from None
    elif fmt == "vhd" and file_size is not None:
        extents = json.loads(_qemu_img(["map", "--output=json", *opts, *fmt_args, source], "qemu-img map"))
        for ext in extents:
            if ext.get("data") and "offset" in ext and ext["offset"] + ext["length"] > file_size:
                raise ImportFailed(
                    errors.INVALID_IMAGE,
                    f"the vhd image is truncated: data at offset {ext['offset']} lies past its end ({file_size} bytes)",
                )
