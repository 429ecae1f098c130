"""The kernel initiator path of the iscsi backend, for hosts that have one (open-iscsi's
`iscsiadm` and a loadable `iscsi_tcp`): which path a host takes, and the iscsiadm command
lines, as pure functions. These machines have no kernel initiator, so the node stages through
csi/iscsi_userspace.py; a host with one would, behind the same NodeService calls:

  stage:   discovery_argv (sendtargets at the portal), login_argv, then wait for
           by_path_device(lun) — udev's /dev/disk/by-path/ip-PORTAL-iscsi-IQN-lun-N — and
           stage that device (no loop device); with several portals of one target,
           dm-multipath joins the paths and /dev/disk/by-id/dm-uuid-mpath-<WWID> is staged
           instead (multipath_device), so names stay stable across path failures.
  expand:  rescan_argv, then grow the filesystem.
  unstage: logout_argv once no staging of the target is left, delete_record_argv.
CHAP: iscsiadm takes node settings only as `-o update -n KEY -v VALUE`, which would put the
password on an argv; the password would have to be written into the node record file
(/etc/iscsi/nodes/IQN/PORTAL,TPGT/default) by the driver itself, so chap_update_argvs sets
only the method and user name.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

from csi.iscsi_context import IscsiLun

KERNEL = "kernel"
USERSPACE = "userspace"
INITIATOR_NAME_FILE = "/etc/iscsi/initiatorname.iscsi"


@dataclass(frozen=True)
class HostFacts:
    """What decides the path: the tool, the transport module, the host's initiator name."""

    iscsiadm: bool
    iscsi_tcp_loaded: bool
    iscsi_tcp_available: bool  # a module file modprobe could load
    initiator_name_file: bool


def probe_host(root: str = "/") -> HostFacts:
    """Read the facts from this host (no module is loaded, nothing is changed)."""
    release = os.uname().release
    modules = os.path.join(root, "lib/modules", release, "kernel/drivers/scsi")
    return HostFacts(
        iscsiadm=shutil.which("iscsiadm") is not None,
        iscsi_tcp_loaded=os.path.isdir(os.path.join(root, "sys/module/iscsi_tcp")),
        iscsi_tcp_available=any(os.path.exists(os.path.join(modules, "iscsi_tcp.ko" + ext))
                                for ext in ("", ".xz", ".zst", ".gz")),
        initiator_name_file=os.path.isfile(os.path.join(root, INITIATOR_NAME_FILE.lstrip("/"))),
    )


def choose_path(facts: HostFacts) -> str:
    """KERNEL when the host can log in with its own initiator, else USERSPACE."""
    usable = facts.iscsiadm and (facts.iscsi_tcp_loaded or facts.iscsi_tcp_available)
    return KERNEL if usable and facts.initiator_name_file else USERSPACE


def _node(lun: IscsiLun) -> list[str]:
    return ["iscsiadm", "--mode", "node", "--targetname", lun.target, "--portal", lun.portal]


def discovery_argv(portal: str) -> list[str]:
    return ["iscsiadm", "--mode", "discovery", "--type", "sendtargets", "--portal", portal]


def login_argv(lun: IscsiLun) -> list[str]:
    return _node(lun) + ["--login"]


def logout_argv(lun: IscsiLun) -> list[str]:
    return _node(lun) + ["--logout"]


def rescan_argv(lun: IscsiLun) -> list[str]:
    return _node(lun) + ["--rescan"]


def delete_record_argv(lun: IscsiLun) -> list[str]:
    return _node(lun) + ["--op", "delete"]


def chap_update_argvs(lun: IscsiLun, user: str) -> list[list[str]]:
    """Set CHAP and the user name on the node record; the password is not set here (see above)."""
    update = _node(lun) + ["--op", "update", "--name"]
    return [update + ["node.session.auth.authmethod", "--value", "CHAP"],
            update + ["node.session.auth.username", "--value", user]]


def by_path_device(lun: IscsiLun) -> str:
    """udev's persistent name of the LUN's device (IPv6 portals keep their brackets)."""
    return f"/dev/disk/by-path/ip-{lun.portal}-iscsi-{lun.target}-lun-{lun.lun}"


def multipath_device(wwid: str) -> str:
    """dm-multipath's name for the device joining every path of a LUN with this WWID."""
    return f"/dev/disk/by-id/dm-uuid-mpath-{wwid}"
