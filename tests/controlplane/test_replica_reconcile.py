"""The VirtualMachinePool and VirtualMachineInstanceReplicaSet reconciles on an embedded store,
no guest booted (VMI phases set by hand, as the VM and VMI controllers would): what a hostile
review found — a replica set whose VMIs fail at once must back off, not churn."""

from __future__ import annotations

import pytest

from controlplane.context import Context
from controlplane.store import SQLiteStore
from virt import replica_backoff
from virt.vmi_replica_sets import reconcile_vmi_replica_set

NS = "default"
VMI_SPEC = {"domain": {"memory": {"guest": "64Mi"}, "devices": {"disks": [{"name": "root", "disk": {"bus": "virtio"}}]}},
            "volumes": [{"name": "root", "containerDisk": {"image": "127.0.0.1:1/nothing/here:1"}}]}


@pytest.fixture
def ctx(tmp_path):
    store = SQLiteStore(str(tmp_path / "objects.db"))
    yield Context(store, None, str(tmp_path / "data"), ["node-1"])
    store.close()


@pytest.fixture
def clock(monkeypatch):
    """The backoff's clock, moved on by hand."""
    now = [1000.0]
    monkeypatch.setattr(replica_backoff, "clock", lambda: now[0])
    return now


def apply_rs(ctx: Context, name: str, replicas: int) -> dict:
    labels = {"kubevirt.io/vmReplicaSet": name}
    return ctx.store.apply({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstanceReplicaSet",
                            "metadata": {"name": name, "namespace": NS},
                            "spec": {"replicas": replicas, "selector": {"matchLabels": labels},
                                     "template": {"metadata": {"labels": labels}, "spec": VMI_SPEC}}})


def reconcile_rs(ctx: Context, name: str) -> float | None:
    return reconcile_vmi_replica_set(ctx, ctx.store.get("VirtualMachineInstanceReplicaSet", name, NS))


def vmi_names(ctx: Context) -> set[str]:
    return {v["metadata"]["name"] for v in ctx.store.list("VirtualMachineInstance", NS)}


def set_phase(ctx: Context, names: set[str], phase: str, reason: str = "") -> None:
    for name in names:
        ctx.store.merge_status("VirtualMachineInstance", name, NS, phase=phase, reason=reason)


def replica_failure(ctx: Context, name: str) -> dict | None:
    status = ctx.store.get("VirtualMachineInstanceReplicaSet", name, NS).get("status") or {}
    return next((c for c in status.get("conditions") or [] if c["type"] == "ReplicaFailure"), None)


def test_a_replica_set_whose_vmis_fail_backs_off_exponentially_and_resets_once_they_run(ctx, clock):
    apply_rs(ctx, "churn", 2)
    assert reconcile_rs(ctx, "churn") is None
    first = vmi_names(ctx)
    assert len(first) == 2
    set_phase(ctx, first, "Failed", "image 127.0.0.1:1/nothing/here:1 cannot be pulled")

    waits = [reconcile_rs(ctx, "churn") for _ in range(20)]  # the failed ones go; nothing new for 10 s
    assert vmi_names(ctx) == set()
    assert all(w is not None and 0 < w <= 10 for w in waits)
    condition = replica_failure(ctx, "churn")
    assert condition["reason"] == "FailedCreate"
    assert "2 VMIs in a row" in condition["message"] and "cannot be pulled" in condition["message"]
    assert "10 s" in condition["message"]
    warnings = [e for e in ctx.store.events(ctx.store.get("VirtualMachineInstanceReplicaSet", "churn", NS))
                if e.get("type") == "Warning"]
    assert len(warnings) == 1  # one event per failure seen, not per pass

    clock[0] += 10.5
    reconcile_rs(ctx, "churn")
    second = vmi_names(ctx)
    assert len(second) == 2 and not second & first
    set_phase(ctx, second, "Failed", "again")
    assert 30 < reconcile_rs(ctx, "churn") <= 40  # 4 failures in a row: 40 s
    clock[0] += 39
    assert reconcile_rs(ctx, "churn") > 0 and vmi_names(ctx) == set()

    for _ in range(10):  # capped at 300 s however many fail
        clock[0] += 301
        reconcile_rs(ctx, "churn")
        set_phase(ctx, vmi_names(ctx), "Failed", "again")
    assert 0 < reconcile_rs(ctx, "churn") <= 300
    clock[0] += 300
    reconcile_rs(ctx, "churn")
    set_phase(ctx, vmi_names(ctx), "Running")  # they run: the failures are forgotten
    assert reconcile_rs(ctx, "churn") is None
    assert replica_failure(ctx, "churn") is None

    set_phase(ctx, set(sorted(vmi_names(ctx))[:1]), "Succeeded")  # one ends: replaced after the first delay, 5 s
    assert 0 < reconcile_rs(ctx, "churn") <= 5
    assert len(vmi_names(ctx)) == 1
    clock[0] += 5
    reconcile_rs(ctx, "churn")
    assert len(vmi_names(ctx)) == 2
