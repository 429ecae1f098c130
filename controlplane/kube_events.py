"""events.k8s.io/v1 Events for KubeStore's add_event, as client-go's event recorder writes
them: the same event again (same object, type, reason, note, reporter) is one Event whose
`series.count` grows, not a new Event each time. An earlier occurrence is found by name
(the recorder's cache, as client-go's) or, after a restart or when another instance wrote
it, by listing the object's Events (field selector regarding.uid, as kubectl describe).

The API server's rules for v1 Events shape this: on creation `eventTime`, `action`,
`reason`, `reportingController` and `reportingInstance` are required, the deprecated
count and timestamps must be unset, and a `series` needs a count of at least 2; on update
only the series may change (note, reason, type are immutable). A cluster-scoped object's
Events live in the "default" namespace.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from datetime import datetime, timezone
from typing import Any

from controlplane.kube_informer import Transport
from controlplane.kube_kinds import ApiError, KubeKind, kind_info

Obj = dict[str, Any]
log = logging.getLogger("pvlun.kube")
KNOWN = 4096  # events the recorder remembers by name (client-go's LRU size)
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


class EventRecorder:
    """Writes and reads one reporter's Events through the API (not the informer cache: Events
    are many and read only by `describe`)."""

    def __init__(self, api: Transport, controller: str, instance: str):
        self.api, self.controller, self.instance = api, controller, instance
        self.kind = kind_info("Event")
        self._lock = threading.Lock()
        self._names: OrderedDict[tuple, tuple[str, str]] = OrderedDict()

    def record(self, obj: Obj, type_: str, reason: str, message: str) -> None:
        """Best effort, as client-go's recorder: a failure is logged, never raised into a reconcile."""
        info = kind_info(obj.get("kind"))
        wanted = new_event(info, obj, type_, reason, message, self.controller, self.instance)
        ns, ref = wanted["metadata"]["namespace"], wanted["regarding"]
        key = (ns, ref.get("uid") or (ref["kind"], ref.get("namespace"), ref["name"]), type_, wanted["reason"],
               wanted["note"])
        try:
            with self._lock:
                for _ in range(3):
                    existing = self._earlier(key, wanted)
                    try:
                        if existing is None:
                            saved = self.api.request("POST", self.kind.path(ns), body=wanted)
                        else:
                            saved = self.api.request("PUT", self.kind.path(ns, existing["metadata"]["name"]),
                                                     body=counted_again(existing))
                    except ApiError as exc:
                        if exc.code in (404, 409):  # gone, or counted by someone else meanwhile: again
                            self._names.pop(key, None)
                            continue
                        raise
                    self._names[key] = (ns, saved["metadata"]["name"])
                    self._names.move_to_end(key)
                    while len(self._names) > KNOWN:
                        self._names.popitem(last=False)
                    return
        except (ApiError, ValueError) as exc:
            log.warning("event %s %s on %s %s not recorded: %s", type_, reason, info.kind, ref.get("name"), exc)

    def _earlier(self, key: tuple, wanted: Obj) -> Obj | None:
        known = self._names.get(key)
        if known is not None:
            try:
                return self.api.request("GET", self.kind.path(*known))
            except ApiError as exc:
                if exc.code != 404:
                    raise
        return next((e for e in self._of(key[0], wanted["regarding"]) if same_event(e, wanted)), None)

    def _of(self, ns: str, ref: Obj) -> list[Obj]:
        terms = [f"regarding.uid={ref['uid']}"] if ref.get("uid") else \
            [f"regarding.name={ref['name']}", f"regarding.kind={ref['kind']}"]
        found = self.api.request("GET", self.kind.path(ns), {"fieldSelector": ",".join(terms)}).get("items") or []
        return [e for e in found if regards(e, ref)]

    def events(self, obj: Obj) -> list[Obj]:
        """The object's Events, oldest last seen first, as SQLiteStore's events shows them."""
        info = kind_info(obj.get("kind"))
        return sorted((shown(e) for e in self._of(event_namespace(info, obj), regarding(info, obj))),
                      key=lambda e: e["time"])
