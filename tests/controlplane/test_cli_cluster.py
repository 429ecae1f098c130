"""The CLI on a cluster (`--kubeconfig`, or KUBECONFIG unless an embedded instance is named),
on the Kubernetes API server TEST DOUBLE: the same commands, reading only the namespace asked
for (a user with rights in one namespace can list nothing cluster-wide)."""

from __future__ import annotations

import os
import subprocess
import sys

from controlplane.kube_store import USER_AGENT

DV = """apiVersion: cdi.kubevirt.io/v1beta1
kind: DataVolume
metadata:
  name: fedora
  namespace: team-a
spec:
  source:
    http:
      url: http://images.example/fedora.qcow2
  storage:
    resources:
      requests:
        storage: 1Gi
"""


def pvlun(*args: str, env: dict | None = None, stdin: str | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "PVLUN_DATA_DIR")}
    return subprocess.run([sys.executable, "-m", "pvlun.cli", *args], input=stdin, capture_output=True, text=True,
                          timeout=60, env={**clean, **(env or {})})


def test_apply_and_get_on_a_cluster_read_only_the_namespace_asked_for(kube_api_double, kube_kubeconfig):
    double = kube_api_double
    assert double.call("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                                      "metadata": {"name": "team-a"}})[0] == 201
    done = pvlun("--kubeconfig", kube_kubeconfig, "apply", "-f", "-", stdin=DV)
    assert done.returncode == 0, done.stderr
    start = len(double.requests)
    shown = pvlun("get", "dv", "-n", "team-a", env={"KUBECONFIG": kube_kubeconfig})
    assert shown.returncode == 0, shown.stderr
    assert "fedora" in shown.stdout
    paths = [p for (m, p, q), agent in zip(double.requests[start:], double.agents[start:]) if agent == USER_AGENT]
    assert paths and all("/namespaces/team-a/" in p for p in paths if "datavolumes" in p)


def test_a_named_instance_wins_over_kubeconfig_in_the_environment(kube_kubeconfig, tmp_path):
    start = len(os.listdir(tmp_path))
    out = pvlun("--data-dir", str(tmp_path / "nothing"), "get", "dv", env={"KUBECONFIG": kube_kubeconfig})
    assert out.returncode == 1 and "is not a pvlun instance" in out.stderr  # the local instance, not the cluster
    assert len(os.listdir(tmp_path)) == start


def test_commands_that_read_an_instances_files_say_what_to_use_on_a_cluster(kube_kubeconfig):
    out = pvlun("--kubeconfig", kube_kubeconfig, "logs", "vm/tick")
    assert out.returncode == 1
    assert out.stderr.strip() == ("error: pvlun logs works on an embedded instance only; on a cluster use kubectl "
                                  "logs on the VM's virt-launcher Pod (its serial console is the Pod's output)")


def test_an_upload_token_request_on_a_cluster_is_refused_before_anything_is_stored(kube_api_double, kube_kubeconfig):
    """Through the Kubernetes API TEST DOUBLE: CDI's API server answers UploadTokenRequests on a
    cluster; a manifest holding one is refused whole, its ConfigMap not made."""
    manifest = ("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: cm1, namespace: default}\ndata: {a: b}\n---\n"
                "apiVersion: upload.cdi.kubevirt.io/v1beta1\nkind: UploadTokenRequest\n"
                "metadata: {name: t, namespace: default}\nspec: {pvcName: disk}\n")
    out = pvlun("--kubeconfig", kube_kubeconfig, "apply", "-f", "-", stdin=manifest)
    assert out.returncode == 1 and "UploadTokenRequest is answered on an embedded instance only" in out.stderr
    assert kube_api_double.call("GET", "/api/v1/namespaces/default/configmaps/cm1")[0] == 404
