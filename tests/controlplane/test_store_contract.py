"""The ObjectStore contract: what the reconcile functions may count on, on every store.

Run against SQLiteStore (embedded mode), KubeStore on the Kubernetes API server test double,
and KubeStore on a real cluster when PVLUN_TEST_KUBECONFIG names a kubeconfig (in a
throwaway namespace; only kinds every cluster serves: ConfigMap, Service, StorageClass).

Where the stores differ, the test says so: SQLiteStore has no optimistic concurrency (its
writes are transactions, the given resourceVersion is not checked, so the last write wins),
while KubeStore's writes carry the resourceVersion and raise Conflict when it is stale.
Another client's change reaches a KubeStore through its watch, so reads of it are eventual.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import pytest

from controlplane.kube_store import KubeStore
from controlplane.store import Conflict, ObjectStore, SQLiteStore, remove_finalizer

FINALIZER = "pvlun.dev/contract"
CONDITION = {"type": "Ready", "status": "True", "reason": "Contract", "message": "written through /status",
             "lastTransitionTime": "2024-01-01T00:00:00Z"}


@dataclass
class Backend:
    name: str
    store: ObjectStore
    ns: str
    other: Callable[[], ObjectStore]  # a second client of the same objects
    kube: bool = False
    cluster_scoped: list[tuple[str, str]] = field(default_factory=list)  # to delete at the end

    def eventually(self, check: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = check()
            if value or time.monotonic() > deadline:
                assert value, f"{self.name}: timed out waiting for {what}"
                return value
            time.sleep(0.02)


def _kube_backend(name: str, make: Callable[..., KubeStore]) -> tuple[Backend, Callable[[], None]]:
    ns = f"contract-{uuid.uuid4().hex[:8]}"
    store = make(namespace=ns, watch_namespace=ns)
    store.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    backend = Backend(name, store, ns, lambda: make(namespace=ns, watch_namespace=ns), kube=True)

    def cleanup() -> None:
        for kind, obj_name in backend.cluster_scoped:
            store.delete(kind, obj_name, "")
        store.delete("Namespace", ns, "")

    return backend, cleanup


@contextmanager
def open_backend(name: str, request, tmp_path) -> Iterator[Backend]:
    if name == "sqlite":
        path = str(tmp_path / "catalog.db")
        opened = [SQLiteStore(path)]

        def other() -> SQLiteStore:
            opened.append(SQLiteStore(path))
            return opened[-1]

        try:
            yield Backend("sqlite", opened[0], "contract", other)
        finally:
            for store in opened:
                store.close()
        return
    if name == "double":
        backend, cleanup = _kube_backend("double", request.getfixturevalue("make_kube_store"))
        try:
            yield backend
        finally:
            cleanup()
        return
    kubeconfig = os.environ.get("PVLUN_TEST_KUBECONFIG")
    if not kubeconfig:
        pytest.skip("PVLUN_TEST_KUBECONFIG is not set")
    stores: list[KubeStore] = []

    def make(**options: Any) -> KubeStore:
        stores.append(KubeStore.from_kubeconfig(kubeconfig, **options))
        return stores[-1]

    backend, cleanup = _kube_backend("cluster", make)
    try:
        yield backend
    finally:
        cleanup()
        for store in stores:
            store.stop()


@pytest.fixture(params=["sqlite", "double", "cluster"])
def backend(request, tmp_path) -> Iterator[Backend]:
    with open_backend(request.param, request, tmp_path) as opened:
        yield opened


@pytest.fixture(params=["double", "cluster"])
def kube_backend(request, tmp_path) -> Iterator[Backend]:
    """The KubeStore backends, for what only they promise (optimistic concurrency)."""
    with open_backend(request.param, request, tmp_path) as opened:
        yield opened


def config_map(ns: str, name: str, **extra: Any) -> dict:
    meta = {"name": name, "namespace": ns, **extra.pop("metadata", {})}
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, **extra}


def service(ns: str, name: str, app: str) -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns},
            "spec": {"selector": {"app": app}, "ports": [{"port": 80, "protocol": "TCP", "targetPort": 8080}]}}


def test_created_objects_are_read_back_and_listed_by_namespace(backend):
    store, ns = backend.store, backend.ns
    b = store.apply(config_map(ns, "b", data={"k": "2"}))
    a = store.apply(config_map(ns, "a", data={"k": "1"}))
    assert a["metadata"]["uid"] and a["metadata"]["creationTimestamp"] and a["metadata"]["resourceVersion"]
    assert a["metadata"]["uid"] != b["metadata"]["uid"]
    got = store.get("ConfigMap", "a", ns)
    assert got["data"] == {"k": "1"} and got["metadata"]["uid"] == a["metadata"]["uid"]
    assert [o["metadata"]["name"] for o in store.list("ConfigMap", ns)] == ["a", "b"]
    assert store.get("ConfigMap", "missing", ns) is None
    assert store.list("ConfigMap", "elsewhere") == []


def test_cluster_scoped_objects_ignore_the_namespace(backend):
    store, name = backend.store, f"{backend.ns}-class"
    backend.cluster_scoped.append(("StorageClass", name))
    store.apply({"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass", "metadata": {"name": name},
                 "provisioner": "contract.pvlun.dev", "reclaimPolicy": "Delete"})
    assert store.get("StorageClass", name, "anywhere")["provisioner"] == "contract.pvlun.dev"
    assert "namespace" not in store.get("StorageClass", name, "")["metadata"]
    assert name in [o["metadata"]["name"] for o in store.list("StorageClass")]


def test_an_update_keeps_the_identity_and_an_unchanged_merge_writes_nothing(backend):
    store, ns = backend.store, backend.ns
    first = store.apply(config_map(ns, "c", data={"k": "1"}))
    second = store.apply(config_map(ns, "c", data={"k": "2"}))
    assert second["metadata"]["uid"] == first["metadata"]["uid"]
    assert second["metadata"]["creationTimestamp"] == first["metadata"]["creationTimestamp"]
    assert second["metadata"]["resourceVersion"] != first["metadata"]["resourceVersion"]
    assert store.get("ConfigMap", "c", ns)["data"] == {"k": "2"}
    # an apply whose merge changes nothing (`pvlun apply` of the same manifest) writes nothing
    again = store.apply(config_map(ns, "c", data={"k": "2"}), merge=lambda stored, new: stored)
    assert again["metadata"]["resourceVersion"] == second["metadata"]["resourceVersion"]
    assert store.get("ConfigMap", "c", ns)["metadata"]["resourceVersion"] == second["metadata"]["resourceVersion"]


def test_a_write_based_on_a_stale_resource_version_is_refused(kube_backend):
    store, ns = kube_backend.store, kube_backend.ns
    stale = store.apply(config_map(ns, "d", data={"k": "1"}))
    other = kube_backend.other()
    other.apply(config_map(ns, "d", data={"k": "theirs"}))
    stale["data"] = {"k": "mine"}
    with pytest.raises(Conflict, match="ConfigMap .*d"):
        store.apply(stale)
    kube_backend.eventually(lambda: store.get("ConfigMap", "d", ns)["data"] == {"k": "theirs"}, "the other write")
    assert other.get("ConfigMap", "d", ns)["data"] == {"k": "theirs"}


def test_sqlite_store_writes_are_last_write_wins(tmp_path):
    """What SQLiteStore does instead (documented, not a KubeStore rule): its writes are
    transactions and the given resourceVersion is not checked."""
    store, other = SQLiteStore(str(tmp_path / "catalog.db")), SQLiteStore(str(tmp_path / "catalog.db"))
    try:
        stale = store.apply(config_map("contract", "d", data={"k": "1"}))
        other.apply(config_map("contract", "d", data={"k": "theirs"}))
        stale["data"] = {"k": "mine"}
        assert store.apply(stale)["data"] == {"k": "mine"}
    finally:
        store.close()
        other.close()


def test_status_writes_leave_the_spec_and_spec_writes_leave_the_status(backend):
    store, ns = backend.store, backend.ns
    store.apply(service(ns, "web", "a"))
    store.merge_status("Service", "web", ns, conditions=[CONDITION])
    svc = store.get("Service", "web", ns)
    assert svc["spec"]["selector"] == {"app": "a"} and svc["status"]["conditions"][0]["reason"] == "Contract"

    other = backend.other()  # another client changes the spec; a status write after it keeps it
    backend.eventually(lambda: other.get("Service", "web", ns), "the service on the other client")
    other.patch_spec("Service", "web", ns, selector={"app": "b"})
    backend.eventually(lambda: store.get("Service", "web", ns)["spec"]["selector"] == {"app": "b"}, "the new spec")
    store.merge_status("Service", "web", ns, conditions=[dict(CONDITION, message="again")])
    svc = store.get("Service", "web", ns)
    assert svc["spec"]["selector"] == {"app": "b"} and svc["status"]["conditions"][0]["message"] == "again"

    store.patch_spec("Service", "web", ns, selector={"app": "c"})
    meta = {k: v for k, v in svc["metadata"].items() if k != "resourceVersion"}  # no version: the stored one
    applied = store.apply(dict(service(ns, "web", "d"), metadata=meta))
    for seen in (applied, store.get("Service", "web", ns)):
        assert seen["spec"]["selector"] == {"app": "d"} and seen["status"]["conditions"][0]["message"] == "again"


def test_update_status_replaces_the_whole_status(backend):
    store, ns = backend.store, backend.ns
    store.apply(service(ns, "svc", "a"))
    store.merge_status("Service", "svc", ns, conditions=[CONDITION])
    status = dict(store.get("Service", "svc", ns)["status"], conditions=[dict(CONDITION, type="Other")])
    store.update_status("Service", "svc", ns, status)
    assert [c["type"] for c in store.get("Service", "svc", ns)["status"]["conditions"]] == ["Other"]
    assert store.get("Service", "svc", ns)["spec"]["selector"] == {"app": "a"}
    assert store.update_status("Service", "missing", ns, status) is None


def test_finalizers_hold_a_deletion_until_they_are_removed(backend):
    store, ns = backend.store, backend.ns
    store.apply(config_map(ns, "held", metadata={"finalizers": [FINALIZER]}, data={"k": "1"}))
    assert store.delete("ConfigMap", "held", ns) is True
    held = store.get("ConfigMap", "held", ns)
    assert held["metadata"]["deletionTimestamp"] and held["metadata"]["finalizers"] == [FINALIZER]
    assert store.delete("ConfigMap", "held", ns) is True  # again: still only marked
    assert store.get("ConfigMap", "held", ns)["metadata"]["finalizers"] == [FINALIZER]
    remove_finalizer(store, held, FINALIZER)
    assert store.get("ConfigMap", "held", ns) is None
    other = backend.other()
    backend.eventually(lambda: other.get("ConfigMap", "held", ns) is None and other.list("ConfigMap", ns) == [],
                       "the other client to see it gone")


def test_delete_says_whether_there_was_an_object(backend):
    store, ns = backend.store, backend.ns
    store.apply(config_map(ns, "e"))
    assert store.delete("ConfigMap", "e", ns) is True
    assert store.get("ConfigMap", "e", ns) is None
    assert store.delete("ConfigMap", "e", ns) is False


def test_create_makes_an_object_once(backend):
    store, ns = backend.store, backend.ns
    made = store.create(config_map(ns, "once", data={"k": "1"}))
    assert made["metadata"]["uid"] and made["data"] == {"k": "1"}
    with pytest.raises(Conflict):
        store.create(config_map(ns, "once", data={"k": "2"}))
    assert store.get("ConfigMap", "once", ns)["data"] == {"k": "1"}
    assert store.delete("ConfigMap", "once", ns) is True


def test_owner_references_are_kept_as_given(backend):
    store, ns = backend.store, backend.ns
    owner = store.apply(config_map(ns, "owner"))
    refs = [{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner["metadata"]["uid"],
             "controller": True, "blockOwnerDeletion": False}]
    store.apply(config_map(ns, "owned", metadata={"ownerReferences": refs}, data={"k": "1"}))
    assert store.get("ConfigMap", "owned", ns)["metadata"]["ownerReferences"] == refs
    store.patch_metadata("ConfigMap", "owned", ns, labels={"a": "b"})
    store.annotate("ConfigMap", "owned", ns, note="x")
    store.apply(config_map(ns, "owned", metadata={"ownerReferences": refs, "labels": {"a": "b"}}, data={"k": "2"}))
    got = store.get("ConfigMap", "owned", ns)
    assert got["metadata"]["ownerReferences"] == refs and got["metadata"]["labels"] == {"a": "b"}


def test_metadata_patches_set_and_remove(backend):
    store, ns = backend.store, backend.ns
    store.apply(config_map(ns, "m", metadata={"labels": {"a": "1", "b": "2"}, "annotations": {"x": "1"}}))
    store.patch_metadata("ConfigMap", "m", ns, labels={"a": "3"})
    store.annotate("ConfigMap", "m", ns, x=None, y="2")
    meta = store.get("ConfigMap", "m", ns)["metadata"]
    assert meta["labels"] == {"a": "3"} and meta.get("annotations") in ({"y": "2"},)
    assert store.patch_metadata("ConfigMap", "missing", ns, labels={}) is None
    assert store.annotate("ConfigMap", "missing", ns, x="1") is None


def test_the_same_event_twice_is_one_event_counted_twice(backend):
    store, ns = backend.store, backend.ns
    obj = store.apply(config_map(ns, "ev"))
    store.add_event(obj, "Warning", "Failing", "it failed")
    store.add_event(obj, "Warning", "Failing", "it failed")
    store.add_event(obj, "Normal", "Fine", "it works")
    events = {e["reason"]: e for e in store.events(obj)}
    assert {r: (e["type"], e["message"], e["count"]) for r, e in events.items()} == {
        "Failing": ("Warning", "it failed", 2), "Fine": ("Normal", "it works", 1)}
    assert events["Failing"]["time"] >= events["Failing"]["firstTime"]
    assert store.delete("ConfigMap", "ev", ns)
    namesake = store.apply(config_map(ns, "ev"))  # a new object of the same name has none of them
    assert store.events(namesake) == []


def test_wait_for_change_wakes_on_another_clients_write(backend):
    store, ns = backend.store, backend.ns
    store.list("ConfigMap", ns)  # what a watcher does first (a KubeStore watches the kinds it read)
    since = store.version()
    other = backend.other()
    threading.Timer(0.2, lambda: other.apply(config_map(ns, "theirs"))).start()
    started = time.monotonic()
    assert store.wait_for_change(since, timeout=10) != since
    assert time.monotonic() - started < 5
    seen: set = set()

    def changed() -> bool:
        nonlocal since
        since, keys = store.changes_since(since)
        seen.update(keys or [])
        return ("ConfigMap", ns, "theirs") in seen

    backend.eventually(changed, "the change to be listed")
    assert store.get("ConfigMap", "theirs", ns) is not None


def test_changes_since_lists_each_changed_object_once(backend):
    store, ns = backend.store, backend.ns
    store.list("ConfigMap", ns)
    since = store.version()
    for i in range(3):
        store.apply(config_map(ns, "busy", data={"i": str(i)}))
    store.apply(config_map(ns, "quiet"))
    keys: list = []

    def both() -> bool:
        nonlocal since
        since, new = store.changes_since(since)
        keys.extend(new or [])
        return {("ConfigMap", ns, "busy"), ("ConfigMap", ns, "quiet")} <= set(keys)

    backend.eventually(both, "both changes")
    version, none = store.changes_since(since)
    assert version == since and none == []
