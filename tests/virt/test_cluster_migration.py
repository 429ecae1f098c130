"""Live migration in cluster mode end to end, with real QEMU (TCG, the tick guest): the
controller's loop on a KubeStore against the Kubernetes API server TEST DOUBLE, the test playing
the scheduler and the kubelet with real `pvlun launch` processes (launcher_kubelet.py), and the
double's pods/exec running `pvlun launch-migrate` for the source Pod. A migration moves the
guest to the target Pod over TCP and the VMI follows it; a target that expects another token
fails the migration and the guest stays where it was."""

from __future__ import annotations

import json
import logging
import sys
import time

import pytest

from cluster_vms import (CONTROLLER_AGENT, NS, VMIM, apply_tick_vm, migrate, running_vmi, start_controller,
                         status_of, stop_controller, token_secret)
from controller_rbac import allowed, classify, rules
from kube_fixtures import wait_until
from launch_process import free_port
from launcher_kubelet import LauncherKubelet
from virt.migration_status import PHASES

def finished(store, kubelet, name: str) -> dict:
    """The migration's status once it ended (else what the migration and the launchers said)."""
    def ended() -> dict | None:
        status = status_of(store, VMIM, name)
        return status if status.get("phase") in ("Succeeded", "Failed") else None

    return wait_until(ended, 30.0, lambda: json.dumps(status_of(store, VMIM, name)) + "".join(
        f"\n{pod}: {p.stderr()[-2000:]}" for pod, p in kubelet.processes.items()))


@pytest.fixture
def disk(tick_disk, tmp_path):
    copy = tmp_path / "root.img"  # one Block claim, ReadWriteMany: both nodes reach the same bytes
    copy.write_bytes(tick_disk.read_bytes())
    return copy


@pytest.fixture
def cluster(kube_api_double, make_kube_store, disk, tmp_path, caplog):
    """The controller (its loop, pods/exec, hooks that leave a file each), the kubelet, a user's store."""
    caplog.set_level(logging.DEBUG, logger="pvlun")
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    ctx, loop = start_controller(make_kube_store, migration_port=free_port(), migration_hooks=[
        ("pre", f"touch {hooks}/pre-{{vm}}-{{source}}-{{target}}"),
        ("post", f"touch {hooks}/post-{{namespace}}-{{vm}}-{{target}}"),
        ("failed", f"{sys.executable} -c 'import sys; open(sys.argv[1], \"wb\").write(sys.stdin.buffer.read())' "
                   f"{hooks}/failed-{{vm}}")])
    kubelet = LauncherKubelet(kube_api_double, NS, tmp_path / "pods", disk).start()
    user = make_kube_store()
    user.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
    try:
        yield user, kubelet, hooks
    finally:
        stop_controller(ctx, loop)
        kubelet.stop()


def run_tick_vm(double, store, kubelet) -> tuple[dict, str]:
    """The tick VM running in its launcher Pod, ticking: (its VMI, the Pod's name)."""
    apply_tick_vm(double, store)
    vmi = wait_until(lambda: running_vmi(store), 20.0)
    source = next(iter(kubelet.processes))
    kubelet.wait_for_ticks(source, 3)
    return vmi, source


def test_a_migration_moves_the_guest_to_the_target_pod_and_the_vmi_follows_it(cluster, kube_api_double, caplog):
    store, kubelet, hooks = cluster
    vmi, source = run_tick_vm(kube_api_double, store, kubelet)
    assert vmi["status"]["nodeName"] == "node-a"
    migrate(store, "move")

    mig = finished(store, kubelet, "move")
    assert mig["phase"] == "Succeeded", mig
    target = next(name for name in kubelet.processes if name != source)
    state = mig["migrationState"]
    assert state["completed"] is True and state["failed"] is False and state["mode"] == "PreCopy"
    assert (state["sourceNode"], state["targetNode"], state["sourcePod"], state["targetPod"]) == (
        "node-a", "node-b", source, target)
    assert state["startTimestamp"] <= state["endTimestamp"] and state["targetNodeAddress"] == "127.0.0.1"
    seen = [t["phase"] for t in mig["phaseTransitionTimestamps"]]
    assert seen[0] == "Scheduling" and seen[-3:] == ["TargetReady", "Running", "Succeeded"]
    assert seen == sorted(seen, key=PHASES.index)  # in KubeVirt's order (a quick kubelet may skip one)
    assert mig["totalTimeMs"] > 0 and 0 <= mig["downtimeMs"] < 5000

    vmi = store.get("VirtualMachineInstance", "tick", NS)
    target_pod = store.get("Pod", target, NS)
    assert vmi["status"]["phase"] == "Running" and vmi["status"]["nodeName"] == "node-b"
    assert vmi["status"]["activePods"] == {target_pod["metadata"]["uid"]: "node-b"}
    assert vmi["status"]["migrationState"] == state
    assert wait_until(lambda: store.get("Pod", source, NS) is None)  # the finished source Pod is deleted
    assert kubelet.processes[source].proc.wait(15) == 0  # its launcher ended once the target had the guest
    last = kubelet.ticks(source)[-1]
    carried_on = kubelet.wait_for_ticks(target, 3)
    assert carried_on[:3] == [last + 1, last + 2, last + 3]  # the same guest counting on, no reboot
    assert "PVLUN-BOOT" not in kubelet.processes[target].stdout()
    time.sleep(1.0)  # the source Pod's end and deletion have been seen: the VMI still runs, on the target
    assert status_of(store, "VirtualMachineInstance", "tick")["phase"] == "Running"
    assert status_of(store, "VirtualMachine", "tick")["printableStatus"] == "Running"
    assert kubelet.processes[target].proc.poll() is None

    assert sorted(p.name for p in hooks.iterdir()) == ["post-vms-tick-node-b", "pre-tick-node-a-node-b"]
    token = kubelet.tokens[0]
    assert token_secret(kube_api_double, store.get(VMIM, "move", NS))[0] == 404  # it goes with the stream
    said = json.dumps([store.get(VMIM, "move", NS),
                       store.get("VirtualMachineInstance", "tick", NS), kube_api_double.execs,
                       kube_api_double.requests, kube_api_double.call("GET", "/apis/events.k8s.io/v1/events")])
    assert token not in said and token not in caplog.text  # nor in an argv, a status, an event or a log
    calls = {classify(*request) for request, agent in zip(kube_api_double.requests, kube_api_double.agents)
             if agent == CONTROLLER_AGENT or request[1].endswith("/exec")}  # a websocket exec carries no agent
    assert {("", "secrets", "create", NS), ("", "secrets", "delete", NS), ("", "pods/exec", "get", NS)} <= calls
    assert not [c for c in calls if c[1] == "secrets" and c[2] in ("get", "list", "watch")]
    assert sorted(c for c in calls if not allowed(*rules(), *c)) == []  # deploy/full's RBAC allows every call


