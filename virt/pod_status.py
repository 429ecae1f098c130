"""What a launcher Pod says about its VMI, as pure functions of the Pod the API server returns.

KubeVirt's VMI controller maps its launcher Pod onto the VMI's status: a Pod not yet placed
is `Scheduling`, a placed Pod whose compute container does not run yet is `Scheduled`, a
running one `Running` (here the launcher is QEMU's supervisor, so its container running is the
guest running), a Pod that ended `Succeeded` or `Failed` (with the container's or the Pod's own
reason), one whose node is unreachable `Unknown`. The Pod's IP is the guest's address on the
pod network (masquerade), as `interfaces[].ipAddress`. Pod status comes from the API server but
is written by kubelets: every field is type-checked and every text is bounded, so a garbled
status yields a short answer, never an exception.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from controlplane.user_text import one_line
from virt.pods import CONTAINER, MIGRATION_PORT, RUN_DIR

REASON_LIMIT = 256
_NODE = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
_UID = re.compile(r"[A-Za-z0-9][-A-Za-z0-9_.]{0,127}")


def _map(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _text(value: Any) -> str:
    return one_line(value, REASON_LIMIT) if isinstance(value, str) else ""


def _ips(status: dict) -> list[str]:
    """The Pod's addresses (podIP first, then podIPs), valid ones only, each once."""
    entries = status.get("podIPs")
    found = [status.get("podIP")] + [_map(e).get("ip") for e in (entries[:8] if isinstance(entries, list) else [])]
    out: list[str] = []
    for ip in found:
        try:
            text = str(ipaddress.ip_address(ip)) if isinstance(ip, str) and len(ip) <= 45 else None
        except ValueError:
            text = None
        if text and text not in out:
            out.append(text)
    return out[:2]


def _compute(status: dict) -> dict:
    statuses = status.get("containerStatuses")
    for entry in statuses if isinstance(statuses, list) else []:
        if _map(entry).get("name") == CONTAINER:
            return _map(entry.get("state"))
    return {}


def _scheduled(pod: dict, status: dict) -> bool:
    if _node(pod):
        return True
    conditions = status.get("conditions")
    return any(_map(c).get("type") == "PodScheduled" and _map(c).get("status") == "True"
               for c in (conditions if isinstance(conditions, list) else []))


def _unschedulable(status: dict) -> str:
    conditions = status.get("conditions")
    for c in conditions if isinstance(conditions, list) else []:
        c = _map(c)
        if c.get("type") == "PodScheduled" and c.get("status") == "False":
            return _text(": ".join(t for t in (c.get("reason"), c.get("message")) if isinstance(t, str) and t))
    return ""


def _node(pod: dict) -> str:
    node = _map(pod.get("spec")).get("nodeName")
    return node if isinstance(node, str) and len(node) <= 253 and _NODE.fullmatch(node) else ""


def _ended(state: dict, status: dict) -> str:
    """Why the launcher ended: the compute container's reason and message, else the Pod's."""
    term = _map(state.get("terminated"))
    parts = [term.get("reason"), term.get("message")]
    code = term.get("exitCode")
    if isinstance(code, int) and not isinstance(code, bool) and code:
        parts.append(f"exit code {code}")
    if not any(isinstance(p, str) and p for p in parts[:2]):
        parts = [status.get("reason"), status.get("message")] + parts[2:]
    return _text(": ".join(p for p in parts if isinstance(p, str) and p))


