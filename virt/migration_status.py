"""A cluster migration's bookkeeping, as pure functions: KubeVirt's `migrationState` (on the
VMI, and on the VirtualMachineInstanceMigration), the VMIM's phases with their transition
times, what the VMI says once the guest runs in the target Pod, and what `pvlun
launch-migrate` printed, read back.

KubeVirt's VMIM phases: Pending (another migration of the VMI goes first) → Scheduling (the
target Pod is made) → Scheduled (placed) → PreparingTarget (it runs) → TargetReady (its
launcher listens; the pre hooks ran) → Running (the stream) → Succeeded | Failed. The VMI
keeps phase Running throughout; its `migrationState` says where the guest goes, and once
`completed`, its nodeName, interfaces and activePods are the target Pod's. The printed result
comes from inside a Pod: every field is type-checked and bounded before it reaches a status.
"""

from __future__ import annotations

import json
import time
from typing import Any, Iterator

from controlplane.user_text import one_line, shown_text
from virt.pod_status import launcher_status

PHASES = ("Pending", "Scheduling", "Scheduled", "PreparingTarget", "TargetReady", "Running", "Succeeded", "Failed")
FINISHED = ("Succeeded", "Failed")
IN_FLIGHT = ("TargetReady", "Running")  # the stream may be under way: only its own job may end it
MODE = "PreCopy"  # KubeVirt's migration mode: RAM is copied while the guest runs (no post-copy here)
RESULT_LIMIT = 64 << 10  # bytes of launch-migrate's output looked at
_COUNTS = ("dataTotal", "dataTransferred", "dataRemaining", "totalTimeMs", "downtimeMs", "setupTimeMs",
           "expectedDowntimeMs")


def rfc3339(seconds: float) -> str:
    """metav1.Time as the API server writes it."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def phase_fields(status: dict, phase: str, now: float, **fields: Any) -> dict:
    """The status fields that move a VMIM to `phase`: the phase, its transition time appended
    to `phaseTransitionTimestamps` (once per phase), and `fields`."""
    if phase not in PHASES:
        raise ValueError(f"{phase!r} is not a migration phase")
    seen = [t for t in status.get("phaseTransitionTimestamps") or [] if isinstance(t, dict)]
    if phase != status.get("phase") and not any(t.get("phase") == phase for t in seen):
        seen = seen + [{"phase": phase, "phaseTransitionTimestamp": rfc3339(now)}]
    return {"phase": phase, "phaseTransitionTimestamps": seen, **fields}


def started_state(mig: dict, vmi: dict, source_pod: dict, target_pod: dict, address: str, now: float) -> dict:
    """`migrationState` when the stream starts (KubeVirt's VirtualMachineInstanceMigrationState)."""
    target = launcher_status(target_pod)
    return {"migrationUid": mig["metadata"]["uid"], "mode": MODE, "startTimestamp": rfc3339(now),
            "sourceNode": (vmi.get("status") or {}).get("nodeName", ""), "sourcePod": source_pod["metadata"]["name"],
            "targetNode": target.get("nodeName", ""), "targetPod": target_pod["metadata"]["name"],
            "targetNodeAddress": address.rsplit(":", 1)[0].strip("[]"), "completed": False, "failed": False}


def ended_state(state: dict, now: float, *, succeeded: bool, reason: str = "", abort: bool = False) -> dict:
    """`migrationState` at the end: completed or failed (with the reason); `abort` when a
    deleted migration asked for it (abortStatus: Succeeded when the source runs on)."""
    out = dict(state, endTimestamp=rfc3339(now), completed=succeeded, failed=not succeeded)
    if reason and not succeeded:
        out["failureReason"] = one_line(reason)
    if abort:
        out.update(abortRequested=True, abortStatus="Failed" if succeeded else "Succeeded")
    return out


def in_flight(vmi: dict) -> dict | None:
    """The VMI's migrationState while a stream may run (started, neither completed nor failed)."""
    state = (vmi.get("status") or {}).get("migrationState")
    if isinstance(state, dict) and state.get("startTimestamp") and not state.get("completed") \
            and not state.get("failed"):
        return state
    return None


def vmi_on_target(vmi: dict, target_pod: dict, state: dict) -> dict:
    """The VMI status fields once the guest runs in the target Pod: its node, its address
    (under the VMI's interface name), its Pod as the active one, the completed state."""
    interfaces = (vmi.get("status") or {}).get("interfaces")
    first = interfaces[0] if isinstance(interfaces, list) and interfaces and isinstance(interfaces[0], dict) else {}
    name = first.get("name") if isinstance(first.get("name"), str) else None
    target = launcher_status(target_pod, interface=name)
    return {"nodeName": target.get("nodeName", state.get("targetNode", "")),
            "activePods": target.get("activePods") or {},
            "interfaces": target.get("interfaces") or [], "migrationState": state}


def _objects(stdout: bytes) -> Iterator[dict]:
    """The JSON object lines a launcher printed, last first (of its last RESULT_LIMIT bytes)."""
    for line in reversed(stdout[-RESULT_LIMIT:].splitlines()):
        try:
            said = json.loads(line)
        except ValueError:
            continue
        if isinstance(said, dict):
            yield said


def read_result(stdout: bytes) -> dict | None:
    """The last result `pvlun launch-migrate` printed, only its known fields, typed and
    bounded; None when there is none (the command failed before it could say)."""
    for said in _objects(stdout):
        if said.get("phase") not in FINISHED:
            continue
        out: dict[str, Any] = {"phase": said["phase"]}
        for key in _COUNTS:
            value = said.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 62:
                out[key] = value
        for key in ("qemuStatus", "error"):
            if isinstance(said.get(key), str) and said[key]:
                out[key] = shown_text(said[key])
        if out["phase"] == "Failed" and "error" not in out:
            out["error"] = "the source launcher reported a failure without a reason"
        return out
    return None


def read_cancel(stdout: bytes) -> bool:
    """Whether `launch-migrate --cancel` said it stopped a stream."""
    return next((said.get("cancelled") is True for said in _objects(stdout)), False)
