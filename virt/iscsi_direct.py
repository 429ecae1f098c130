"""QEMU opening an iSCSI LUN itself (its libiscsi driver) instead of the node's block device.

The userspace node path (csi/iscsi_userspace.py) puts a qemu-storage-daemon, a FUSE file and
a loop device between the LUN and QEMU; QEMU's own `iscsi` block driver skips all three. It
is used only when the LUN's publish_context allows it: the `iscsi` backend says
`qemuDirect: "true"` there for volumes of a StorageClass with the parameter `qemuDirect:
"true"` (default: the node's block device). The choice shows in the VMI's
`status.volumeStatus[].access`: "iscsi-direct", else "block-device" (or "file").

The cost is the network: a QEMU with a direct iSCSI volume keeps its host's (node's) network
namespace, since libiscsi must reach the portal and cannot be handed a connected socket; every
other QEMU has a network namespace of its own with only a loopback (virt/qemu_sandbox.py). It
still runs as `nobody`, with no capabilities and the seccomp filter, so what it could reach is
what any unprivileged process of the node can.

The initiator name is the node's own (csi/iscsi_context.initiator_name: the one the
controller put in the target's ACL). A CHAP password never reaches QEMU's argv: it is written
to a 0600 file owned by the sandbox user, opened, unlinked at once, and QEMU inherits the open
file and reads it as a `secret` object from /proc/self/fd/N.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Mapping

from csi.errors import CsiError
from csi.iscsi_context import CHAP_SECRET, Chap, IscsiLun, chap_from, initiator_name, is_iscsi, parse_lun
from csi.validation import QEMU_DIRECT_KEY
from host.sandbox import sandbox_ids

ISCSI_DIRECT = "iscsi-direct"
BLOCK_DEVICE = "block-device"
FILE = "file"
URL = re.compile(r"iscsi://(?:(?P<user>[A-Za-z0-9][A-Za-z0-9._@-]{0,63})@)?(?P<portal>[^/]+)/(?P<target>[^/]+)"
                 r"/(?P<lun>\d{1,4})")


@dataclass(frozen=True)
class IscsiDisk:
    """One LUN QEMU logs in to: where it is, as whom, and (with CHAP) its password."""

    lun: IscsiLun
    initiator: str
    chap: Chap | None = None  # its repr hides the password
    secret_fd: int | None = None  # the open password file QEMU inherits (set by `hand_secrets`)

    @property
    def url(self) -> str:
        """The LUN as libiscsi names it (no password): what the status and `ps` show."""
        return f"iscsi://{self.lun.portal}/{self.lun.target}/{self.lun.lun}"


def allows_direct(publish_context: Mapping[str, str]) -> bool:
    """Does this publication let QEMU open the LUN itself?"""
    return is_iscsi(publish_context) and publish_context.get(QEMU_DIRECT_KEY) == "true"


def direct_disk(publish_context: Mapping[str, str], node_id: str, secrets: Mapping[str, str] | None = None) -> IscsiDisk:
    """The LUN of an iscsi publish_context, logged in to with the node's initiator name and,
    where the target asks for CHAP, the node-stage secret's credentials (as the node plugin
    would); every value matched a strict pattern (csi/iscsi_context.py), so it may reach QEMU's
    argv; ValueError names the key that did not (never a secret's value)."""
    try:
        lun = parse_lun(publish_context)
        return IscsiDisk(lun, initiator_name(node_id), chap_from(lun, secrets or {}))
    except CsiError as exc:
        raise ValueError(exc.message) from None


def parse_url(text: str, node_id: str, password: str | None = None) -> IscsiDisk:
    """`iscsi://[USER@]HOST:PORT/IQN/LUN` (a launcher's --volume) as a LUN to log in to;
    ValueError says what is wrong. A USER needs `password` (read from a file by the caller)."""
    found = URL.fullmatch(text)
    if not found:
        raise ValueError(f"{text[:80]!r} is not iscsi://[USER@]HOST:PORT/IQN/LUN")
    try:
        lun = parse_lun({"portal": found["portal"], "targetIQN": found["target"], "lun": found["lun"],
                         "chapUser": found["user"] or ""})
    except CsiError as exc:
        raise ValueError(f"{text[:80]!r}: {exc.message}") from None
    chap = None
    if lun.chap_user:
        if password is None:
            raise ValueError(f"{lun.describe()} names CHAP user {lun.chap_user}: give its password file")
        if not CHAP_SECRET.fullmatch(password):
            raise ValueError("the CHAP password must be 12-255 printable characters without spaces, quotes, "
                             "commas, '=', '$' or backslashes")
        chap = Chap(lun.chap_user, password)
    return IscsiDisk(lun, initiator_name(node_id), chap)


def secret_fd(password: str, directory: str) -> int:
    """An open, already unlinked 0600 file of the sandbox user holding `password`: QEMU (as
    that user) reads it through /proc/self/fd; nothing of it stays on disk or on an argv."""
    path = os.path.join(directory, f".chap-{os.getpid()}-{id(password):x}")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.unlink(path)
        os.write(fd, password.encode())
        os.lseek(fd, 0, os.SEEK_SET)
        os.fchown(fd, *sandbox_ids())
    except BaseException:
        os.close(fd)
        raise
    return fd
