"""A cluster migration's bookkeeping as pure functions (virt/migration_status.py): KubeVirt's
phases with their transition times, its migrationState from start to end, the VMI on its
target, what `pvlun launch-migrate` printed read back as hostile input; and the
--migration-hook flag both daemons take."""

from __future__ import annotations

import json

import pytest

from pvlun.cli import build_parser
from virt.hooks import hook_flag
from virt.migration_status import (ended_state, in_flight, phase_fields, read_cancel, read_result, rfc3339,
                                   started_state, vmi_on_target)

T0 = 1_700_000_000.0
MIG = {"metadata": {"name": "move", "uid": "9b0f3c1e-0000-4000-8000-000000000001"}}
VMI = {"metadata": {"name": "tick", "uid": "vmi-uid"},
       "status": {"phase": "Running", "nodeName": "node-a", "activePods": {"src-uid": "node-a"},
                  "interfaces": [{"name": "default", "ipAddress": "10.0.0.5", "ipAddresses": ["10.0.0.5"]}]}}
SOURCE = {"metadata": {"name": "virt-launcher-tick-abcde", "uid": "src-uid"}}
TARGET = {"metadata": {"name": "virt-launcher-tick-fghij", "uid": "dst-uid"}, "spec": {"nodeName": "node-b"},
          "status": {"phase": "Running", "podIP": "10.0.1.9",
                     "containerStatuses": [{"name": "compute", "ready": True, "state": {"running": {}}}]}}


def test_each_phase_is_recorded_once_with_when_it_began():
    status: dict = {}
    status.update(phase_fields(status, "Scheduling", T0))
    status.update(phase_fields(status, "Scheduling", T0 + 5))  # again: no new entry
    status.update(phase_fields(status, "Running", T0 + 9, error=None))
    assert status["phase"] == "Running" and status["error"] is None
    assert status["phaseTransitionTimestamps"] == [
        {"phase": "Scheduling", "phaseTransitionTimestamp": "2023-11-14T22:13:20Z"},
        {"phase": "Running", "phaseTransitionTimestamp": rfc3339(T0 + 9)}]
    with pytest.raises(ValueError):
        phase_fields(status, "Migrating", T0)


def test_the_migration_state_goes_from_started_to_completed_or_failed():
    state = started_state(MIG, VMI, SOURCE, TARGET, "10.0.1.9:49152", T0)
    assert state == {"migrationUid": MIG["metadata"]["uid"], "mode": "PreCopy", "startTimestamp": rfc3339(T0),
                     "sourceNode": "node-a", "sourcePod": "virt-launcher-tick-abcde", "targetNode": "node-b",
                     "targetPod": "virt-launcher-tick-fghij", "targetNodeAddress": "10.0.1.9",
                     "completed": False, "failed": False}
    assert in_flight({"status": {"migrationState": state}}) == state
    done = ended_state(state, T0 + 2, succeeded=True)
    assert (done["completed"], done["failed"], done["endTimestamp"]) == (True, False, rfc3339(T0 + 2))
    assert "failureReason" not in done and "abortRequested" not in done
    assert in_flight({"status": {"migrationState": done}}) is None
    failed = ended_state(state, T0 + 2, succeeded=False, reason="target refused\nthe stream", abort=True)
    assert (failed["completed"], failed["failed"], failed["failureReason"]) == (False, True, "target refused the stream")
    assert (failed["abortRequested"], failed["abortStatus"]) == (True, "Succeeded")  # the source ran on
    assert ended_state(state, T0, succeeded=True, abort=True)["abortStatus"] == "Failed"  # too late: it moved
    assert started_state(MIG, VMI, SOURCE, TARGET, "[fd00::9]:49152", T0)["targetNodeAddress"] == "fd00::9"
    assert in_flight(VMI) is None and in_flight({"status": {"migrationState": "garbage"}}) is None


def test_on_its_target_the_vmi_has_the_target_pods_node_address_and_uid_under_its_interface_name():
    state = ended_state(started_state(MIG, VMI, SOURCE, TARGET, "10.0.1.9:49152", T0), T0 + 1, succeeded=True)
    assert vmi_on_target(VMI, TARGET, state) == {
        "nodeName": "node-b", "activePods": {"dst-uid": "node-b"},
        "interfaces": [{"name": "default", "ipAddress": "10.0.1.9", "ipAddresses": ["10.0.1.9"]}],
        "migrationState": state}


def line(**fields) -> bytes:
    return json.dumps(fields).encode() + b"\n"


def test_the_launchers_result_is_the_last_json_line_with_known_fields_typed_and_bounded():
    said = b"noise\n" + line(phase="Running") + line(
        phase="Succeeded", qemuStatus="completed", totalTimeMs=812, downtimeMs=31, dataTotal=2 ** 26, error=None,
        startTimestamp=T0, sourceNode="evil\nnode", extra={"x": 1})
    assert read_result(said) == {"phase": "Succeeded", "qemuStatus": "completed", "totalTimeMs": 812,
                                 "downtimeMs": 31, "dataTotal": 2 ** 26}
    failed = read_result(line(phase="Failed", error="x" * 5000 + "\n/var/lib/secret", totalTimeMs=-1,
                              downtimeMs=True, dataRemaining=2 ** 70))
    assert failed["phase"] == "Failed" and len(failed["error"]) <= 400 and "\n" not in failed["error"]
    assert set(failed) == {"phase", "error"}
    assert read_result(line(phase="Failed"))["error"] == "the source launcher reported a failure without a reason"
    for nothing in (b"", b"pvlun launch-migrate: no launcher in /run\n", line(phase="Running"), b"[1, 2]\n",
                    line(phase="Succeeded")[:-5] + b"\n"):
        assert read_result(nothing) is None


def test_a_cancel_counts_only_when_the_launcher_said_it_stopped_a_stream():
    assert read_cancel(b'{"cancelled":true}\n') is True
    assert read_cancel(b'{"cancelled":true}\n{"cancelled":false}\n') is False  # the last word counts
    for nothing in (b"", b'{"cancelled":"yes"}\n', b"cancelled true\n", b'{"cancelled": 1}\n'):
        assert read_cancel(nothing) is False


@pytest.mark.parametrize("flag, parsed", [
    ("pre=touch /tmp/{vm}", ("pre", "touch /tmp/{vm}")),
    ("failed=notify --to 'ops team' {vm}", ("failed", "notify --to 'ops team' {vm}")),
])
def test_a_hook_flag_is_an_event_and_a_command_of_words(flag, parsed):
    assert hook_flag(flag) == parsed
    assert build_parser().parse_args(["serve", "--migration-hook", flag]).migration_hook == [parsed]
    assert build_parser().parse_args(["controller", "--migration-hook", flag]).migration_hook == [parsed]


@pytest.mark.parametrize("flag, said", [
    ("pre", "is not EVENT=COMMAND"), ("during=x", "is not EVENT=COMMAND with EVENT one of pre, post, failed"),
    ("post=", "the post hook has no command"), ("post=echo 'open", "does not split into words"),
])
def test_a_bad_hook_flag_is_refused_in_one_line_before_anything_runs(flag, said, capsys):
    with pytest.raises(ValueError, match=said):
        hook_flag(flag)
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["controller", "--migration-hook", flag])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and said.split(" with")[0] in err and len(err.strip().splitlines()) == 1
