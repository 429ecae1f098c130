"""KubeStore against the Kubernetes API server test double, where a real server cannot be
made to misbehave on cue: watches cut, history compacted (410), resources not served, an
object changed behind a stale cache. The ObjectStore contract itself is
test_store_contract.py."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from controlplane.kube_kinds import ApiError
from controlplane.kube_store import KubeConfigError, KubeStore
from controlplane.store import Conflict, now
from pvlun.controllers import ControlLoop

CM = "/api/v1/namespaces/default/configmaps"


def cm(name: str, **extra) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": "default"}, **extra}


def eventually(check, what: str, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    return value


def watching(double, plural: str = "configmaps") -> None:
    eventually(lambda: double.open_watches(plural) >= 1, f"a watch of {plural}")


def changed_keys(store: KubeStore, since: int, want: set) -> set:
    seen: set = set()

    def enough() -> bool:
        nonlocal since
        since, keys = store.changes_since(since)
        assert keys is not None, "the change log lost track"
        seen.update(keys)
        return want <= seen

    eventually(enough, f"changes of {want}")
    return seen


@pytest.mark.parametrize("gone_as_http", [False, True], ids=["error-event", "http-410"])
def test_a_relist_after_410_loses_no_change(kube_api_double, kube_store, gone_as_http):
    double, store = kube_api_double, kube_store
    double.gone_as_http = gone_as_http
    for name in ("kept", "changed", "removed"):
        store.apply(cm(name, data={"v": "1"}))
    informer = store.informer("ConfigMap")
    watching(double)
    since = store.version()
    with double.holding_watches():  # the client's next watch waits: these changes can only come by a relist
        double.drop_watches()
        assert double.call("POST", CM, cm("added"))[0] == 201
        changed = store.get("ConfigMap", "changed")
        assert double.call("PUT", f"{CM}/changed", dict(changed, data={"v": "2"}))[0] == 200
        assert double.call("DELETE", f"{CM}/removed")[0] == 200
        double.expire_history()
    eventually(lambda: informer.lists == 2, "a relist")
    keys = changed_keys(store, since, {("ConfigMap", "default", n) for n in ("added", "changed", "removed")})
    assert ("ConfigMap", "default", "kept") not in keys  # the relist is compared, not announced wholesale
    assert store.get("ConfigMap", "added") and store.get("ConfigMap", "removed") is None
    assert store.get("ConfigMap", "changed")["data"] == {"v": "2"}
    assert [o["metadata"]["name"] for o in store.list("ConfigMap")] == ["added", "changed", "kept"]


def test_a_dropped_watch_resumes_from_its_last_version_without_a_relist(kube_api_double, kube_store):
    double, store = kube_api_double, kube_store
    last = store.apply(cm("a"))
    informer = store.informer("ConfigMap")
    watching(double)
    # the watch itself has delivered "a" (the store's own write is cached at once, the watch's version moves later)
    eventually(lambda: int(informer._rv or 0) >= int(last["metadata"]["resourceVersion"]), "the watch past a")
    with double.holding_watches():
        double.drop_watches()
        double.call("POST", CM, cm("b"))
    eventually(lambda: store.get("ConfigMap", "b"), "the object made while the watch was down")
    assert informer.lists == 1 and double.watches("configmaps") >= 2
    resumed = [q for m, p, q in double.requests if p == "/api/v1/configmaps" and q.get("watch")][-1]
    assert int(resumed["resourceVersion"]) >= int(last["metadata"]["resourceVersion"])


def test_bookmarks_move_the_watch_on_while_nothing_of_its_kind_changes(kube_api_double, kube_store):
    double, store = kube_api_double, kube_store
    double.bookmark_every = 0.1
    store.list("ConfigMap")
    watching(double)
    status, secret = double.call("POST", "/api/v1/namespaces/default/secrets",
                                 {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}})
    assert status == 201
    time.sleep(double.bookmark_every * 3)  # a bookmark or two go by
    double.drop_watches()
    eventually(lambda: double.watches("configmaps") >= 2, "the watch again")
    resumed = [q for m, p, q in double.requests if p == "/api/v1/configmaps" and q.get("watch")][-1]
    assert int(resumed["resourceVersion"]) >= int(secret["metadata"]["resourceVersion"])


def test_a_kind_the_server_does_not_serve_reads_as_empty_and_refuses_writes(kube_api_double, kube_store):
    kube_api_double.unserve("DataVolume")
    assert kube_store.list("DataVolume") == [] and kube_store.get("DataVolume", "dv") is None
    with pytest.raises(ApiError, match="does not serve datavolumes in cdi.kubevirt.io/v1beta1 .*CustomResourceDefinition"):
        kube_store.apply({"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume", "metadata": {"name": "dv"},
                          "spec": {}})


def test_a_write_by_raw_http_wakes_the_watcher(kube_api_double, kube_store):
    kube_store.list("ConfigMap")
    since = kube_store.version()
    threading.Timer(0.1, lambda: kube_api_double.call("POST", CM, cm("raw"))).start()
    assert kube_store.wait_for_change(since, 10) != since
    assert ("ConfigMap", "default", "raw") in changed_keys(kube_store, since, {("ConfigMap", "default", "raw")})


def test_a_status_replacement_on_a_stale_cache_is_a_conflict_and_a_status_merge_is_not(kube_api_double, kube_store):
    double, store = kube_api_double, kube_store
    store.apply({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "c"},
                 "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}})
    watching(double, "persistentvolumeclaims")
    path = "/api/v1/namespaces/default/persistentvolumeclaims/c"
    with double.holding_watches():
        double.drop_watches()  # the cache stops hearing of changes
        theirs = double.call("GET", path)[1]
        theirs["spec"]["volumeName"] = "pv-theirs"
        assert double.call("PUT", path, theirs)[0] == 200
        with pytest.raises(Conflict, match="PersistentVolumeClaim default/c status"):
            store.update_status("PersistentVolumeClaim", "c", "default", {"phase": "Bound"})
        assert store.merge_status("PersistentVolumeClaim", "c", "default", phase="Pending")["status"] == \
            {"phase": "Pending"}
    stored = double.call("GET", path)[1]
    assert stored["spec"]["volumeName"] == "pv-theirs" and stored["status"] == {"phase": "Pending"}


def test_an_apply_with_merge_is_redone_when_someone_writes_in_between(kube_api_double, kube_store):
    double, store = kube_api_double, kube_store
    store.apply(cm("m", data={"a": "1"}))
    calls = []

    def merge(stored, new):
        calls.append(stored["data"])
        if len(calls) == 1:  # another writer gets in between the read and the write
            double.call("PUT", f"{CM}/m", dict(stored, data={"a": "1", "b": "theirs"}))
        return dict(stored, data=dict(stored["data"], c="mine"))

    assert store.apply(cm("m"), merge=merge)["data"] == {"a": "1", "b": "theirs", "c": "mine"}
    assert calls == [{"a": "1"}, {"a": "1", "b": "theirs"}]


def test_marking_deletion_through_patch_metadata_deletes(kube_api_double, kube_store):
    store = kube_store
    store.apply(cm("f", metadata={"name": "f", "finalizers": ["pvlun.dev/x"]}))
    marked = store.patch_metadata("ConfigMap", "f", "default", deletionTimestamp=now())
    assert marked["metadata"]["deletionTimestamp"] and marked["metadata"]["finalizers"] == ["pvlun.dev/x"]
    assert kube_api_double.call("GET", f"{CM}/f")[1]["metadata"]["deletionTimestamp"]


def test_finalizer_patches_are_guarded_by_the_resource_version(kube_api_double, kube_store):
    store = kube_store
    store.apply(cm("g"))
    store.patch_metadata("ConfigMap", "g", "default", finalizers=["pvlun.dev/a"])
    patch = [(p, q) for m, p, q in kube_api_double.requests if m == "PATCH"]
    assert patch and patch[-1][0] == f"{CM}/g"
    assert kube_api_double.call("GET", f"{CM}/g")[1]["metadata"]["finalizers"] == ["pvlun.dev/a"]


def test_reads_outside_the_watched_namespace_go_to_the_server(kube_api_double, make_kube_store):
    double = kube_api_double
    double.call("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "far"}})
    double.call("POST", "/api/v1/namespaces/far/configmaps", cm("x", metadata={"name": "x"}))
    store = make_kube_store(watch_namespace="default")
    assert store.get("ConfigMap", "x", "far")["metadata"]["namespace"] == "far"
    assert [o["metadata"]["name"] for o in store.list("ConfigMap", "far")] == ["x"]
    assert store.list("ConfigMap") == []  # the cache: default only


def test_the_embedded_loop_runs_unchanged_on_a_kube_store(kube_api_double, kube_store):
    seen = []

    def reconcile(ctx, obj):
        seen.append(obj["metadata"]["name"])
        ctx.store.annotate("ConfigMap", obj["metadata"]["name"], "default", reconciled="yes")

    ctx = SimpleNamespace(store=kube_store, stopping=threading.Event())
    loop = ControlLoop(ctx, [("ConfigMap", reconcile)])
    threads = [threading.Thread(target=loop.watch, daemon=True), threading.Thread(target=loop.work, daemon=True)]
    for t in threads:
        t.start()
    try:
        kube_api_double.call("POST", CM, cm("from-someone"))
        eventually(lambda: (kube_store.get("ConfigMap", "from-someone") or {}).get("metadata", {})
                   .get("annotations", {}).get("reconciled") == "yes", "the reconcile")
        assert "from-someone" in seen
    finally:
        ctx.stopping.set()
        loop.queue.shut_down()
        for t in threads:
            t.join(5)


def test_stop_ends_every_informer(kube_api_double, make_kube_store):
    kube_api_double.bookmark_every = 0.1  # the server notices a closed stream when it next writes
    store = make_kube_store()
    store.start(["ConfigMap", "Secret", "PersistentVolume"])
    watching(kube_api_double, "secrets")
    store.stop()
    assert not [t for t in threading.enumerate() if t.name.startswith("informer-") and t.is_alive()]
    assert kube_api_double.open_watches("secrets") == 0 or eventually(
        lambda: kube_api_double.open_watches("secrets") == 0, "the server to see the watch end")


def test_a_wrong_token_is_one_clear_error(kube_api_double, tmp_path):
    path = kube_api_double.write_kubeconfig(str(tmp_path / "kc"))
    text = open(path).read().replace(kube_api_double.token, "wrong")
    open(path, "w").write(text)
    store = KubeStore.from_kubeconfig(path)  # refused: said at once, not after the sync timeout
    try:
        started = time.monotonic()
        with pytest.raises(ApiError, match="cannot list configmaps: .*401 Unauthorized"):
            store.get("ConfigMap", "x")
        assert time.monotonic() - started < 5
    finally:
        store.stop()


def test_the_kubeconfig_is_found_as_kubectl_finds_it(kube_api_double, tmp_path, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", kube_api_double.write_kubeconfig(str(tmp_path / "kc")))
    store = KubeStore.from_kubeconfig(None)
    try:
        assert store.apply(cm("via-env"))["metadata"]["uid"]
    finally:
        store.stop()
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "none"))
    with pytest.raises(KubeConfigError, match="no kubeconfig at .*none"):
        KubeStore.from_kubeconfig(None)
    with pytest.raises(KubeConfigError, match="context"):
        KubeStore.from_kubeconfig(str(tmp_path / "kc"), context="nope")


def test_a_secret_is_created_and_deleted_without_ever_being_read(kube_api_double, kube_store):
    """What the controller's RBAC allows on secrets: create and delete, never get, list or watch."""
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "token", "namespace": "default"},
              "type": "Opaque", "data": {"token": "c2VjcmV0"}}
    assert kube_store.create(secret)["metadata"]["uid"]
    with pytest.raises(Conflict):
        kube_store.create(secret)
    assert kube_store.delete("Secret", "token", "default") is True
    assert kube_store.delete("Secret", "token", "default") is False
    used = {method for method, path, _ in kube_api_double.requests if "/secrets" in path}
    assert used == {"POST", "DELETE"}


def test_names_that_would_reach_another_path_are_refused(kube_store):
    for name in ("..", "a/b", "%2e", ""):
        with pytest.raises(ValueError, match="cannot be an object's name"):
            kube_store.get("ConfigMap", name)
    with pytest.raises(ValueError, match="not a DNS label"):
        kube_store.get("ConfigMap", "x", "../kube-system")
    with pytest.raises(ValueError, match="not one pvlun keeps"):
        kube_store.list("Deployment")


def test_every_kind_lives_where_the_store_and_the_server_say():
    from kube_api_storage import SERVED

    from controlplane.kube_kinds import KINDS
    from controlplane.store import CLUSTER_SCOPED

    served = {r.kind: (r.group, r.version, r.plural, r.namespaced, r.status) for r in SERVED.values()}
    assert {k: (i.group, i.version, i.plural, i.namespaced, i.status) for k, i in KINDS.items()} == served
    assert {k for k, i in KINDS.items() if not i.namespaced} == CLUSTER_SCOPED
