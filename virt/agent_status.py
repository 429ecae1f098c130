"""The guest agent in a VMI's status, as KubeVirt reports it.

KubeVirt's virt-handler adds the condition `AgentConnected` (status True) while the guest agent
is connected and removes it when it is gone (a VMI without an agent has no such condition),
and fills `status.guestOSInfo` from guest-get-osinfo (id, kernelRelease, kernelVersion,
machine, name, prettyName, version, versionId). The OS info is the guest's own words: only
strings are kept, each printable and bounded.
"""

from __future__ import annotations

from typing import Any

from controlplane.context import Context
from controlplane.store import set_condition

AGENT_CONNECTED = "AgentConnected"
_OS_FIELDS = {"id": "id", "kernel-release": "kernelRelease", "kernel-version": "kernelVersion",
              "machine": "machine", "name": "name", "pretty-name": "prettyName", "version": "version",
              "version-id": "versionId"}
_TEXT_LIMIT = 256


def _text(value: Any) -> str | None:
    if not isinstance(value, str) or not value:
        return None
    value = "".join(c if c.isprintable() else "?" for c in value)
    return value[:_TEXT_LIMIT]


def guest_os_info(osinfo: Any) -> dict:
    """guest-get-osinfo's reply as KubeVirt's VirtualMachineInstanceGuestOSInfo."""
    if not isinstance(osinfo, dict):
        return {}
    out = {}
    for agent_key, field in _OS_FIELDS.items():
        text = _text(osinfo.get(agent_key))
        if text is not None:
            out[field] = text
    return out


def with_agent(status: dict, connected: bool, osinfo: Any = None) -> dict:
    """`status` with the AgentConnected condition set (connected) or removed, and guestOSInfo
    from `osinfo` when it says anything."""
    status = dict(status)
    status["conditions"] = [c for c in status.get("conditions") or [] if c.get("type") != AGENT_CONNECTED]
    if connected:
        set_condition(status, AGENT_CONNECTED, True)
    info = guest_os_info(osinfo)
    if info:
        status["guestOSInfo"] = info
    return status


def report_agent(ctx: Context, key: str, connected: bool, osinfo: Any = None) -> None:
    """Write the agent's state into the VMI `key` (namespace/name), if it still exists."""
    ns, name = key.split("/", 1)
    vmi = ctx.store.get("VirtualMachineInstance", name, ns)
    if vmi is not None:
        ctx.store.update_status("VirtualMachineInstance", name, ns, with_agent(vmi.get("status") or {}, connected,
                                                                               osinfo))