def test_a_vmi_applied_alone_migrates_as_a_vms_does(cluster, kube_api_double):
    """A VirtualMachineInstanceMigration names the VMI, whoever made it: one alone moves too."""
    store, kubelet, _ = cluster
    apply_tick_vm(kube_api_double, store, alone=True)
    assert wait_until(lambda: running_vmi(store), 20.0)["metadata"].get("ownerReferences") is None
    source = next(iter(kubelet.processes))
    kubelet.wait_for_ticks(source, 3)
    migrate(store, "move-alone")
    assert finished(store, kubelet, "move-alone")["phase"] == "Succeeded"
    target = next(name for name in kubelet.processes if name != source)
    vmi = store.get("VirtualMachineInstance", "tick", NS)
    assert vmi["status"]["phase"] == "Running" and vmi["status"]["nodeName"] == "node-b"
    last = kubelet.ticks(source)[-1]
    assert kubelet.wait_for_ticks(target, 3)[:3] == [last + 1, last + 2, last + 3]  # the same guest, on
    assert store.get("VirtualMachine", "tick", NS) is None


def test_a_target_that_expects_another_token_fails_the_migration_and_the_guest_stays(cluster, kube_api_double):
    store, kubelet, hooks = cluster
    vmi, source = run_tick_vm(kube_api_double, store, kubelet)
    kubelet.wrong_token = "x" * 43  # as long as a real one (secrets.token_urlsafe(32))
    migrate(store, "refused")
    mig = finished(store, kubelet, "refused")
    assert mig["phase"] == "Failed" and "refused the stream (a wrong migration token" in mig["error"], mig
    assert mig["migrationState"]["failed"] is True and mig["migrationState"]["failureReason"] == mig["error"]
    target = next(name for name in kubelet.processes if name != source)
    assert wait_until(lambda: store.get("Pod", target, NS) is None)  # the target Pod goes
    assert any("wrong header or token" in e.get("message", "") for e in kubelet.events(target)), (mig, kubelet.events(target))
    vmi = store.get("VirtualMachineInstance", "tick", NS)
    assert vmi["status"]["phase"] == "Running" and vmi["status"]["nodeName"] == "node-a"
    assert list(vmi["status"]["activePods"].values()) == ["node-a"]
    now = kubelet.ticks(source)[-1]
    assert kubelet.wait_for_ticks(source, now + 2)[-1] >= now + 2  # the source runs on
    assert kubelet.processes[source].proc.poll() is None
    failed = json.loads((hooks / "failed-tick").read_text())  # the failed hook got the migration's state
    assert failed["event"] == "failed" and failed["error"] == mig["error"] and failed["targetNode"] == "node-b"
    assert not (hooks / "post-vms-tick-node-b").exists()


def test_deleting_a_migration_in_flight_aborts_it_and_the_guest_stays(cluster, kube_api_double):
    """KubeVirt's abort: the stream (to a target that takes it and never reads) is cancelled in
    the source, which runs on; the target Pod and the token go, then the migration itself."""
    store, kubelet, hooks = cluster
    _, source = run_tick_vm(kube_api_double, store, kubelet)
    kubelet.stall_targets = True
    migrate(store, "stuck")
    wait_until(lambda: any(e.get("phase") == "Migrating" for e in kubelet.events(source)))
    assert status_of(store, VMIM, "stuck")["phase"] == "Running"
    mig = store.get(VMIM, "stuck", NS)
    target = next(name for name in kubelet.processes if name != source)
    store.delete(VMIM, "stuck", NS)
    assert wait_until(lambda: store.get(VMIM, "stuck", NS) is None)
    assert store.get("Pod", target, NS) is None
    assert token_secret(kube_api_double, mig)[0] == 404
    vmi = store.get("VirtualMachineInstance", "tick", NS)
    state = vmi["status"]["migrationState"]
    assert vmi["status"]["phase"] == "Running" and vmi["status"]["nodeName"] == "node-a"
    assert (state["failed"], state["abortRequested"], state["abortStatus"]) == (True, True, "Succeeded")
    assert "migration cancelled" in state["failureReason"]
    assert {"phase": "Running", "reason": "migration ended, running"}.items() <= kubelet.events(source)[-1].items()
    now = kubelet.ticks(source)[-1]
    assert kubelet.wait_for_ticks(source, now + 2)[-1] >= now + 2 and kubelet.processes[source].proc.poll() is None
    assert json.loads((hooks / "failed-tick").read_text())["error"] == state["failureReason"]
