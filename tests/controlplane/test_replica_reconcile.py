"""The VirtualMachinePool and VirtualMachineInstanceReplicaSet reconciles on an embedded store,
no guest booted (VMI phases set by hand, as the VM and VMI controllers would): what a hostile
review found — a replica set whose VMIs fail at once must back off, not churn; a pool VM never
takes a DataVolume it does not own; the pool writes only VMs `pvlun apply` would take."""

from __future__ import annotations

import pytest

from controlplane.admission import admit, check_labels
from controlplane.context import Context
from controlplane.replica_specs import REVISION_LABEL
from controlplane.store import SQLiteStore
from virt import replica_backoff
from virt.vm_pools import reconcile_vm_pool, revision_name
from virt.vmi_replica_sets import reconcile_vmi_replica_set

NS = "default"
VMI_SPEC = {"domain": {"memory": {"guest": "64Mi"},
                       "devices": {"disks": [{"name": "root", "disk": {"bus": "virtio"}}]}},
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


def apply_pool(ctx: Context, name: str, replicas: int, disk: str = "coll") -> dict:
    """A pool of stopped VMs with one dataVolumeTemplate `disk`, admitted as `pvlun apply` would."""
    labels = {"kubevirt.io/vmpool": name}
    vm_spec = {"runStrategy": "Halted",
               "dataVolumeTemplates": [{"metadata": {"name": disk},
                                        "spec": {"source": {"blank": {}},
                                                 "storage": {"resources": {"requests": {"storage": "1Mi"}}}}}],
               "template": {"metadata": {"labels": labels},
                            "spec": {**VMI_SPEC, "volumes": [{"name": "root", "dataVolume": {"name": disk}}]}}}
    pool = admit({"apiVersion": "pool.kubevirt.io/v1beta1", "kind": "VirtualMachinePool",
                  "metadata": {"name": name, "namespace": NS},
                  "spec": {"replicas": replicas, "selector": {"matchLabels": labels},
                           "virtualMachineTemplate": {"metadata": {"labels": labels}, "spec": vm_spec}}}, "test")
    return ctx.store.apply(pool)


def reconcile_pool(ctx: Context, name: str) -> float | None:
    return reconcile_vm_pool(ctx, ctx.store.get("VirtualMachinePool", name, NS))


def pool_vms(ctx: Context) -> dict[str, dict]:
    return {vm["metadata"]["name"]: vm for vm in ctx.store.list("VirtualMachine", NS)}


def pool_failure(ctx: Context, name: str) -> dict | None:
    status = ctx.store.get("VirtualMachinePool", name, NS).get("status") or {}
    return next((c for c in status.get("conditions") or [] if c["type"] == "ReplicaFailure"), None)


def data_volume(ctx: Context, name: str) -> dict:
    return ctx.store.apply({"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
                            "metadata": {"name": name, "namespace": NS},
                            "spec": {"source": {"blank": {}},
                                     "storage": {"resources": {"requests": {"storage": "1Mi"}}}}})


def test_a_pool_skips_an_index_whose_data_volume_someone_else_has(ctx):
    data_volume(ctx, "coll-0")
    apply_pool(ctx, "c", 1)
    reconcile_pool(ctx, "c")
    vm = pool_vms(ctx)["c-1"]  # c-0 would have run on coll-0, which is not its own
    assert set(pool_vms(ctx)) == {"c-1"}
    assert [t["metadata"]["name"] for t in vm["spec"]["dataVolumeTemplates"]] == ["coll-1"]
    assert not ctx.store.get("DataVolume", "coll-0", NS)["metadata"].get("ownerReferences")


def test_a_pool_update_onto_a_data_volume_someone_else_has_fails_naming_it(ctx):
    apply_pool(ctx, "u", 1)
    reconcile_pool(ctx, "u")
    data_volume(ctx, "other-0")
    apply_pool(ctx, "u", 1, disk="other")
    assert reconcile_pool(ctx, "u") == 10.0
    failure = pool_failure(ctx, "u")
    assert failure["reason"] == "FailedUpdate"
    assert "DataVolume default/other-0 exists and is not owned by VM u-0" in failure["message"]
    assert pool_vms(ctx)["u-0"]["spec"]["dataVolumeTemplates"][0]["metadata"]["name"] == "coll-0"


def test_a_pool_writes_no_vm_apply_would_refuse(ctx):
    apply_pool(ctx, "p", 11)
    reconcile_pool(ctx, "p")
    assert len(pool_vms(ctx)) == 11
    long_disk = "d" * 251  # admission checks p-0's DataVolume, d...d-0: 253 characters, allowed
    apply_pool(ctx, "p", 11, disk=long_disk)
    assert reconcile_pool(ctx, "p") == 10.0
    failure = pool_failure(ctx, "p")
    assert failure["reason"] == "FailedUpdate" and "VirtualMachine 'p-10' is invalid" in failure["message"]
    assert "dataVolume.name" in failure["message"] and "at most 253" in failure["message"]
    assert pool_vms(ctx)["p-10"]["spec"]["dataVolumeTemplates"][0]["metadata"]["name"] == "coll-10"

    apply_pool(ctx, "p", 12, disk="coll")  # scale out onto p-11, then the same long name: refused
    reconcile_pool(ctx, "p")
    apply_pool(ctx, "p", 13, disk=long_disk)
    reconcile_pool(ctx, "p")
    assert "p-12" not in pool_vms(ctx)
    assert pool_failure(ctx, "p")["reason"] == "FailedScaleOut"


def test_a_pool_revision_name_is_always_a_label_value(ctx):
    name = "n" * 61
    for generation in (1, 9, 10, 12345):
        revision = revision_name({"metadata": {"name": name, "generation": generation}})
        check_labels({REVISION_LABEL: revision})
        assert revision.endswith(f"-{generation}")
    assert revision_name({"metadata": {"name": "short", "generation": 3}}) == "short-3"  # KubeVirt's own name
    assert revision_name({"metadata": {"name": name + "a", "generation": 10}}) != \
        revision_name({"metadata": {"name": name + "b", "generation": 10}})

    apply_pool(ctx, name, 1)
    for replicas in range(2, 11):  # generation 10
        apply_pool(ctx, name, replicas)
    assert ctx.store.get("VirtualMachinePool", name, NS)["metadata"]["generation"] == 10
    reconcile_pool(ctx, name)
    assert pool_failure(ctx, name) is None
    for vm in pool_vms(ctx).values():
        check_labels(vm["metadata"]["labels"])


def test_a_pool_whose_vm_fails_leaves_it_to_the_vm_controller(ctx):
    """A pool replaces no VM whose VMI failed (the VM controller's CrashLoopBackOff bounds its
    restarts): passes after the first write nothing."""
    apply_pool(ctx, "f", 1)
    reconcile_pool(ctx, "f")
    vm = pool_vms(ctx)["f-0"]
    ctx.store.apply({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
                     "metadata": {"name": "f-0", "namespace": NS, "ownerReferences": [
                         {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "name": "f-0",
                          "uid": vm["metadata"]["uid"], "controller": True}]}, "spec": VMI_SPEC})
    set_phase(ctx, {"f-0"}, "Failed", "image cannot be pulled")
    reconcile_pool(ctx, "f")
    version = ctx.store.version()
    assert all(reconcile_pool(ctx, "f") is None for _ in range(20))
    assert ctx.store.version() == version
    assert pool_vms(ctx)["f-0"]["metadata"]["uid"] == vm["metadata"]["uid"]


def test_vms_and_vmis_relabelled_out_of_the_selector_are_released(ctx, clock):
    apply_pool(ctx, "r", 2)
    reconcile_pool(ctx, "r")
    ctx.store.patch_metadata("VirtualMachine", "r-1", NS, labels={"kubevirt.io/vmpool": "elsewhere"})
    reconcile_pool(ctx, "r")  # r-1 released and not counted: a new VM takes its place
    assert not pool_vms(ctx)["r-1"]["metadata"]["ownerReferences"]
    assert set(pool_vms(ctx)) == {"r-0", "r-1", "r-2"}
    assert ctx.store.get("VirtualMachinePool", "r", NS)["status"]["replicas"] == 2
    assert ctx.store.get("VirtualMachine", "r-2", NS)["metadata"]["ownerReferences"][0]["kind"] == "VirtualMachinePool"

    apply_rs(ctx, "s", 1)
    reconcile_rs(ctx, "s")
    (first,) = vmi_names(ctx)
    ctx.store.patch_metadata("VirtualMachineInstance", first, NS, labels={"debug": "me"})
    reconcile_rs(ctx, "s")
    assert not ctx.store.get("VirtualMachineInstance", first, NS)["metadata"]["ownerReferences"]
    assert len(vmi_names(ctx)) == 2
    assert ctx.store.get("VirtualMachineInstanceReplicaSet", "s", NS)["status"]["replicas"] == 1
