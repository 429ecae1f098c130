"""What an importer (or upload) pod reports, and how the controller reads it back.

`pvlun import` ends by writing one JSON object to the container's termination log (CDI's
importer does the same): `{"phase": "Succeeded"|"Failed", "reason": ..., "message": ...}`,
plus `progress` and CDI's `preallocationApplied`. Kubelet copies it into the pod status
(`containerStatuses[].state.terminated.message`, at most 4096 bytes); `import_result` turns
that status into what the DataVolume shows. While the import runs, its progress is on the pod's
/metrics (`progress_from_metrics`).

Everything read here comes from a pod that handled a hostile image, so none of it is trusted:
the message may be garbage, huge, nested a thousand deep or the tail of a log (policy
FallbackToLogsOnError), and the result must still be one bounded line; a pod that exits 0
without saying Succeeded has not succeeded.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from controlplane.user_text import shown_text

from .errors import scrub

MESSAGE_MAX = 4096  # what kubelet keeps of a termination message
MESSAGE_LIMIT = 400  # characters of the message shown in a status
IMPORTER_CONTAINER = "importer"
UPLOAD_CONTAINER = "cdi-upload-server"
_REASON = re.compile(r"[A-Z][A-Za-z0-9]{0,62}")
_FALLBACK_REASON = "Error"  # kubelet's own word for a container that exited non-zero
_METRIC = "kubevirt_cdi_import_progress_total"


def termination_message(phase: str, reason: str = "", message: str = "", *, progress: str = "",
                        preallocation_applied: bool = False) -> str:
    """The JSON an importer pod leaves in its termination log: one bounded line of text."""
    out: dict = {"phase": phase, "reason": reason, "message": shown_text(scrub(message), MESSAGE_LIMIT)}
    if progress:
        out["progress"] = progress
    if preallocation_applied:
        out["preallocationApplied"] = True
    return json.dumps(out, ensure_ascii=True, separators=(",", ":"))


@dataclass(frozen=True)
class ImportPodResult:
    """The latest attempt of an importer pod, as the DataVolume should show it.

    phase: Pending (no container ran yet; `reason` says why, e.g. ErrImagePull), Running,
    Succeeded (exit 0 and the termination message says so), Failed (the latest attempt failed:
    the container is terminated or waits to restart, or the pod itself failed). With
    restartPolicy OnFailure kubelet restarts a Failed container; the controller decides when
    `restarts` is enough (CDI gives up after a few) or `pod_failed` says nothing will.
    """

    phase: str
    reason: str = ""
    message: str = ""
    progress: str = ""            # "100.0%" once Succeeded (while running: progress_from_metrics)
    restarts: int = 0
    exit_code: int | None = None
    pod_failed: bool = False      # the pod's own phase is Failed (evicted, deadline): no restart comes
    preallocation_applied: bool = False


def import_result(pod: object) -> ImportPodResult | None:
    """What the importer or upload pod `pod` (a Pod as the API returns it) says; None when its
    status says nothing yet."""
    if not isinstance(pod, dict):
        return None
    status = _dict(pod.get("status"))
    container = _container(status.get("containerStatuses"))
    pod_failed = status.get("phase") == "Failed"
    if container is None:
        if pod_failed:
            return ImportPodResult("Failed", _reason(status.get("reason")), _text(status.get("message")),
                                   pod_failed=True)
        return None
    restarts = _count(container.get("restartCount"))
    state, last = _dict(container.get("state")), _dict(_dict(container.get("lastState")).get("terminated"))
    terminated = _dict(state.get("terminated"))
    if terminated:
        result = _terminated(terminated, restarts)
        if pod_failed and result.phase != "Succeeded":
            return ImportPodResult("Failed", result.reason, result.message, restarts=restarts,
                                   exit_code=result.exit_code, pod_failed=True)
        return result
    if pod_failed:
        return ImportPodResult("Failed", _reason(status.get("reason")), _text(status.get("message")),
                               restarts=restarts, pod_failed=True)
    if state.get("running") is not None:
        failed = _terminated(last, restarts) if last else None
        return ImportPodResult("Running", failed.reason if failed else "", failed.message if failed else "",
                               restarts=restarts, exit_code=None)
    if last:  # waiting to be restarted after a failure (CrashLoopBackOff)
        return _terminated(last, restarts)
    waiting = _dict(state.get("waiting"))
    return ImportPodResult("Pending", _reason(waiting.get("reason"), ""), _text(waiting.get("message")),
                           restarts=restarts)


def _terminated(term: dict, restarts: int) -> ImportPodResult:
    code = _exit_code(term.get("exitCode"))
    said = _parse(term.get("message"))
    if code == 0 and said.get("phase") == "Succeeded":
        progress = said.get("progress") if isinstance(said.get("progress"), str) else ""
        return ImportPodResult("Succeeded", "", _text(said.get("message")),
                               progress=progress if re.fullmatch(r"\d{1,3}(\.\d{1,2})?%", progress) else "100.0%",
                               restarts=restarts, exit_code=0,
                               preallocation_applied=said.get("preallocationApplied") is True)
    if code == 0:
        return ImportPodResult("Failed", _FALLBACK_REASON, "the importer exited without reporting a result",
                               restarts=restarts, exit_code=0)
    reason = _reason(said.get("reason"), _reason(term.get("reason")))
    message = _text(said.get("message")) if said else _text(term.get("message"))
    if not message:
        message = f"the importer exited with code {code}" if code is not None else "the importer failed"
    return ImportPodResult("Failed", reason, message, restarts=restarts, exit_code=code)


def _parse(message: object) -> dict:
    """The termination message's JSON object, or {} for anything else (a log tail, garbage)."""
    if not isinstance(message, str) or not message.lstrip().startswith("{"):
        return {}
    try:
        value = json.loads(message[:MESSAGE_MAX])
    except (ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


def _container(statuses: object) -> dict | None:
    if not isinstance(statuses, list):
        return None
    entries = [s for s in statuses[:16] if isinstance(s, dict)]
    ours = [s for s in entries if s.get("name") in (IMPORTER_CONTAINER, UPLOAD_CONTAINER)]
    return (ours or entries or [None])[0]


def _dict(value: object) -> dict:
    return value if isinstance(value, dict) else {}


def _text(value: object) -> str:
    """One line a person may read: no credentials, no host paths, bounded."""
    if not isinstance(value, str):
        return ""
    return shown_text(scrub(value[:MESSAGE_MAX]), MESSAGE_LIMIT)


def _reason(value: object, default: str = _FALLBACK_REASON) -> str:
    """A CamelCase reason word as Kubernetes conditions take it; anything else gives `default`."""
    return value if isinstance(value, str) and _REASON.fullmatch(value) else default


def _count(value: object) -> int:
    return min(max(value, 0), 1 << 20) if isinstance(value, int) and not isinstance(value, bool) else 0


def _exit_code(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and -(1 << 31) <= value < 1 << 31 else None


def progress_from_metrics(text: str, owner_uid: str) -> float | None:
    """The percentage an importer pod's /metrics text reports for `owner_uid` (CDI's
    kubevirt_cdi_import_progress_total), or None if it reports none or the text is no metrics."""
    try:
        for family in text_string_to_metric_families(text[:1 << 20]):
            for sample in family.samples:
                if sample.name == _METRIC and sample.labels.get("ownerUID") == owner_uid:
                    value = float(sample.value)
                    return value if 0.0 <= value <= 100.0 else None
    except (ValueError, TypeError, IndexError, KeyError):
        return None
    return None
