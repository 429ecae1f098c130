"""An import that fails for a reason that may pass (HTTP 404, connection refused) is tried again
with backoff, as CDI restarts its importer pod: restartCount grows, the Running condition says
why, and after three failed attempts the DataVolume is Failed and its claim gone."""

from __future__ import annotations

import os
import socket

import pytest
from test_datavolume import dv

from pvlun.local_run import DirectoryServer

MiB = 1 << 20


@pytest.fixture(scope="module")
def inst(serve):
    return serve("--import-stall-timeout", "8")  # backoffs of 2 s, then 4 s


@pytest.fixture
def www(tmp_path):
    server = DirectoryServer(str(tmp_path))
    yield server
    server.stop()


def status(inst, name: str) -> dict:
    return (inst.get("DataVolume", name) or {}).get("status") or {}


def condition(st: dict, type_: str) -> dict:
    return next((c for c in st.get("conditions") or [] if c["type"] == type_), {})


def test_a_404_is_retried_and_the_import_succeeds_once_the_file_is_there(inst, www):
    inst.apply(dv("late", f"    http:\n      url: {www.url}/late.raw", size="16Mi"))
    inst.wait(lambda: status(inst, "late").get("restartCount") == 1, 60, "the first attempt failed and counted")
    st = status(inst, "late")
    running = condition(st, "Running")
    assert st["phase"] == "ImportInProgress", st
    assert running["status"] == "False" and running["reason"] == "NotFound" and "late.raw" in running["message"]
    data = os.urandom(MiB)
    with open(os.path.join(www.root, "late.raw"), "wb") as f:
        f.write(data)
    inst.wait(lambda: status(inst, "late").get("phase") == "Succeeded", 60, "the retried import Succeeded")
    st = status(inst, "late")
    assert st["restartCount"] == 1 and condition(st, "Running")["reason"] == "Completed"
    with open(inst.lun_path("late"), "rb") as f:
        assert f.read(MiB) == data
    events = [e for e in inst.store.events(inst.get("DataVolume", "late")) if e["reason"] == "NotFound"]
    assert events and "attempt 1 of 3, trying again in 2 s" in events[0]["message"]


def test_a_refused_connection_is_tried_three_times_then_failed(inst):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    inst.apply(dv("away", f"    http:\n      url: http://127.0.0.1:{port}/disk.img", size="16Mi"))
    seen: set[int] = set()
    inst.wait(lambda: seen.add(status(inst, "away").get("restartCount", 0)) or status(inst, "away").get("phase") == "Failed",
              60, "Failed after three attempts")
    st = status(inst, "away")
    ready = condition(st, "Ready")
    assert st["restartCount"] == 2 and {1, 2} <= seen
    assert ready["reason"] == "Unreachable" and "(3 attempts)" in ready["message"]
    retries = [e["message"] for e in inst.store.events(inst.get("DataVolume", "away")) if e["reason"] == "Unreachable"]
    assert any("attempt 1 of 3, trying again in 2 s" in m for m in retries)
    assert any("attempt 2 of 3, trying again in 4 s" in m for m in retries)
    inst.wait(lambda: inst.get("PersistentVolumeClaim", "away") is None, 30, "the failed import's claim gone")
