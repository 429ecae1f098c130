"""What a VirtualMachinePool and a VirtualMachineInstanceReplicaSet report, as KubeVirt's
controllers write it: replicas, readyReplicas, labelSelector (for the HorizontalPodAutoscaler)
and the conditions ReplicaFailure (a scale step failed: its reason and error) and
ReplicaPaused, with a Normal event when pausing starts and ends. Conditions change only
when their state does (no heartbeat), so an unchanged status is never written again."""

from __future__ import annotations

from typing import NamedTuple

from controlplane.context import Context
from controlplane.label_selectors import selector_string
from controlplane.store import Obj, namespace_of, now


class PauseWords(NamedTuple):
    """What the ReplicaPaused condition and the pause/resume events say (the pool's and the
    replica set's own words)."""
    reason: str
    message: str
    paused_event: tuple[str, str]
    resumed_event: tuple[str, str]


POOL_PAUSE = PauseWords("SuccessfulPaused", "Pool controller is paused", ("SuccessfulPaused", "Pool is paused"),
                        ("SuccessfulResume", "Pool is unpaused"))
REPLICA_SET_PAUSE = PauseWords("Paused", "Controller got paused", ("SuccessfulPaused", "Paused"),
                               ("SuccessfulResumed", "Resumed"))


def is_ready(obj: Obj) -> bool:
    """A VM or VMI whose Ready condition is True (KubeVirt counts these as ready replicas)."""
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in (obj.get("status") or {}).get("conditions") or [] if isinstance(c, dict))


def _put(conditions: list[dict], type_: str, present: bool, reason: str, message: str) -> list[dict]:
    kept = [c for c in conditions if c.get("type") != type_]
    old = next((c for c in conditions if c.get("type") == type_), None)
    if not present:
        return kept
    if old is not None and old.get("reason") == reason and old.get("message") == message:
        return conditions
    return kept + [{"type": type_, "status": "True", "reason": reason, "message": message,
                    "lastTransitionTime": old.get("lastTransitionTime") if old else now()}]


def write_status(ctx: Context, owner: Obj, replicas: int, ready: int, failure: tuple[str, str] | None,
                 words: PauseWords) -> None:
    """Status of `owner` from its counts, the failure of this pass (reason, error) if any, and
    its paused condition."""
    spec, status = owner.get("spec") or {}, dict(owner.get("status") or {})
    conditions = list(status.get("conditions") or [])
    conditions = _put(conditions, "ReplicaFailure", failure is not None, *(failure or ("", "")))
    paused = bool(spec.get("paused"))
    was_paused = any(c.get("type") == "ReplicaPaused" for c in conditions)
    conditions = _put(conditions, "ReplicaPaused", paused, words.reason, words.message)
    status.update(replicas=replicas, readyReplicas=ready, labelSelector=selector_string(spec.get("selector")))
    if conditions:
        status["conditions"] = conditions
    else:
        status.pop("conditions", None)
    if status == (owner.get("status") or {}):
        return
    ctx.store.update_status(owner["kind"], owner["metadata"]["name"], namespace_of(owner), status)
    if failure is not None and failure != _failure_of(owner):
        ctx.store.add_event(owner, "Warning", failure[0], failure[1])
    if paused != was_paused:
        ctx.store.add_event(owner, "Normal", *(words.paused_event if paused else words.resumed_event))


def _failure_of(owner: Obj) -> tuple[str, str] | None:
    for c in (owner.get("status") or {}).get("conditions") or []:
        if c.get("type") == "ReplicaFailure":
            return c.get("reason", ""), c.get("message", "")
    return None
