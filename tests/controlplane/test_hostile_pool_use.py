"""Hostile: an overcommitted pool filling up is told before writes fail. With `--overcommit
3` on a small real XFS pool, the first provisioning or snapshot after real use passes 80%,
and again 90%, leaves one Warning event on the StorageClass (not one per claim), which
`pvlun describe` shows; the daemon's /metrics has the same numbers."""

from __future__ import annotations

import os
import time
import urllib.request

import pytest

from csi.capacity import MEASURE_EVERY
from pvlun.local_run import small_xfs_pool, stop_daemon

MiB = 1 << 20


@pytest.fixture(scope="module")
def thin(serve, tmp_path_factory):
    root = tmp_path_factory.mktemp("thin")
    with small_xfs_pool(str(root / "pool.img"), 64 * MiB) as pool:
        inst = serve("--pool", pool, "--overcommit", "3", "--nodes", "1")
        inst.pool = pool
        yield inst
        stop_daemon(inst.proc, inst.data_dir)  # before the pool goes (stopping twice is harmless)


def claim(name: str, size: str) -> str:
    return f"""apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: {name}
spec:
  storageClassName: thin
  volumeMode: Block
  accessModes: [ReadWriteOnce]
  resources:
    requests:
      storage: {size}
"""


STORAGE_CLASS = """apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: thin
provisioner: csi.pvlun.dev
"""


def fill(inst, name: str, offset: int, size: int) -> None:
    with open(os.path.join(inst.pool, "volumes", os.path.basename(inst.lun_path(name))), "r+b") as f:
        f.seek(offset)
        f.write(os.urandom(size))
        os.fsync(f.fileno())
    time.sleep(MEASURE_EVERY + 0.1)  # the control plane's check may reuse a measurement this old


def warnings(inst) -> list[dict]:
    return [e for e in inst.store.events(inst.get("StorageClass", "thin")) if e["reason"] == "PoolNearlyFull"]


def pool_metrics(inst) -> dict[str, float]:
    with open(os.path.join(inst.data_dir, "metrics.url")) as f:
        url = f.read().strip()
    with urllib.request.urlopen(url, timeout=10) as rsp:
        lines = rsp.read().decode().splitlines()
    return {line.split()[0]: float(line.split()[1]) for line in lines if line.startswith("pvlun_pool_")}


def test_warnings_at_80_and_90_percent_real_use_once_per_crossing(thin):
    thin.apply(STORAGE_CLASS)
    thin.apply(claim("a", "30Mi") + "---\n" + claim("b", "30Mi"), "--wait")
    assert warnings(thin) == []  # provisioned far past the pool, but nothing written: no warning
    usable = pool_metrics(thin)["pvlun_pool_usable_bytes"]

    fill(thin, "a", 0, 30 * MiB)
    fill(thin, "b", 0, int(usable * 0.82) - 30 * MiB)
    thin.apply(claim("c", "1Mi"), "--wait")
    first = warnings(thin)
    assert len(first) == 1 and first[0]["type"] == "Warning" and "past 80%" in first[0]["message"]
    assert "overcommit x3" in first[0]["message"]
    thin.apply(claim("d", "1Mi"), "--wait")
    assert len(warnings(thin)) == 1  # still past 80% only: said once

    fill(thin, "b", int(usable * 0.82) - 30 * MiB, int(usable * 0.1))
    thin.apply("""apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshot
metadata:
  name: a-snap
spec:
  source:
    persistentVolumeClaimName: a
""")
    thin.wait(lambda: len(warnings(thin)) == 2, what="the 90% warning after the snapshot")
    assert "past 90%" in warnings(thin)[1]["message"]
    ratio = pool_metrics(thin)["pvlun_pool_used_ratio"]
    assert 0.9 < ratio < 0.95
    described = thin.cli("describe", "sc", "thin").stdout
    assert described.count("PoolNearlyFull") == 2
    thin.apply(claim("e", "1Mi"), "--wait")
    assert len(warnings(thin)) == 2
