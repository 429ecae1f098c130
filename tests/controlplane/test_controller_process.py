"""`pvlun controller` as a process, on the Kubernetes API server TEST DOUBLE (no API server can
run here; with PVLUN_TEST_KUBECONFIG the same commands run against a real cluster in the
store contract suite): two replicas, one leads through a Lease, health and readiness where
the Deployment probes them, a standby that takes over when the leader dies, `pvlun apply
--kubeconfig` reconciled, and a clean stop that hands the Lease over at once."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from test_controller_cluster import IMAGE, wait_until

CONTROLLER_NS = "pvlun-system"
LEASE = ("Lease", "pvlun-controller", CONTROLLER_NS)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Controller:
    def __init__(self, kubeconfig: str, identity: str, log_path: str):
        self.identity = identity
        self.health, self.metrics = free_port(), free_port()
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pvlun.cli", "controller", "--kubeconfig", kubeconfig, "--image", IMAGE,
             "--namespace", CONTROLLER_NS, "--identity", identity,
             "--health-address", f"127.0.0.1:{self.health}", "--metrics-address", f"127.0.0.1:{self.metrics}",
             "--leader-elect-lease-duration", "2", "--leader-elect-renew-deadline", "1",
             "--leader-elect-retry-period", "0.2"],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT)

    def get(self, path: str, port: int | None = None) -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port or self.health}{path}", timeout=2) as r:
                return r.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return 0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


@pytest.fixture
def controllers(kube_kubeconfig, tmp_path, kube_store):
    kube_store.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": CONTROLLER_NS}})
    made: list[Controller] = []

    def start(identity: str) -> Controller:
        c = Controller(kube_kubeconfig, identity, str(tmp_path / f"{identity}.log"))
        made.append(c)
        return c

    yield start
    for c in made:
        c.stop()


def holder(store) -> str:
    lease = store.get(*LEASE)
    return ((lease or {}).get("spec") or {}).get("holderIdentity", "")


def test_one_replica_leads_a_standby_takes_over_and_a_clean_stop_releases_the_lease(controllers, kube_store,
                                                                                     kube_kubeconfig):
    a = controllers("replica-a")
    assert wait_until(lambda: a.get("/healthz") == 200 and a.get("/readyz") == 200, 20)
    assert wait_until(lambda: holder(kube_store) == "replica-a", 10)
    b = controllers("replica-b")
    assert wait_until(lambda: b.get("/readyz") == 200, 20)
    assert a.get("/metrics", a.metrics) == 200 and b.get("/nothing") == 404
    time.sleep(1.0)
    assert holder(kube_store) == "replica-a"  # b waits while a renews

    env = dict(os.environ, KUBECONFIG=kube_kubeconfig)
    env.pop("PVLUN_DATA_DIR", None)
    kube_store.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "imports"}})
    manifest = ("apiVersion: cdi.kubevirt.io/v1beta1\nkind: DataVolume\nmetadata:\n  name: fedora\n"
                "  namespace: imports\nspec:\n  source:\n    http:\n      url: http://images.example/fedora.qcow2\n"
                "  storage:\n    resources:\n      requests:\n        storage: 1Gi\n")
    done = subprocess.run([sys.executable, "-m", "pvlun.cli", "apply", "-f", "-"], input=manifest, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    pvc = wait_until(lambda: kube_store.get("PersistentVolumeClaim", "fedora", "imports"), 10)
    assert pvc["metadata"]["ownerReferences"][0]["kind"] == "DataVolume"

    a.proc.send_signal(signal.SIGKILL)  # the leader dies without a word: b waits out the lease
    a.proc.wait(10)
    assert wait_until(lambda: holder(kube_store) == "replica-b", 10)

    b.proc.send_signal(signal.SIGTERM)
    assert b.proc.wait(20) == 0
    assert holder(kube_store) == ""  # released: a new replica need not wait out the lease
