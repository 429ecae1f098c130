"""The Kubernetes API server TEST DOUBLE speaks the API server's REST semantics (raw HTTP,
as any client sees them), and the kubernetes client's own typed API works against it."""

from __future__ import annotations

import json
import urllib.request

import pytest

CM = "/api/v1/namespaces/default/configmaps"
DV = "/apis/cdi.kubevirt.io/v1beta1/namespaces/default/datavolumes"


def dv(name: str, **extra) -> dict:
    return {"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume", "metadata": {"name": name},
            "spec": {"source": {"blank": {}}}, **extra}


def test_create_sets_what_the_server_owns_and_drops_status(kube_api_double):
    status, obj = kube_api_double.call("POST", DV, dv("a", status={"phase": "Succeeded"}))
    assert status == 201 and "status" not in obj
    meta = obj["metadata"]
    assert meta["uid"] and meta["creationTimestamp"] and meta["resourceVersion"] and meta["generation"] == 1
    assert meta["namespace"] == "default"
    assert kube_api_double.call("POST", DV, dv("a"))[0] == 409
    code, body = kube_api_double.call("POST", "/apis/cdi.kubevirt.io/v1beta1/namespaces/nowhere/datavolumes", dv("b"))
    assert (code, body["reason"], body["kind"]) == (404, "NotFound", "Status")


def test_update_needs_the_current_version_and_each_part_goes_its_own_way(kube_api_double):
    double = kube_api_double
    _, obj = double.call("POST", DV, dv("u"))
    assert double.call("PUT", f"{DV}/u", dict(obj, metadata={"name": "u"}))[0] == 422  # no resourceVersion
    changed = dict(obj, spec={"source": {"http": {"url": "http://x"}}}, status={"phase": "Ignored"})
    code, updated = double.call("PUT", f"{DV}/u", changed)
    assert code == 200 and updated["metadata"]["generation"] == 2 and "status" not in updated
    code, body = double.call("PUT", f"{DV}/u", changed)  # the version it was based on is gone
    assert (code, body["reason"]) == (409, "Conflict")
    on_status = dict(updated, spec={"source": {"blank": {}}}, status={"phase": "Succeeded"})
    code, after = double.call("PUT", f"{DV}/u/status", on_status)
    assert code == 200 and after["status"] == {"phase": "Succeeded"}
    assert after["spec"] == changed["spec"] and after["metadata"]["generation"] == 2
    code, same = double.call("PUT", f"{DV}/u/status", after)  # nothing changes: nothing is written
    assert same["metadata"]["resourceVersion"] == after["metadata"]["resourceVersion"]
    assert double.call("GET", f"{CM}/u/status")[0] == 404  # a ConfigMap has no status subresource


def test_patches_merge_and_a_version_in_a_merge_patch_is_a_precondition(kube_api_double):
    double = kube_api_double
    _, obj = double.call("POST", CM, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "p"},
                                      "data": {"a": "1", "b": "2"}})
    code, merged = double.call("PATCH", f"{CM}/p", {"data": {"a": None, "c": "3"}}, "application/merge-patch+json")
    assert code == 200 and merged["data"] == {"b": "2", "c": "3"}
    stale = {"metadata": {"resourceVersion": obj["metadata"]["resourceVersion"]}, "data": {"d": "4"}}
    assert double.call("PATCH", f"{CM}/p", stale, "application/merge-patch+json")[0] == 409
    ops = [{"op": "test", "path": "/data/b", "value": "2"}, {"op": "replace", "path": "/data/b", "value": "9"}]
    assert double.call("PATCH", f"{CM}/p", ops, "application/json-patch+json")[1]["data"]["b"] == "9"
    assert double.call("PATCH", f"{CM}/p", {"data": {}}, "application/strategic-merge-patch+json")[0] == 415


