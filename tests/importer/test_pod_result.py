"""What the controller reads from an importer pod's status (importer/pod_result.py): the outcome
our `pvlun import` wrote, restarts, and every kind of garbage a pod that handled a hostile image
can leave there, always as one bounded line and never as a crash."""

from __future__ import annotations

import json

import pytest

from importer import metrics
from importer.pod_result import ImportPodResult, import_result, progress_from_metrics, termination_message


def pod(*, phase: str = "Running", state: dict | None = None, last: dict | None = None, restarts: object = 0,
        name: str = "importer", **status) -> dict:
    container = {"name": name, "restartCount": restarts, "state": state or {}, "lastState": last or {}}
    return {"metadata": {"name": "importer-x"}, "status": {"phase": phase, "containerStatuses": [container], **status}}


def terminated(code: object, message: object = None, reason: str = "Completed") -> dict:
    term = {"exitCode": code, "reason": reason}
    if message is not None:
        term["message"] = message
    return {"terminated": term}


def test_succeeded_import():
    message = termination_message("Succeeded", "", "Import Complete", progress="100.0%", preallocation_applied=True)
    assert json.loads(message) == {"phase": "Succeeded", "reason": "", "message": "Import Complete",
                                   "progress": "100.0%", "preallocationApplied": True}
    result = import_result(pod(phase="Succeeded", state=terminated(0, message)))
    assert result == ImportPodResult("Succeeded", "", "Import Complete", "100.0%", 0, 0, False, True)


def test_failed_attempt_gives_the_importers_reason_and_restarts():
    message = termination_message("Failed", "BackingFileRefused", "the image names a backing file: /etc/shadow")
    result = import_result(pod(state=terminated(1, message, reason="Error"), restarts=2))
    assert (result.phase, result.reason, result.restarts, result.exit_code) == ("Failed", "BackingFileRefused", 2, 1)
    assert result.message == "the image names a backing file: /etc/shadow"
    # CrashLoopBackOff: waiting to be restarted, the last attempt's outcome is what counts
    waiting = pod(state={"waiting": {"reason": "CrashLoopBackOff"}}, last=terminated(1, message, "Error"), restarts=3)
    assert import_result(waiting).phase == "Failed" and import_result(waiting).reason == "BackingFileRefused"
    # running again after a failure: Running, with what went wrong before
    again = import_result(pod(state={"running": {"startedAt": "2025-01-01T00:00:00Z"}}, last=terminated(1, message),
                              restarts=1))
    assert (again.phase, again.reason, again.restarts) == ("Running", "BackingFileRefused", 1)


def test_pending_running_and_nothing_yet():
    assert import_result({"metadata": {}, "status": {"phase": "Pending"}}) is None
    assert import_result(pod(state={"running": {}})) == ImportPodResult("Running")
    pulling = import_result(pod(phase="Pending", state={"waiting": {"reason": "ErrImagePull", "message": "no such\nimage"}}))
    assert pulling == ImportPodResult("Pending", "ErrImagePull", "no such image")


def test_evicted_pod_is_failed_for_good():
    result = import_result({"status": {"phase": "Failed", "reason": "Evicted",
                                       "message": "The node was low on resource: ephemeral-storage."}})
    assert (result.phase, result.reason, result.pod_failed) == ("Failed", "Evicted", True)
    killed = import_result(pod(phase="Failed", state=terminated(137, None, reason="OOMKilled"), restarts=5))
    assert (killed.phase, killed.reason, killed.exit_code, killed.pod_failed) == ("Failed", "OOMKilled", 137, True)
    assert killed.message == "the importer exited with code 137"


def test_exit_0_without_our_result_is_not_success():
    for message in (None, "", "done!", '{"phase": "Failed"}', '{"phase": "Succeeded"'):
        result = import_result(pod(phase="Succeeded", state=terminated(0, message)))
        assert result.phase == "Failed", message
    assert import_result(pod(state=terminated(1, '{"phase": "Succeeded", "reason": ""}'))).phase == "Failed"


@pytest.mark.parametrize("message", [
    "[" * 4000 + "]" * 4000,                       # nested past the parser's recursion limit
    "{" + '"a":' * 3000,                           # truncated, deep
    '{"phase": "Failed", "reason": "Bad reason\\n<b>", "message": "x"}',
    '{"phase": "Failed", "reason": 42, "message": ["not", "text"]}',
    "Traceback (most recent call last):\n  File \"/usr/lib/x.py\"\n\x1b[31mKeyError\x1b[0m: 'x'" * 500,
    "\udcff\x00\x07" * 3000,
    json.dumps({"phase": "Failed", "reason": "NotFound", "message": "m" * 100_000}),
])
def test_garbage_termination_messages_give_one_bounded_line(message):
    result = import_result(pod(state=terminated(1, message, reason="Error"), restarts="many"))
    assert result.phase == "Failed" and result.restarts == 0
    assert result.reason in ("Error", "NotFound")
    assert len(result.message) <= 400 and "\n" not in result.message and "\x1b" not in result.message
    assert "\x00" not in result.message


def test_credentials_in_a_message_are_scrubbed():
    text = "GET https://alice:hunter22@example.org/x?X-Amz-Signature=abc123 failed: Authorization: Bearer tok3n"
    result = import_result(pod(state=terminated(1, termination_message("Failed", "Unauthorized", text))))
    assert "hunter22" not in result.message and "abc123" not in result.message and "tok3n" not in result.message
    raw = import_result(pod(state=terminated(1, text)))  # a log tail (FallbackToLogsOnError), scrubbed the same
    assert "hunter22" not in raw.message and "tok3n" not in raw.message


@pytest.mark.parametrize("thing", [None, "pod", [], {"status": "x"}, {"status": {"containerStatuses": "x"}},
                                   {"status": {"containerStatuses": [1, None]}},
                                   {"status": {"containerStatuses": [{"state": "x", "lastState": 3}]}}])
def test_malformed_pods_do_not_crash(thing):
    result = import_result(thing)
    assert result is None or isinstance(result, ImportPodResult)


def test_the_importer_container_is_read_even_beside_others():
    sidecar = {"name": "istio-proxy", "restartCount": 0, "state": {"running": {}}}
    ours = {"name": "importer", "restartCount": 0,
            "state": terminated(0, termination_message("Succeeded", "", "Import Complete", progress="100.0%"))}
    result = import_result({"status": {"phase": "Running", "containerStatuses": [sidecar, ours]}})
    assert result.phase == "Succeeded"


def test_progress_from_the_pods_metrics():
    from prometheus_client import generate_latest

    metrics.set_cdi_progress("uid-progress", 12.5)
    metrics.set_cdi_progress("uid-progress", 47.25)
    metrics.set_cdi_progress("uid-progress", 30.0)  # never goes back
    text = generate_latest().decode()
    assert progress_from_metrics(text, "uid-progress") == 47.25
    assert progress_from_metrics(text, "someone-else") is None
    assert progress_from_metrics("<html>not metrics</html>", "uid-progress") is None
    assert progress_from_metrics('kubevirt_cdi_import_progress_total{ownerUID="u"} 1e9\n', "u") is None
    assert progress_from_metrics("x" * (1 << 21), "u") is None
