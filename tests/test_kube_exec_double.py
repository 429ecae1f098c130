"""pods/exec on the Kubernetes API server TEST DOUBLE, driven by the real kubernetes client: its
own `kubernetes.stream` exec (v5, and v4 when that is all a client offers), and KubeStore.exec
on top of it — stdin in and closed, stdout and stderr apart, the exit code from the error
channel's Status, output kept to a bound, the API server's refusals and a timeout as one line,
and no command left running after its client went away."""

from __future__ import annotations

import os
import sys
import time

import pytest
from kubernetes import config as kube_config
from kubernetes.client import CoreV1Api
from kubernetes.stream import stream, ws_client

from controlplane.kube_kinds import ApiError
from controlplane.pod_exec import OUTPUT_LIMIT

PODS = "/api/v1/namespaces/default/pods"
SCRIPT = """
import os, sys, time
data = sys.stdin.buffer.read() if sys.argv[1] == "read" else b""
if sys.argv[1] == "pid":
    open(sys.argv[2], "w").write(str(os.getpid()))
    time.sleep(30)
if sys.argv[1] == "flood":
    sys.stdout.buffer.write(b"x" * int(sys.argv[2]))
sys.stdout.buffer.write(b"out:" + data)
sys.stderr.buffer.write(b"err:" + " ".join(sys.argv[1:]).encode())
sys.exit(int(sys.argv[-1]) if sys.argv[-1].isdigit() else 0)
"""


def make_pod(double, name: str, node: str | None = "node-a", phase: str = "Running") -> None:
    spec = {"containers": [{"name": "compute", "image": "x"}, {"name": "sidecar", "image": "x"}]}
    if node:
        spec["nodeName"] = node
    code, pod = double.call("POST", PODS, {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec})
    assert code == 201, pod
    code, pod = double.call("PUT", f"{PODS}/{name}/status", dict(pod, status={"phase": phase}))
    assert code == 200, pod


@pytest.fixture
def double(kube_api_double):
    """The double, running every command `cmd ARGS...` as SCRIPT with ARGS ('nope' is not found)."""
    kube_api_double.exec_runner = lambda pod, container, argv: (
        None if argv[0] == "nope" else [sys.executable, "-c", SCRIPT, *argv[1:]])
    make_pod(kube_api_double, "vm")
    return kube_api_double


def test_the_kubernetes_clients_own_exec_gets_output_and_the_exit_code(double, kube_kubeconfig):
    client = kube_config.new_client_from_config(config_file=kube_kubeconfig)
    try:
        api = CoreV1Api(client)
        said = stream(api.connect_get_namespaced_pod_exec, "vm", "default", command=["cmd", "hello", "0"],
                      container="compute", stdin=False, stdout=True, stderr=True, tty=False)
        assert said in ("out:err:hello 0", "err:hello 0out:")  # both streams, in the order their frames came
        ws = stream(api.connect_get_namespaced_pod_exec, "vm", "default", command=["cmd", "read", "3"],
                    container="sidecar", stdin=True, stdout=True, stderr=True, tty=False, _preload_content=False)
        assert ws.subprotocol == "v5.channel.k8s.io"
        ws.write_stdin("from the client")
        ws.close_channel(ws_client.STDIN_CHANNEL)  # v5: the command sees the end of its input
        ws.run_forever(timeout=10)
        assert ws.returncode == 3
        assert double.execs[-1] == ("default", "vm", "sidecar", ["cmd", "read", "3"])
    finally:
        client.close()


def test_a_client_that_offers_only_v4_gets_v4_and_still_its_exit_code(double, kube_kubeconfig):
    client = kube_config.new_client_from_config(config_file=kube_kubeconfig)
    try:
        _, url, headers, _, _ = client.param_serialize(
            "GET", f"{PODS}/vm/exec", query_params=[("command", "cmd"), ("command", "v4"), ("command", "5"),
                                                    ("container", "compute"), ("stdout", True), ("stderr", True)],
            header_params={"sec-websocket-protocol": "v4.channel.k8s.io"}, auth_settings=["BearerToken"])
        ws = ws_client.WSClient(client.configuration, ws_client.get_websocket_url(url), headers, True)
        ws.run_forever(timeout=10)
        assert ws.subprotocol == "v4.channel.k8s.io" and ws.returncode == 5
        assert ws.read_all() in ("out:err:v4 5", "err:v4 5out:")  # both streams, in the order their frames came
    finally:
        client.close()


def test_kube_store_exec_sends_stdin_and_keeps_the_streams_apart(double, kube_store):
    result = kube_store.exec("default", "vm", "compute", ["cmd", "read", "0"], stdin=b"secret\n")
    assert (result.code, result.stdout, result.stderr, result.truncated) == (0, b"out:secret\n", b"err:read 0", False)
    assert kube_store.exec("default", "vm", "compute", ["cmd", "7"]).code == 7
    big = kube_store.exec("default", "vm", "compute", ["cmd", "flood", str(OUTPUT_LIMIT + 4096), "0"])
    assert big.code == 0 and big.truncated and len(big.stdout) == OUTPUT_LIMIT


@pytest.mark.parametrize("pod, container, argv, code, said", [
    ("gone", "compute", ["cmd"], 404, 'pods "gone" not found'),
    ("vm", "other", ["cmd"], 400, "container other is not valid for pod vm"),
    ("pending", "compute", ["cmd"], 400, "pod pending does not have a host assigned"),
    ("done", "compute", ["cmd"], 400, "cannot exec into a container in a completed pod; current phase is Succeeded"),
    ("vm", "compute", ["nope"], 500, 'exec: "nope": executable file not found'),
])
def test_refusals_are_one_line_with_the_api_servers_code(double, kube_store, pod, container, argv, code, said):
    make_pod(double, "pending", node=None, phase="Pending")
    make_pod(double, "done", phase="Succeeded")
    with pytest.raises(ApiError) as refused:
        kube_store.exec("default", pod, container, argv)
    assert refused.value.code == code and said in str(refused.value)
    assert "\n" not in str(refused.value) and str(refused.value).startswith(f"exec in default/{pod} ({container}): ")


def test_a_command_past_its_timeout_is_an_error_and_does_not_stay(double, kube_store, tmp_path):
    started = time.monotonic()
    with pytest.raises(ApiError) as late:
        kube_store.exec("default", "vm", "compute", ["cmd", "pid", str(tmp_path / "pid")], timeout=1.0)
    assert late.value.code == 504 and "no exit status within 1 s" in str(late.value)
    assert time.monotonic() - started < 5
    pid = int((tmp_path / "pid").read_text())
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{pid}")  # the double ends what nobody reads any more


def test_names_that_would_reach_the_url_are_checked_first(double, kube_store):
    with pytest.raises(ValueError):
        kube_store.exec("default", "../secrets", "compute", ["cmd"])
    with pytest.raises(ValueError):
        kube_store.exec("default", "vm", "compute", [])
    assert not double.execs
