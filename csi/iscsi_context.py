"""What a node needs to reach an iSCSI LUN, read from a NodeStageVolume request.

ControllerPublishVolume of the `iscsi` backend returns, in publish_context:
  backend: "iscsi", portal: "HOST:PORT", targetIQN: "iqn....", lun: "<n>", volumeID: the
  volume the LUN holds (a context of another volume is refused, as a lunPath of another volume
  is on the file backend), and chapUser when the target asks for CHAP.
The CHAP password comes only from NodeStageVolume's `secrets` (the node-stage secret), under
the names Kubernetes' iSCSI volumes use: node.session.auth.username / .password. It is never
logged, never put on an argv and never shown in an error.

Every value reaches an argv (qemu-storage-daemon's --blockdev, iscsiadm) or a path, so each
must match a strict pattern first; a bad one is INVALID_ARGUMENT naming the key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

from csi.errors import invalid, precondition, shown

BACKEND_KEY = "backend"
BACKEND = "iscsi"
PORTAL_KEY = "portal"
TARGET_KEY = "targetIQN"
LUN_KEY = "lun"
VOLUME_KEY = "volumeID"
CHAP_USER_KEY = "chapUser"
SECRET_USER = "node.session.auth.username"
SECRET_PASSWORD = "node.session.auth.password"

# RFC 3720 3.2.6.3.1 names, restricted to what tgt and libiscsi take unquoted (the same
# rules the target side applies when it makes targets and ACLs).
IQN = re.compile(r"iqn\.[0-9]{4}-(0[1-9]|1[0-2])\.[a-z0-9]([a-z0-9.-]{0,62}[a-z0-9])?(:[a-z0-9][a-z0-9.:_-]{0,150})?")
PORTAL = re.compile(r"(?P<host>\d{1,3}(\.\d{1,3}){3}|\[[0-9a-fA-F:]+\]):(?P<port>\d{1,5})")
CHAP_USER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
CHAP_SECRET = re.compile(r"[A-Za-z0-9!#%&()*+./:;<>?@\[\]^_{|}~-]{12,255}")
MAX_LUN = 1023
# The node's initiator name when the host has none configured: this prefix and the node ID.


@dataclass(frozen=True)
class IscsiLun:
    """Where one LUN is: portal, target and LUN number, and the CHAP user if any."""

    portal: str  # HOST:PORT, HOST an IPv4 address or a bracketed IPv6 one
    target: str  # the target's IQN
    lun: int
    chap_user: str = ""

    @property
    def host(self) -> str:
        return self.portal.rsplit(":", 1)[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.portal.rsplit(":", 1)[1])

    def describe(self) -> str:
        return f"LUN {self.lun} of target {self.target} at {self.portal}"


def is_iscsi(publish_context: Mapping[str, str]) -> bool:
    return publish_context.get(BACKEND_KEY) == BACKEND


def check_iqn(value: str, what: str) -> str:
    if len(value) > 223 or not IQN.fullmatch(value):
        raise invalid(f"{what} {shown(value)} is not an iSCSI qualified name (iqn.YYYY-MM.domain:name, lowercase)")
    return value


def parse_lun(publish_context: Mapping[str, str], volume_id: str = "") -> IscsiLun:
    """The LUN publish_context names; INVALID_ARGUMENT naming the key that is wrong (volumeID,
    when given and not `volume_id`: staging one volume from another's LUN would hand out the
    wrong disk)."""
    named = publish_context.get(VOLUME_KEY, "")
    if named and volume_id and named != volume_id:
        raise invalid(f"publish_context {VOLUME_KEY} {shown(named)} is another volume's LUN, not volume {volume_id}'s: "
                      "use the publish_context ControllerPublishVolume returned for this volume")
    portal = publish_context.get(PORTAL_KEY, "")
    found = PORTAL.fullmatch(portal)
    if not found or not 0 < int(found.group("port")) < 65536:
        raise invalid(f"publish_context {PORTAL_KEY} {shown(portal)} is not HOST:PORT (an IP address and a port)")
    target = check_iqn(publish_context.get(TARGET_KEY, ""), f"publish_context {TARGET_KEY}")
    lun = publish_context.get(LUN_KEY, "")
    if not lun.isdigit() or len(lun) > 4 or int(lun) > MAX_LUN:
        raise invalid(f"publish_context {LUN_KEY} {shown(lun)} is not a LUN number (0-{MAX_LUN})")
    user = publish_context.get(CHAP_USER_KEY, "")
    if user and not CHAP_USER.fullmatch(user):
        raise invalid(f"publish_context {CHAP_USER_KEY} is not a CHAP user name (1-64 letters, digits, '.', '_', '@', '-')")
    return IscsiLun(portal, target, int(lun), user)


@dataclass(frozen=True)
class Chap:
    user: str
    password: str

    def __repr__(self) -> str:  # never the password, whatever prints this
        return f"Chap(user={self.user!r}, password=<hidden>)"


def chap_from(lun: IscsiLun, secrets: Mapping[str, str]) -> Chap | None:
    """The CHAP credentials to log in with: the user from publish_context (else the
    secret's), the password from the node-stage secret. None when neither asks for CHAP.
    Errors name the secret's keys, never its values."""
    user = lun.chap_user or secrets.get(SECRET_USER, "")
    password = secrets.get(SECRET_PASSWORD, "")
    if not user and not password:
        return None
    if not password:
        raise precondition(f"{lun.describe()} needs CHAP user {user}: the node-stage secret has no "
                           f"{SECRET_PASSWORD} (set csi.storage.k8s.io/node-stage-secret-name on the StorageClass)")
    if not CHAP_USER.fullmatch(user):
        raise invalid(f"the node-stage secret's {SECRET_USER} is missing or not a CHAP user name")
    if not CHAP_SECRET.fullmatch(password):
        raise invalid(f"the node-stage secret's {SECRET_PASSWORD} must be 12-255 printable characters "
                      "without spaces, quotes, commas, '=', '$' or backslashes")
    return Chap(user, password)


def initiator_name(node_id: str) -> str:
    """The userspace initiator's name for a node: the one the controller puts in the target's
    ACL (csi/lun_slots.py), made from the node ID alone, so nothing is shared with the node
    (several nodes of one host each have their own, which a host-wide
    /etc/iscsi/initiatorname.iscsi could not give)."""
    from csi.lun_slots import initiator_for_node

    return check_iqn(initiator_for_node(node_id), "initiator name")