def test_finalizers_hold_a_delete_and_owners_take_their_dependents_along(kube_api_double):
    double = kube_api_double
    _, owner = double.call("POST", CM, {"apiVersion": "v1", "kind": "ConfigMap",
                                        "metadata": {"name": "owner", "finalizers": ["x.dev/hold"]}})
    ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner["metadata"]["uid"]}
    double.call("POST", DV, dv("dep", metadata={"name": "dep", "ownerReferences": [ref]}))
    code, marked = double.call("DELETE", f"{CM}/owner")
    assert code == 200 and marked["metadata"]["deletionTimestamp"]
    assert double.call("GET", f"{DV}/dep")[0] == 200
    more = dict(marked, metadata=dict(marked["metadata"], finalizers=["x.dev/hold", "x.dev/new"]))
    assert double.call("PUT", f"{CM}/owner", more)[0] == 422  # no new finalizer once deletion started
    done = double.call("PATCH", f"{CM}/owner", {"metadata": {"finalizers": None}}, "application/merge-patch+json")
    assert done[0] == 200
    assert double.call("GET", f"{CM}/owner")[0] == 404 and double.call("GET", f"{DV}/dep")[0] == 404


def test_lists_page_and_watches_replay_from_a_version(kube_api_double):
    double = kube_api_double
    for name in "abc":
        double.call("POST", CM, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}})
    code, page = double.call("GET", f"{CM}?limit=2")
    assert page["kind"] == "ConfigMapList" and [o["metadata"]["name"] for o in page["items"]] == ["a", "b"]
    rest = double.call("GET", f"{CM}?limit=2&continue={page['metadata']['continue']}")[1]
    assert [o["metadata"]["name"] for o in rest["items"]] == ["c"] and "continue" not in rest["metadata"]
    double.call("DELETE", f"{CM}/b")
    url = f"{double.url}{CM}?watch=1&resourceVersion={page['metadata']['resourceVersion']}&timeoutSeconds=1"
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {double.token}"})
    with urllib.request.urlopen(request, timeout=5) as response:
        events = [json.loads(line) for line in response if line.strip()]
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [("DELETED", "b")]
    double.expire_history()
    with urllib.request.urlopen(request, timeout=5) as response:
        gone = [json.loads(line) for line in response if line.strip()]
    assert gone[0]["type"] == "ERROR" and gone[0]["object"]["code"] == 410


def test_event_rules_of_events_k8s_io_v1(kube_api_double):
    path = "/apis/events.k8s.io/v1/namespaces/default/events"
    event = {"apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {"name": "e1"},
             "eventTime": "2024-01-01T00:00:00.000000Z", "type": "Normal", "reason": "R", "action": "R",
             "note": "n", "reportingController": "x.dev/c", "reportingInstance": "i",
             "regarding": {"kind": "ConfigMap", "name": "a", "namespace": "default"}}
    assert kube_api_double.call("POST", path, dict(event, deprecatedCount=2))[0] == 422
    code, created = kube_api_double.call("POST", path, event)
    assert code == 201
    assert kube_api_double.call("PUT", f"{path}/e1", dict(created, series={"count": 1, "lastObservedTime": "x"}))[0] == 422
    assert kube_api_double.call("PUT", f"{path}/e1", dict(created, note="other"))[0] == 422
    counted = dict(created, series={"count": 2, "lastObservedTime": "2024-01-01T00:00:01.000000Z"})
    assert kube_api_double.call("PUT", f"{path}/e1", counted)[0] == 200


def test_the_kubernetes_clients_typed_api_works_against_the_double(kube_api_double, kube_kubeconfig):
    kubernetes = pytest.importorskip("kubernetes")
    client = kubernetes.config.new_client_from_config(config_file=kube_kubeconfig)
    try:
        core = kubernetes.client.CoreV1Api(client)
        core.create_namespaced_config_map("default", kubernetes.client.V1ConfigMap(
            metadata=kubernetes.client.V1ObjectMeta(name="typed"), data={"k": "v"}))
        assert core.read_namespaced_config_map("typed", "default").data == {"k": "v"}
        assert [c.metadata.name for c in core.list_namespaced_config_map("default").items] == ["typed"]
        with pytest.raises(kubernetes.client.ApiException) as refused:
            core.read_namespaced_config_map("missing", "default")
        assert refused.value.status == 404
    finally:
        client.close()
