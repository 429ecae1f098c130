"""VMI status from a launcher Pod's status (virt/pod_status.py), as KubeVirt maps pod phases; garbage too."""

from __future__ import annotations

import pytest

from virt.pod_status import launch_migrate_cancel_command, launch_migrate_command, launcher_status, \
    migration_address

UID = "0d5c4b6a-2f1e-4c3d-8b7a-6e5f4d3c2b1a"


def pod(phase: str | None = "Running", node: str | None = "node-a", state: dict | None = None, **status) -> dict:
    out: dict = {"metadata": {"name": "virt-launcher-tick-xdnsn", "uid": UID}, "spec": {}, "status": dict(status)}
    if node is not None:
        out["spec"]["nodeName"] = node
    if phase is not None:
        out["status"]["phase"] = phase
    if state is not None:
        out["status"]["containerStatuses"] = [{"name": "sidecar", "state": {"running": {}}},
                                              {"name": "compute", "state": state}]
    return out


def test_a_pod_not_yet_placed_is_scheduling_with_the_schedulers_reason():
    assert launcher_status(pod("Pending", node=None)) == {"phase": "Scheduling"}
    unschedulable = pod("Pending", node=None, conditions=[
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
         "message": "0/3 nodes are available: 3 Insufficient devices.kubevirt.io/kvm."}])
    assert launcher_status(unschedulable) == {
        "phase": "Scheduling",
        "reason": "Unschedulable: 0/3 nodes are available: 3 Insufficient devices.kubevirt.io/kvm."}


def test_a_placed_pod_whose_launcher_does_not_run_yet_is_scheduled():
    pulling = pod("Pending", state={"waiting": {"reason": "ContainerCreating"}})
    assert launcher_status(pulling) == {"phase": "Scheduled", "reason": "ContainerCreating", "nodeName": "node-a",
                                        "activePods": {UID: "node-a"}}
    bound = pod("Pending", node=None, conditions=[{"type": "PodScheduled", "status": "True"}])
    assert launcher_status(bound) == {"phase": "Scheduled"}


def test_a_running_launcher_is_a_running_vmi_at_the_pods_address():
    running = pod(state={"running": {"startedAt": "2025-01-01T00:00:00Z"}}, podIP="10.244.1.7",
                  podIPs=[{"ip": "10.244.1.7"}, {"ip": "fd00:10:244:1::7"}])
    assert launcher_status(running, interface="default") == {
        "phase": "Running", "nodeName": "node-a", "activePods": {UID: "node-a"},
        "interfaces": [{"ipAddress": "10.244.1.7", "ipAddresses": ["10.244.1.7", "fd00:10:244:1::7"],
                        "name": "default"}]}
    assert "name" not in launcher_status(running)["interfaces"][0]
    starting = pod(state={"waiting": {"reason": "ContainerCreating"}}, podIP="10.244.1.7")
    assert launcher_status(starting) == {"phase": "Scheduled", "nodeName": "node-a", "activePods": {UID: "node-a"}}


def test_ended_launchers_say_how():
    assert launcher_status(pod("Succeeded", state={"terminated": {"exitCode": 0, "reason": "Completed"}})) == {
        "phase": "Succeeded", "nodeName": "node-a", "activePods": {UID: "node-a"}}
    failed = pod("Failed", state={"terminated": {"exitCode": 1, "reason": "Error",
                                                 "message": "QEMU exited 1:\nqemu: could not open disk"}})
    assert launcher_status(failed)["reason"] == "Error: QEMU exited 1: qemu: could not open disk: exit code 1"
    evicted = pod("Failed", reason="Evicted", message="The node was low on resource: memory.")
    assert launcher_status(evicted) == {"phase": "Failed", "reason": "Evicted: The node was low on resource: memory.",
                                        "nodeName": "node-a", "activePods": {UID: "node-a"}}
    oom = pod("Running", state={"terminated": {"exitCode": 137, "reason": "OOMKilled"}})
    assert launcher_status(oom)["phase"] == "Failed" and launcher_status(oom)["reason"] == "OOMKilled: exit code 137"
    assert launcher_status(pod("Unknown", reason="NodeLost"))["phase"] == "Unknown"


@pytest.mark.parametrize("garbage", [
    None, "pod", [], {"status": "Running"}, {"status": {"phase": 7}}, {"status": {"phase": "Exploded"}},
    {"spec": {"nodeName": "../../etc"}, "status": {"phase": "Running", "podIP": "not-an-ip"}},
    {"spec": {"nodeName": ["a"]}, "status": {"phase": "Running", "containerStatuses": "x", "podIPs": {"ip": 1}}},
    {"status": {"phase": "Failed", "reason": "x" * 100_000, "containerStatuses": [None, {"name": "compute"}]}},
    {"metadata": {"uid": "u" * 1000}, "spec": {"nodeName": "n"}, "status": {"phase": "Pending", "conditions": [5]}},
])
def test_garbage_pod_status_gives_a_short_safe_answer(garbage):
    status = launcher_status(garbage)
    assert status["phase"] in ("Scheduling", "Scheduled", "Running", "Succeeded", "Failed", "Unknown")
    assert len(status.get("reason", "")) <= 256 and "\n" not in status.get("reason", "")
    assert status.get("nodeName") in (None, "n")
    assert "interfaces" not in status and len(str(status.get("activePods", ""))) < 300


def test_migration_address_is_the_running_target_pods_ip_and_port():
    running = pod(state={"running": {}}, podIP="10.244.2.9")
    assert migration_address(running) is None  # running, but its launcher may not listen yet
    running["status"]["containerStatuses"][1]["ready"] = True  # the startup probe connected
    assert migration_address(running) == "10.244.2.9:49152"
    running["spec"]["containers"] = [{"name": "compute", "ports": [{"name": "migration", "containerPort": 50001}]}]
    assert migration_address(running) == "10.244.2.9:50001"  # where the Pod says it listens
    ready_v6 = pod(state={"running": {}}, podIP="fd00::9")
    ready_v6["status"]["containerStatuses"][1]["ready"] = True
    assert migration_address(ready_v6, port=50000) == "[fd00::9]:50000"
    assert migration_address(pod("Pending", state={"waiting": {}}, podIP="10.244.2.9")) is None
    assert migration_address(pod(state={"running": {}})) is None
    assert migration_address("garbage") is None
    assert launch_migrate_command("10.244.2.9:49152") == [
        "pvlun", "launch-migrate", "--run-dir", "/var/run/kubevirt-private/vm", "--to", "10.244.2.9:49152"]
    assert launch_migrate_command("10.244.2.9:49152", token_on_stdin=True)[-2:] == ["--token-file", "-"]
    assert launch_migrate_cancel_command() == [
        "pvlun", "launch-migrate", "--run-dir", "/var/run/kubevirt-private/vm", "--cancel"]
