"""Hostile: an overcommitted pool filling up is told before writes fail. With `--overcommit
3` on a small real XFS pool, bytes written into the volumes (as a guest or an upload writes
them: no API call announces them) take real use past 80% and 90%; within seconds each
crossing leaves one Warning event on every StorageClass of the pool — the built-in default
class included, which is a stored object — and `pvlun describe` shows them; the daemon's
/metrics has the same numbers. It used to warn only when something unrelated was
provisioned afterwards, on that claim's volume."""

from __future__ import annotations

import os
import subprocess
import time
import urllib.request

import pytest

from manifests import snapshot
from pvlun.local_run import small_xfs_pool, stop_daemon
from controlplane.pool_watch import CHECK_EVERY

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


def warnings(inst, storage_class: str = "thin") -> list[dict]:
    return [e for e in inst.store.events(inst.get("StorageClass", storage_class)) if e["reason"] == "PoolNearlyFull"]


def warned(inst, count: int, what: str) -> list[dict]:
    """Wait (a few looks of the pool watch) until both classes carry `count` warnings."""
    return inst.wait(lambda: len(warnings(inst)) == count and len(warnings(inst, "pvlun")) == count
                     and warnings(inst), 4 * CHECK_EVERY, what)


def pool_metrics(inst) -> dict[str, float]:
    with open(os.path.join(inst.data_dir, "metrics.url")) as f:
        url = f.read().strip()
    with urllib.request.urlopen(url, timeout=10) as rsp:
        lines = rsp.read().decode().splitlines()
    return {line.split()[0]: float(line.split()[1]) for line in lines if line.startswith("pvlun_pool_")}


def test_use_no_api_call_announces_warns_within_seconds_on_every_class_once_per_crossing(thin):
    thin.apply(STORAGE_CLASS)
    assert "pvlun" in thin.cli("get", "sc").stdout  # the built-in default class is an object
    thin.apply(claim("a", "30Mi") + "---\n" + claim("b", "30Mi"), "--wait")
    time.sleep(CHECK_EVERY + 0.5)  # a look of the pool watch
    assert warnings(thin) == []  # provisioned far past the pool, but nothing written: no warning
    usable = pool_metrics(thin)["pvlun_pool_usable_bytes"]

    fill(thin, "a", 0, 30 * MiB)
    fill(thin, "b", 0, int(usable * 0.82) - 30 * MiB)
    first = warned(thin, 1, "the 80% warning, with no API call after the writes")
    assert first[0]["type"] == "Warning" and "past 80%" in first[0]["message"]
    assert "overcommit x3" in first[0]["message"]
    time.sleep(CHECK_EVERY + 0.5)  # a look of the pool watch
    assert len(warnings(thin)) == 1  # still past 80% only: said once

    fill(thin, "b", int(usable * 0.82) - 30 * MiB, int(usable * 0.1))
    assert "past 90%" in warned(thin, 2, "the 90% warning")[1]["message"]
    ratio = pool_metrics(thin)["pvlun_pool_used_ratio"]
    assert 0.9 < ratio < 0.95
    for storage_class in ("thin", "pvlun"):
        assert thin.cli("describe", "sc", storage_class).stdout.count("PoolNearlyFull") == 2
    time.sleep(CHECK_EVERY + 0.5)  # a look of the pool watch
    assert len(warnings(thin)) == 2


def test_a_snapshot_refused_on_a_full_pool_is_retried_and_succeeds_once_there_is_room(thin):
    """RESOURCE_EXHAUSTED above 95% used to fail a VolumeSnapshot for good; it is retried
    with backoff (the error in its status and an event meanwhile), as external-snapshotter does."""
    thin.apply(STORAGE_CLASS)
    now = pool_metrics(thin)
    need = max(MiB, int(now["pvlun_pool_usable_bytes"] * 0.97 - now["pvlun_pool_used_bytes"]))
    thin.apply(claim("full", f"{need // MiB + 1}Mi"), "--wait")
    fill(thin, "full", 0, need)
    assert pool_metrics(thin)["pvlun_pool_used_ratio"] > 0.95
    thin.apply(snapshot("late", "full"))
    error = thin.wait(lambda: ((thin.get("VolumeSnapshot", "late").get("status") or {}).get("error") or {}).get("message"),
                      30, "the snapshot refused")
    assert error.startswith("RESOURCE_EXHAUSTED: ") and "above 95%" in error, error
    events = [e for e in thin.store.events(thin.get("VolumeSnapshot", "late")) if e["reason"] == "SnapshotCreationFailed"]
    assert events and "trying again" in events[0]["message"]

    lun = os.path.join(thin.pool, "volumes", os.path.basename(thin.lun_path("full")))  # the guest discards its data
    subprocess.run(["fallocate", "--punch-hole", "--offset", "0", "--length", str(need), lun], check=True)
    status = thin.wait(lambda: (thin.get("VolumeSnapshot", "late").get("status") or {}).get("readyToUse")
                       and thin.get("VolumeSnapshot", "late")["status"], 90, "the retried snapshot ready")
    assert status.get("error") is None and status["snapshotHandle"].startswith("snap-")
