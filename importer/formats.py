"""What an image is, decided by its content, and whether it is safe to convert.

Detection reads magic bytes only (never a file name). Before any conversion an image is
inspected with `qemu-img info --output=json` under CDI's resource limits, opened as one
`ImageNode` (its format over one file node, backing chain cut off); `references` refuses
whatever it names besides its own file. Corruption and truncation are caught by
`qemu-img check` (or, for VHD, which has no check, by comparing `qemu-img map` offsets with
the file's length). Every qemu-img run here is sandboxed: it sees only the node's own paths.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from typing import Sequence

from host.command import CommandError, Limits, run
from host.sandbox import TOOLS_ONLY, Sandbox

from . import errors, references, transfer_watch
from .errors import ImportFailed

HEAD_SIZE = 64 * 1024  # enough for every magic we look at (ISO's CD001 sits at 0x8001)

COMPRESSIONS = ("gzip", "xz", "zstd")
IMAGE_FORMATS = ("qcow2", "vmdk", "vdi", "vhd", "vhdx")  # need qemu-img convert
# read by qemu in place when the source allows it (sources.nbd pins what the checks read). VMDK
# goes through scratch: a local copy nobody can change under the conversion, and faster too —
# its stream-optimized grains are unaligned reads that the pinning cache fetches twice
# (measured from nginx: 2100 MiB virtual, 512 MiB data: 2.0-2.5 s via scratch, 2.6-3.3 s in place
# unpinned, 5.5-6.1 s in place pinned).
IN_PLACE_FORMATS = ("qcow2", "vdi", "vhd", "vhdx")
RAW_FORMATS = ("raw", "iso")  # streamed as they are
QEMU_LIMITS = Limits(address_space=1 << 30, cpu_seconds=30)  # CDI's limits for qemu-img info

_QEMU_DRIVER = {"qcow2": "qcow2", "vmdk": "vmdk", "vdi": "vdi", "vhd": "vpc", "vhdx": "vhdx", "raw": "raw", "iso": "raw"}
_CHECKABLE = ("qcow2", "vdi", "vhdx", "vmdk")


VHD_FOOTER = 512
_VHD_FIXED = 2
_VHD_DIFFERENCING = 4
_VDI_TYPES = {1: "dynamic", 2: "static"}
_VDI_DIFF = 4


def fixed_vhd_size(footer: bytes) -> int | None:
    """The disk size a fixed VHD's footer declares, if these are the 512 bytes of one
    (cookie, checksum, disk type 2, no dynamic header); else None."""
    if len(footer) != VHD_FOOTER or footer[:8] != b"conectix":
        return None
    checksum = struct.unpack_from(">I", footer, 64)[0]
    if ~(sum(footer[:64]) + sum(footer[68:])) & 0xFFFFFFFF != checksum:
        return None
    if struct.unpack_from(">I", footer, 60)[0] != _VHD_FIXED or struct.unpack_from(">Q", footer, 16)[0] != (1 << 64) - 1:
        return None
    return struct.unpack_from(">Q", footer, 48)[0]


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
    if fixed_vhd_size(tail[-VHD_FOOTER:]) is not None:
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
    # differencing VHD/VDI: qemu opens them without their parent (garbage), and info does not say so
    if fmt == "vhd" and len(head) >= 64 and struct.unpack_from(">I", head, 60)[0] == _VHD_DIFFERENCING:
        raise ImportFailed(errors.BACKING_FILE, "the VHD is a differencing disk that needs its parent image; "
                                                "only self-contained images are accepted")
    if fmt == "vdi" and len(head) >= 0x50:
        kind = struct.unpack_from("<I", head, 0x4C)[0]
        if kind == _VDI_DIFF:
            raise ImportFailed(errors.BACKING_FILE, "the VDI is a differencing image that needs its parent image; "
                                                    "only self-contained images are accepted")
        if kind not in _VDI_TYPES:
            raise ImportFailed(errors.INVALID_IMAGE, f"not a valid VDI header (image type {kind})")


IMAGE = "<image>"  # how messages name the image qemu was handed


@dataclass(frozen=True)
class ImageNode:
    """An image as qemu opens it: its format over one file node (a local file, an nbd socket),
    its backing chain cut off whatever the header says, and the host paths that file node
    needs inside the sandbox (the file itself, or the socket's directory)."""

    fmt: str
    file: dict
    read_only: tuple[str, ...] = ()
    writable: tuple[str, ...] = ()
    objects: tuple[str, ...] = ()  # qemu-img `--object` values (secrets)

    @property
    def spec(self) -> str:
        return "json:" + json.dumps({"driver": qemu_driver(self.fmt), "backing": None, "file": self.file})

    @property
    def file_name(self) -> str:
        """How qemu names the file node (in `qemu-img info` and its errors): a path, an nbd URI."""
        if self.file.get("driver") == "nbd":
            return f"nbd+unix://?socket={self.file['server']['path']}"
        return str(self.file.get("filename", ""))

    def tool_text(self, stderr: str) -> str:
        """qemu's words about this image for a person, without the daemon's paths: the spec and
        the file node read IMAGE, names beside the image are shown relative to it."""
        text = stderr.replace(self.spec, IMAGE).replace(self.file_name, IMAGE)
        where = os.path.dirname(str(self.file.get("filename") or (self.file.get("server") or {}).get("path") or ""))
        if len(where) > 1:
            text = text.replace(where + "/", "")
        return errors.tool_text(text)

    def object_args(self) -> list[str]:
        return [arg for obj in self.objects for arg in ("--object", obj)]

    def sandbox(self, *, writable: Sequence[str] = (), devices: Sequence[str] = (), limits: Limits | None = None) -> Sandbox:
        """A sandbox holding this node's paths (plus a conversion's target), and of /usr only the
        tools and their libraries: no public file an image's metadata could name."""
        return Sandbox(read_only=self.read_only, writable=(*self.writable, *writable), devices=devices, limits=limits,
                       system=TOOLS_ONLY)


def local_image(path: str, fmt: str) -> ImageNode:
    """A local file (scratch copy, `file://` source) as an image node."""
    return ImageNode(fmt, {"driver": "file", "filename": path}, read_only=(path,))


def _qemu_img(node: ImageNode, args: Sequence[str], timeout: float = 120) -> str:
    if node.file.get("driver") == "nbd":  # a read in place may wait nbdkit's curl timeout, the stall timeout
        timeout = max(timeout, transfer_watch.stall_seconds() + 60)  # then fails: nbdkit's log says why
    with node.sandbox(limits=QEMU_LIMITS) as box:
        return run(box.wrap(["qemu-img", *args, *node.object_args(), node.spec]), timeout=timeout).stdout.decode()


def inspect(node: ImageNode) -> ImageInfo:
    """`qemu-img info` under limits, in a sandbox; refuse anything the image names besides itself."""
    try:
        info = json.loads(_qemu_img(node, ["info", "--output=json"]))
    except CommandError as exc:
        text = node.tool_text(exc.stderr)
        references.refuse_failed_open(text, IMAGE, IMAGE)
        raise ImportFailed(errors.INVALID_IMAGE, f"qemu-img info failed: {text}") from None
    references.refuse_references(info)
    size = int(info.get("virtual-size") or 0)
    if size <= 0:
        raise ImportFailed(errors.INVALID_IMAGE, f"qemu-img reports no virtual size for this {node.fmt} image")
    return ImageInfo(node.fmt, size, info.get("actual-size"))


def verify_integrity(node: ImageNode, *, file_size: int | None = None) -> None:
    """Catch truncated and corrupt images, which qemu would otherwise read as zeros."""
    fmt = node.fmt
    if fmt in _CHECKABLE:
        try:
            _qemu_img(node, ["check"], timeout=300)
        except CommandError as exc:
            if exc.returncode == 3:  # leaked clusters only: harmless for reading
                return
            raise ImportFailed(
                errors.INVALID_IMAGE, f"the {fmt} image is corrupt or truncated: {node.tool_text(exc.stderr or str(exc))}"
            ) from None
    elif fmt == "vhd" and file_size is not None:
        try:
            extents = json.loads(_qemu_img(node, ["map", "--output=json"]))
        except CommandError as exc:
            raise ImportFailed(errors.INVALID_IMAGE, f"qemu-img map failed: {node.tool_text(exc.stderr)}") from None
        for ext in extents:
            if ext.get("data") and "offset" in ext and ext["offset"] + ext["length"] > file_size:
                raise ImportFailed(
                    errors.INVALID_IMAGE,
                    f"the vhd image is truncated: data at offset {ext['offset']} lies past its end ({file_size} bytes)",
                )