def launcher_status(pod: Any, *, interface: str | None = None) -> dict:
    """The VMI status fields the launcher Pod decides: `phase`, and when known `nodeName`,
    `reason`, `interfaces` (the Pod's address, named `interface` — the VMI's pod-network
    interface — when given) and `activePods` ({pod uid: node}, as KubeVirt keeps it)."""
    if not isinstance(pod, dict):
        return {"phase": "Unknown", "reason": "the launcher Pod is unreadable"}
    status = _map(pod.get("status"))
    phase, node, state = status.get("phase", "Pending"), _node(pod), _compute(status)
    out: dict[str, Any] = {}
    if phase == "Pending":
        if not _scheduled(pod, status):
            out = {"phase": "Scheduling"}
            reason = _unschedulable(status)
        else:
            out = {"phase": "Scheduled"}
            waiting = _map(state.get("waiting"))
            reason = _text(": ".join(t for t in (waiting.get("reason"), waiting.get("message"))
                                     if isinstance(t, str) and t))
        if reason:
            out["reason"] = reason
    elif phase == "Running":
        out = {"phase": "Running" if "running" in state else "Scheduled"}
        if "terminated" in state:  # the launcher ended; the Pod's phase follows at once
            out = {"phase": "Failed" if _map(state["terminated"]).get("exitCode") != 0 else "Succeeded"}
            if out["phase"] == "Failed":
                out["reason"] = _ended(state, status) or "the launcher failed"
    elif phase == "Succeeded":
        out = {"phase": "Succeeded"}
    elif phase == "Failed":
        out = {"phase": "Failed", "reason": _ended(state, status) or "the launcher Pod failed"}
    else:
        out = {"phase": "Unknown", "reason": _text(status.get("reason")) or "the launcher Pod's state is unknown"}
    if node:
        out["nodeName"] = node
        uid = _map(pod.get("metadata")).get("uid")
        if isinstance(uid, str) and _UID.fullmatch(uid):
            out["activePods"] = {uid: node}
    ips = _ips(status)
    if out["phase"] == "Running" and ips:
        entry: dict[str, Any] = {"ipAddress": ips[0], "ipAddresses": ips}
        if interface:
            entry["name"] = interface
        out["interfaces"] = [entry]
    return out


def _compute_ready(status: dict) -> bool:
    statuses = status.get("containerStatuses")
    return any(_map(e).get("name") == CONTAINER and _map(e).get("ready") is True
               for e in (statuses if isinstance(statuses, list) else []))


def _listening_port(pod: dict) -> int:
    """The compute container's `migration` port, as the Pod says (else KubeVirt's)."""
    containers = _map(pod.get("spec")).get("containers")
    for c in containers if isinstance(containers, list) else []:
        ports = _map(c).get("ports") if _map(c).get("name") == CONTAINER else None
        for p in ports if isinstance(ports, list) else []:
            number = _map(p).get("containerPort")
            if _map(p).get("name") == "migration" and isinstance(number, int) and not isinstance(number, bool) \
                    and 1024 <= number <= 65535:
                return number
    return MIGRATION_PORT


def migration_address(target_pod: Any, port: int | None = None) -> str | None:
    """HOST:PORT where a migration target Pod waits for the stream (`[v6]:PORT` for IPv6), the
    port its spec names unless `port` is given; None until it runs, is ready (its startup
    probe reached the launcher's port: it listens) and has an address."""
    if not isinstance(target_pod, dict) or launcher_status(target_pod)["phase"] != "Running":
        return None
    status = _map(target_pod.get("status"))
    ips = _ips(status)
    if not ips or not _compute_ready(status):
        return None
    host, port = ips[0], port or _listening_port(target_pod)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def launch_migrate_command(address: str, *, token_on_stdin: bool = False) -> list[str]:
    """The command the controller runs in the source launcher Pod (pods/exec, container
    `compute`), as virt-handler tells its virt-launcher to migrate: one JSON line on stdout,
    exit 0 once the target runs the guest. With `token_on_stdin` the exec's stdin carries the
    target's token."""
    argv = ["pvlun", "launch-migrate", "--run-dir", RUN_DIR, "--to", address]
    return argv + (["--token-file", "-"] if token_on_stdin else [])


def launch_migrate_cancel_command() -> list[str]:
    """The command that aborts the source launcher's migration in flight (KubeVirt's abort):
    the source QEMU cancels and runs on; the running `launch-migrate` then reports Failed."""
    return ["pvlun", "launch-migrate", "--run-dir", RUN_DIR, "--cancel"]
