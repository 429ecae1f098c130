"""Request checks for the node service, in the order the CSI spec and csi-sanity expect.

Nothing from a request reaches the disk before it passes here: IDs match a strict
pattern, paths are absolute, normalised and free of NUL and `..`. Failures raise
`csi.errors.CsiError`, which carries the gRPC status code the caller must see. The
helpers are plain functions of protobuf messages, so the controller can share them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from csi.errors import invalid, not_found, shown
from csi.filesystems import SUPPORTED_FILESYSTEMS
from csi.proto import csi_pb2
from csi.node_paths import first_symlink
from csi.validation import VOLUME_ID, check_mount_flags

MAX_PATH = 4096

_Mode = csi_pb2.VolumeCapability.AccessMode.Mode
READ_ONLY_MODES = frozenset({_Mode.SINGLE_NODE_READER_ONLY, _Mode.MULTI_NODE_READER_ONLY})
MULTI_NODE_WRITE_MODES = frozenset({_Mode.MULTI_NODE_SINGLE_WRITER, _Mode.MULTI_NODE_MULTI_WRITER})


def require(value: object, field: str) -> None:
    """A missing required field is INVALID_ARGUMENT (checked before anything else)."""
    if not value:
        raise invalid(f"{field} is required")


def check_volume_id(volume_id: str) -> None:
    """A well-formed request naming a volume that cannot exist: NOT_FOUND."""
    if not VOLUME_ID.fullmatch(volume_id):
        raise not_found(f"volume {shown(volume_id)} does not exist (volume IDs look like vol-<32 hex>)")


def path_problem(path: str) -> str | None:
    """Why a path from a request is unacceptable, None if it is fine."""
    if "\x00" in path:
        return "contains NUL"
    if not path.isprintable():
        return "contains control characters"
    if len(path) > MAX_PATH:
        return "is too long"
    if not os.path.isabs(path):
        return "is not absolute"
    if ".." in path.split("/"):
        return "contains '..'"
    return None


def check_path(path: str, field: str) -> str:
    """An absolute clean path, normalised (no trailing slash, no `//`), with no symbolic
    link in it: mount(8) and the kernel follow links, so a link in a staging or target path
    (or any of its parents) would put a volume, or take one away, somewhere the caller did
    not name. The node's mounts then go through descriptors opened without following links
    (csi/node_paths.py), so a link swapped in after this check is not followed either."""
    problem = path_problem(path)
    if problem:
        raise invalid(f"{field} {shown(path)} {problem}")
    path = os.path.normpath(path)
    link = first_symlink(path)
    if link:
        raise invalid(f"{field} {shown(path)} goes through a symbolic link ({shown(link)}); "
                      "give the path it stands for")
    return path


def check_volume_path(path: str, volume_id: str) -> str:
    """A path naming where a volume is (stats, expand): a path that cannot hold it is
    NOT_FOUND, as csi-sanity expects for "some/path"."""
    if path_problem(path):
        raise not_found(f"volume {volume_id} is not staged or published at {shown(path)}")
    path = os.path.normpath(path)
    if first_symlink(path):
        raise invalid(f"volume_path {shown(path)} goes through a symbolic link; give the path it stands for")
    return path


@dataclass(frozen=True)
class Access:
    """What a VolumeCapability asks of the node."""

    block: bool
    fs_type: str  # as requested: "" when unspecified (ext4 for a blank volume) and for block
    mount_flags: tuple[str, ...]
    mode: int
    read_only_mode: bool


def check_capability(cap: csi_pb2.VolumeCapability, field: str = "volume_capability") -> Access:
    if not cap.HasField("access_mode") or cap.access_mode.mode == _Mode.UNKNOWN:
        raise invalid(f"{field}.access_mode is required")
    mode = cap.access_mode.mode
    if mode not in _Mode.values():
        raise invalid(f"{field}.access_mode {mode} is unknown")
    which = cap.WhichOneof("access_type")
    if which is None:
        raise invalid(f"{field} needs an access type: block or mount")
    if which == "block":
        return Access(True, "", (), mode, mode in READ_ONLY_MODES)
    if mode in MULTI_NODE_WRITE_MODES:
        raise invalid(f"access mode {_Mode.Name(mode)} needs block access: a filesystem mounted on "
                      "several nodes while one writes would be corrupted; use volumeMode: Block "
                      "(as live migration does)")
    fs_type = cap.mount.fs_type
    if fs_type and fs_type not in SUPPORTED_FILESYSTEMS:
        raise invalid(f"fs_type {shown(fs_type)} is not supported (supported: {', '.join(SUPPORTED_FILESYSTEMS)})")
    if cap.mount.volume_mount_group:
        raise invalid("volume_mount_group is not supported by this driver")
    flags = check_mount_flags(cap.mount.mount_flags)
    return Access(False, fs_type, flags, mode, mode in READ_ONLY_MODES)


LUN_SUFFIX = ".img"


def lun_files(volume_id: str, volumes_dirs) -> tuple[str, ...]:
    """The only places volume_id's LUN can be: <realpath of a pool volumes dir>/<volume_id>.img.
    Call with a validated volume_id only."""
    return tuple(dict.fromkeys(os.path.join(os.path.realpath(d), volume_id + LUN_SUFFIX)
                               for d in volumes_dirs))


def lun_path(publish_context: dict, volume_context: dict, volume_id: str, volumes_dirs=()) -> str:
    """Where the LUN file is: publish_context["lunPath"] (from ControllerPublishVolume),
    else volume_context["lunPath"]. Its real path must be exactly this volume's LUN file in
    one of the pool's volumes dirs, which is what is returned; anything else (a file
    elsewhere, a symlink out of the pool, another volume's LUN) is INVALID_ARGUMENT.
    With no pool volumes dir configured nothing is accepted."""
    path = publish_context.get("lunPath") or volume_context.get("lunPath")
    if not path:
        raise invalid("publish_context has no lunPath: was the volume published with ControllerPublishVolume?")
    problem = path_problem(path)
    if problem:
        raise invalid(f"lunPath {problem}")
    real = os.path.realpath(path)
    if real not in lun_files(volume_id, volumes_dirs):
        # not echoed: it names a place in (or near) the daemon's pool
        raise invalid(f"lunPath is not the LUN of volume {volume_id} in this node's pool")
    return real
