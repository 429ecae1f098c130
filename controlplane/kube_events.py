"""events.k8s.io/v1 Events for the store's add_event, as client-go's event recorder writes
them: the same event again (same object, type, reason, note, reporter) is one Event whose
`series.count` grows, not a new Event each time.

The API server's rules for v1 Events shape this: on creation `eventTime`, `action`,
`reason`, `reportingController` and `reportingInstance` are required, the deprecated
count and timestamps must be unset, and a `series` needs a count of at least 2; on update
only the series may change (note, reason, type are immutable). A cluster-scoped object's
Events live in the "default" namespace.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any

from controlplane.kube_kinds import KubeKind

Obj = dict[str, Any]
REASON_LIMIT, ACTION_LIMIT, NOTE_LIMIT, INSTANCE_LIMIT = 128, 128, 1024, 128


def micro_time(at: float | None = None) -> str:
    """A MicroTime as the API server writes it."""
    stamp = datetime.fromtimestamp(time.time() if at is None else at, timezone.utc)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _cut_bytes(text: str, limit: int) -> str:
    data = text.encode()
    return text if len(data) <= limit else data[:limit].decode(errors="ignore")


def event_namespace(info: KubeKind, obj: Obj) -> str:
    return (obj.get("metadata", {}).get("namespace") or "default") if info.namespaced else "default"


def regarding(info: KubeKind, obj: Obj) -> Obj:
    meta = obj.get("metadata") or {}
    ref = {"apiVersion": info.api_version, "kind": info.kind, "name": meta.get("name", "")}
    if info.namespaced:
        ref["namespace"] = meta.get("namespace") or "default"
    for field in ("uid", "resourceVersion"):
        if meta.get(field):
            ref[field] = meta[field]
    return ref


def new_event(info: KubeKind, obj: Obj, type_: str, reason: str, message: str, controller: str,
              instance: str) -> Obj:
    """A first occurrence, ready to create."""
    name = (obj.get("metadata") or {}).get("name", "")[:253 - 17]
    reason = reason[:REASON_LIMIT] or "Unknown"
    return {"apiVersion": "events.k8s.io/v1", "kind": "Event",
            "metadata": {"name": f"{name}.{time.time_ns():x}", "namespace": event_namespace(info, obj)},
            "eventTime": micro_time(), "type": type_, "reason": reason, "action": reason[:ACTION_LIMIT],
            "note": _cut_bytes(message, NOTE_LIMIT), "regarding": regarding(info, obj),
            "reportingController": controller, "reportingInstance": instance[:INSTANCE_LIMIT]}


def regards(event: Obj, ref: Obj) -> bool:
    """Whether the event is about the object `ref` (from `regarding`) names: the same uid
    (a deleted namesake's events are not its own), or kind and name when it has none."""
    have = event.get("regarding") or {}
    if ref.get("uid"):
        return have.get("uid") == ref["uid"]
    return all(have.get(f) == ref.get(f) for f in ("kind", "namespace", "name"))


def same_event(event: Obj, wanted: Obj) -> bool:
    """Whether `event` (stored) is an earlier occurrence of `wanted` (from new_event)."""
    fields = ("type", "reason", "note", "reportingController")
    return all(event.get(f) == wanted[f] for f in fields) and regards(event, wanted["regarding"])


def count(event: Obj) -> int:
    series = event.get("series") or {}
    return int(series.get("count") or event.get("deprecatedCount") or 1)


def counted_again(event: Obj) -> Obj:
    """The stored event with one more occurrence."""
    event["series"] = {"count": count(event) + 1, "lastObservedTime": micro_time()}
    return event


def _seconds(stamp: object) -> str:
    """A time as SQLiteStore's events show it (seconds, UTC, 'Z')."""
    text = str(stamp or "")
    return text[:19] + "Z" if len(text) >= 19 else text


def shown(event: Obj) -> Obj:
    """An Event as ObjectStore.events returns it (the shape SQLiteStore has)."""
    first = event.get("eventTime") or event.get("deprecatedFirstTimestamp") or \
        (event.get("metadata") or {}).get("creationTimestamp")
    last = (event.get("series") or {}).get("lastObservedTime") or event.get("deprecatedLastTimestamp") or first
    return {"type": event.get("type", ""), "reason": event.get("reason", ""), "message": event.get("note", ""),
            "time": _seconds(last), "firstTime": _seconds(first), "count": count(event)}
