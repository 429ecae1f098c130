"""A real `pvlun serve` (embedded mode) and the `pvlun` CLI, as a user runs them."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
import time

import pytest

from pvlun.store import SQLiteStore


class Instance:
    def __init__(self, data_dir: str, proc: subprocess.Popen):
        self.data_dir = data_dir
        self.proc = proc
        self.store = SQLiteStore(os.path.join(data_dir, "catalog.db"))

    def cli(self, *args: str, input: str | None = None, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-m", "pvlun.cli", *args, "--data-dir", self.data_dir],
                              input=input, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"pvlun {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def apply(self, manifest: str, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.cli("apply", "-f", "-", *extra, input=manifest, check=check)

    def get(self, kind: str, name: str, namespace: str = "default") -> dict | None:
        return self.store.get(kind, name, namespace)

    def lun_path(self, claim: str, namespace: str = "default") -> str:
        pvc = self.get("PersistentVolumeClaim", claim, namespace)
        pv = self.get("PersistentVolume", pvc["spec"]["volumeName"])
        return os.path.join(self.data_dir, "pool", "volumes", pv["spec"]["csi"]["volumeHandle"] + ".img")

    def wait(self, predicate, timeout: float = 60, what: str = "condition"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}")


def start_instance(data_dir: str, *extra: str) -> Instance:
    log = open(os.path.join(data_dir, "serve.log"), "w")
    proc = subprocess.Popen([sys.executable, "-m", "pvlun.cli", "serve", "--data-dir", data_dir,
                             "--pool-size", "8Gi", *extra], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while not os.path.exists(os.path.join(data_dir, "serve.pid")):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(open(log.name).read())
        time.sleep(0.1)
    return Instance(data_dir, proc)


def stop_instance(inst: Instance) -> None:
    inst.proc.terminate()
    try:
        inst.proc.wait(60)
    except subprocess.TimeoutExpired:
        inst.proc.kill()
        inst.proc.wait()
    pool = os.path.join(inst.data_dir, "pool")
    with open("/proc/self/mountinfo") as f:
        if any(line.split()[4] == pool for line in f):
            subprocess.run(["umount", "-l", pool], check=False)


@pytest.fixture(scope="module")
def instance(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("pvlun"))
    inst = start_instance(data_dir, "--nodes", "2")
    yield inst
    stop_instance(inst)


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    """A plain Python HTTP server (no range requests needed) on loopback."""
    root = tmp_path_factory.mktemp("www")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(root), **kw)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    server.root = str(root)
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield server
    server.shutdown()
