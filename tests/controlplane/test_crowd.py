"""A crowd through the embedded control plane: hundreds of DataVolumes in one file, more
than the nodes' attach slots, all Succeeded; repeated events counted; a reconcile that keeps
failing backs off instead of spinning."""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
import threading
import time

from controlplane.store import SQLiteStore

CROWD = 300  # bench/bench_crowd.py applies 1,000; this keeps `make test` fast
SLOTS_PER_NODE = 3  # fewer than the job pool's workers: work must wait for a slot


def blank_dvs(count: int, prefix: str = "blank") -> str:
    return "".join(f"""---
apiVersion: cdi.kubevirt.io/v1beta1
kind: DataVolume
metadata:
  name: {prefix}-{i}
spec:
  source:
    blank: {{}}
  storage:
    volumeMode: Block
    resources:
      requests:
        storage: 1Mi
""" for i in range(count))


class AttachmentWatch:
    """Samples the VolumeAttachments while the crowd runs: the most any node held at once."""

    def __init__(self, store: SQLiteStore):
        self.store, self.most = store, collections.Counter()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            per_node = collections.Counter(a["spec"]["nodeName"] for a in self.store.list("VolumeAttachment"))
            for node, count in per_node.items():
                self.most[node] = max(self.most[node], count)
            time.sleep(0.01)

    def done(self) -> collections.Counter:
        self.stop.set()
        self.thread.join()
        return self.most


def test_crowd_beyond_the_attach_limit_waits_for_slots_and_all_succeed_on_both_nodes(serve):
    inst = serve("--nodes", "2", "--max-volumes-per-node", str(SLOTS_PER_NODE))
    watch = AttachmentWatch(SQLiteStore(os.path.join(inst.data_dir, "catalog.db")))
    started = time.monotonic()
    out = inst.apply(blank_dvs(CROWD), "--wait", "--timeout", "240", check=False)
    elapsed = time.monotonic() - started
    most = watch.done()
    assert out.returncode == 0, out.stderr[-2000:]
    dvs = inst.store.list("DataVolume")
    assert len(dvs) == CROWD
    assert collections.Counter(d["status"]["phase"] for d in dvs) == {"Succeeded": CROWD}
    assert all(d["status"].get("restartCount", 0) == 0 for d in dvs)
    # the limit was reached, never passed, and the crowd overflowed onto the second node
    assert set(most) == set(inst.nodes()), most
    assert max(most.values()) == SLOTS_PER_NODE and all(v <= SLOTS_PER_NODE for v in most.values()), most
    for dv in dvs:
        for event in inst.store.events(dv):
            assert event["type"] == "Normal" and "RESOURCE_EXHAUSTED" not in event["message"], (dv["metadata"], event)
    assert inst.store.list("VolumeAttachment") == []
    assert elapsed < 120, f"{CROWD} blank DataVolumes took {elapsed:.0f} s"


def test_same_warning_five_times_is_one_event_with_count_five(tmp_path):
    store = SQLiteStore(str(tmp_path / "catalog.db"))
    dv = store.apply({"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
                      "metadata": {"name": "noisy"}, "spec": {}})
    for _ in range(5):
        store.add_event(dv, "Warning", "ImportFailed", "server said 503")
    store.add_event(dv, "Warning", "ImportFailed", "server said 404")  # another message: its own event
    events = store.events(dv)
    assert [(e["message"], e["count"]) for e in events] == [("server said 503", 5), ("server said 404", 1)]
    out = subprocess.run([sys.executable, "-m", "pvlun.cli", "describe", "dv", "noisy", "--data-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    lines = [ln for ln in out.stdout.splitlines() if "ImportFailed" in ln]
    assert len(lines) == 2 and "(x5 since" in lines[0] and "(x" not in lines[1], out.stdout


def test_reconcile_that_keeps_failing_is_retried_with_growing_delays(serve):
    inst = serve("--nodes", "1")
    # written past admission (as an older pvlun or another client might have): the
    # provisioner cannot read `resources` and raises on every try
    inst.store.apply({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "broken"},
                      "spec": {"resources": 5, "accessModes": ["ReadWriteOnce"]}})
    inst.apply(blank_dvs(1, "healthy"))  # one bad object holds nobody else up
    seen: list[float] = []
    count, deadline = 0, time.monotonic() + 9
    while time.monotonic() < deadline:
        events = [e for e in inst.store.events(inst.get("PersistentVolumeClaim", "broken"))
                  if e["reason"] == "ReconcileError"]
        assert len(events) <= 1  # counted, not appended
        if events and events[0]["count"] > count:
            count = events[0]["count"]
            seen.append(time.monotonic())
        time.sleep(0.02)
    gaps = [b - a for a, b in zip(seen, seen[1:])]
    assert 3 <= count <= 7, (count, gaps)  # not every loop (that was hundreds), not given up
    assert all(later > 1.4 * earlier for earlier, later in zip(gaps, gaps[1:])), gaps  # 0.5, 1, 2, 4 s
    message = events[0]["message"]
    assert "\n" not in message and "Traceback" not in message and inst.data_dir not in message
    assert re.search(r"'int' object has no attribute", message), message
    assert inst.get("DataVolume", "healthy-0")["status"]["phase"] == "Succeeded"


def test_catalog_made_before_counted_events_keeps_its_events_and_counts_new_ones(tmp_path):
    import sqlite3

    path = str(tmp_path / "catalog.db")
    with sqlite3.connect(path) as db:  # the events table as earlier releases made it
        db.execute("CREATE TABLE events (seq INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, "
                   "namespace TEXT NOT NULL, name TEXT NOT NULL, type TEXT NOT NULL, reason TEXT NOT NULL, "
                   "message TEXT NOT NULL, time TEXT NOT NULL)")
        db.execute("INSERT INTO events (kind, namespace, name, type, reason, message, time) VALUES "
                   "('DataVolume', 'default', 'old', 'Normal', 'ImportSucceeded', 'done', '2024-01-01T00:00:00Z')")
    store = SQLiteStore(path)
    dv = {"kind": "DataVolume", "metadata": {"name": "old", "namespace": "default"}}
    store.add_event(dv, "Warning", "Slow", "still slow")
    store.add_event(dv, "Warning", "Slow", "still slow")
    assert [(e["reason"], e["count"]) for e in store.events(dv)] == [("ImportSucceeded", 1), ("Slow", 2)]
