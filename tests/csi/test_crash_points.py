"""Crash repair, unit level: crash states injected by hand into the catalog and the pool,
and kill -9 (os._exit in a child process) at exact points inside one LunService call;
`repair()` must leave catalog and pool in agreement and the retried call must succeed
and be idempotent. The random kill -9 test of the running driver is test_crash.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest

from csi.backends.file import FileBackend
from csi.catalog import CREATING, DELETING, READY, Catalog, GroupSnapshot, Snapshot, Volume
from csi.errors import CsiError
from csi.lun_service import LunService
from csi.validation import new_id
from csi.validation import Capability

MiB = 1 << 20
MARKER_LEN = 4096
CAP = [Capability("block", "SINGLE_NODE_WRITER")]


def marker_for(name: str) -> bytes:
    return name.encode().ljust(MARKER_LEN, b"\0")


# ---- repair() on crash states made by hand -----------------------------------------------------
@pytest.fixture
def service(tmp_path):
    catalog = Catalog(str(tmp_path / "catalog.db"))
    luns = LunService(catalog, FileBackend(str(tmp_path / "pool")))
    yield luns
    catalog.close()


def _volume(luns: LunService, state: str, with_file: bool, size: int = MiB) -> Volume:
    vol = Volume(new_id("vol"), f"pvc-{new_id('x')}", size, state)
    luns.catalog.add_volume(vol)
    if with_file:
        luns.backend.create_volume(vol.id, size)
    return vol


def _snapshot(luns: LunService, volume: Volume, state: str, with_file: bool, group_id: str = "") -> Snapshot:
    snap = Snapshot(new_id("snap"), f"snap-{new_id('x')}", volume.id, volume.size, state, group_id)
    luns.catalog.add_snapshot(snap)
    if with_file:
        luns.backend.create_snapshot(snap.id, volume.id)
    return snap


def _pool_files(luns: LunService) -> tuple[list[str], list[str]]:
    return sorted(os.listdir(luns.backend.volumes_dir)), sorted(os.listdir(luns.backend.snapshots_dir))


def test_repair_undoes_creating_volume_with_and_without_file(service):
    with_file = _volume(service, CREATING, True)
    without = _volume(service, CREATING, False)
    keep = _volume(service, READY, True)
    assert service.repair() == {"leftovers": 0, "undone": 2, "orphans": 0, "lost": 0}
    assert service.catalog.volume(with_file.id) is None and service.catalog.volume(without.id) is None
    assert _pool_files(service) == ([keep.id + ".img"], [])
    assert service.catalog.volume(keep.id).state == READY


def test_repair_finishes_deleting_volume_and_snapshot(service):
    vol = _volume(service, DELETING, True)
    half_gone = _volume(service, DELETING, False)
    source = _volume(service, READY, True)
    snap = _snapshot(service, source, DELETING, True)
    assert service.repair() == {"leftovers": 0, "undone": 3, "orphans": 0, "lost": 0}
    assert service.catalog.volume(vol.id) is None and service.catalog.volume(half_gone.id) is None
    assert service.catalog.snapshot(snap.id) is None
    assert _pool_files(service) == ([source.id + ".img"], [])


def test_repair_undoes_creating_snapshot(service):
    source = _volume(service, READY, True)
    snaps = [_snapshot(service, source, CREATING, True), _snapshot(service, source, CREATING, False)]
    assert service.repair()["undone"] == 2
    assert all(service.catalog.snapshot(s.id) is None for s in snaps)
    assert _pool_files(service) == ([source.id + ".img"], [])


def test_repair_removes_files_without_a_row(service):
    volume_id, snapshot_id = new_id("vol"), new_id("snap")
    service.backend.create_volume(volume_id, MiB)
    open(service.backend.snapshot_path(snapshot_id), "wb").close()
    assert service.repair() == {"leftovers": 0, "undone": 0, "orphans": 2, "lost": 0}
    assert _pool_files(service) == ([], [])


def test_repair_sweeps_temporaries(service):
    keep = _volume(service, READY, True)
    for directory in (service.backend.volumes_dir, service.backend.snapshots_dir):
        with open(os.path.join(directory, f".tmp-{new_id('vol')}.img"), "wb") as f:
            f.write(b"half a copy")
    with open(os.path.join(service.backend.volumes_dir, ".tmp-" + keep.id + ".img"), "wb") as f:
        f.write(b"a second copy of a ready volume, interrupted")
    assert service.repair() == {"leftovers": 3, "undone": 0, "orphans": 0, "lost": 0}
    assert _pool_files(service) == ([keep.id + ".img"], [])


def test_repair_records_an_expansion_that_reached_the_disk(service):
    vol = _volume(service, READY, True, size=MiB)
    service.backend.expand_volume(vol.id, 3 * MiB)  # crash before the catalog update
    assert service.repair() == {"leftovers": 0, "undone": 0, "orphans": 0, "lost": 0}
    assert service.catalog.volume(vol.id).size == 3 * MiB


def test_repair_undoes_unfinished_group_snapshots(service):
    a, b = _volume(service, READY, True), _volume(service, READY, True)
    creating = GroupSnapshot(new_id("grp"), "g-creating", CREATING, [a.id, b.id])
    service.catalog.add_group(creating)
    half = [_snapshot(service, a, READY, True, creating.id), _snapshot(service, b, CREATING, False, creating.id)]
    deleting = GroupSnapshot(new_id("grp"), "g-deleting", DELETING, [a.id, b.id])
    service.catalog.add_group(deleting)
    rest = [_snapshot(service, b, DELETING, True, deleting.id)]  # a's member was already dropped
    ready = GroupSnapshot(new_id("grp"), "g-ready", READY, [a.id])
    service.catalog.add_group(ready)
    kept = _snapshot(service, a, READY, True, ready.id)
    counts = service.repair()
    assert counts["undone"] == 2 and counts["orphans"] == 0 and counts["lost"] == 0
    assert [g.id for g in service.catalog.groups()] == [ready.id]
    assert all(service.catalog.snapshot(s.id) is None for s in half + rest)
    assert _pool_files(service)[1] == [kept.id + ".img"]


def test_repair_reports_a_ready_volume_whose_file_is_gone(service):
    vol = _volume(service, READY, False)
    assert service.repair()["lost"] == 1
    assert service.catalog.volume(vol.id).state == READY  # kept: an operator must see it, not lose it silently


def test_repair_is_idempotent_and_leaves_a_healthy_pool_alone(service):
    vols = [_volume(service, READY, True) for _ in range(3)]
    snap = _snapshot(service, vols[0], READY, True)
    _volume(service, CREATING, True)
    open(service.backend.snapshot_path(new_id("snap")), "wb").close()
    first = service.repair()
    assert first["undone"] == 1 and first["orphans"] == 1
    before = _pool_files(service)
    assert service.repair() == {"leftovers": 0, "undone": 0, "orphans": 0, "lost": 0}
    assert _pool_files(service) == before == (sorted(v.id + ".img" for v in vols), [snap.id + ".img"])


def test_retry_after_repair_of_interrupted_create_makes_the_volume(service):

    service.catalog.add_volume(Volume(new_id("vol"), "pvc-retry", MiB, CREATING, [c.as_dict() for c in CAP]))
    service.repair()
    first = service.create_volume("pvc-retry", MiB, 0, CAP, {}, {})
    again = service.create_volume("pvc-retry", MiB, 0, CAP, {}, {})
    assert first.id == again.id and first.state == READY
    assert _pool_files(service) == ([first.id + ".img"], [])


def test_clone_racing_the_delete_of_its_source_is_not_found_never_internal(service):
    """The source check and the copy happen under the source's lock: a delete that wins
    the race makes the clone NOT_FOUND, never a half-made volume or a FileNotFoundError."""

    source = service.create_volume("race-source", MiB, 0, CAP, {}, {})
    outcomes: list[str] = []
    for i in range(100):
        snap = service.create_snapshot(f"race-snap-{i}", source.id, {})

        def clone(i=i, snap_id=snap.id):
            try:
                service.create_volume(f"race-clone-{i}", 0, 0, CAP, {}, {}, "snapshot", snap_id)
                outcomes.append("OK")
            except CsiError as exc:
                outcomes.append(exc.code.name)
            except Exception as exc:
                outcomes.append(repr(exc))
        t = threading.Thread(target=clone)
        t.start()
        service.delete_snapshot(snap.id)
        t.join()
    assert set(outcomes) <= {"OK", "NOT_FOUND"}, sorted(set(outcomes))
    assert service.repair() == {"leftovers": 0, "undone": 0, "orphans": 0, "lost": 0}


# ---- kill -9 at exact points inside one call ------------------------------------------------------
# A child process runs one LunService call with one function replaced by os._exit(137) on
# its Nth call — a kill -9 at that instant: no `except`/`finally` cleanup runs. The parent
# then repairs, checks, and retries the call twice.


def crash_op(luns: LunService, op: str, ids: dict[str, str]) -> str:
    """The call under test, by name; returns the ID it made or touched ("" for deletes)."""

    if op == "create":
        return luns.create_volume("new", MiB, 0, CAP, {}, {}).id
    if op == "clone":
        return luns.create_volume("new", 0, 0, CAP, {}, {}, "volume", ids["base"]).id
    if op == "restore":
        return luns.create_volume("new", 0, 0, CAP, {}, {}, "snapshot", ids["base-snap"]).id
    if op == "snapshot":
        return luns.create_snapshot("new-snap", ids["base"], {}).id
    if op == "expand":
        return str(luns.expand_volume(ids["base"], 3 * MiB, 0)[0].size)
    if op == "group":
        return luns.create_group("new-group", [ids["base"], ids["other"]], {})[0].id
    if op == "delete":
        luns.delete_volume(ids["victim"])
    elif op == "delete_snapshot":
        luns.delete_snapshot(ids["victim-snap"])
    elif op == "delete_group":
        luns.delete_group(ids["group"], [])
    else:
        raise ValueError(op)
    return ""


_CHILD = """
import importlib, importlib.util, json, os, sys
spec = json.loads(sys.argv[1])
module, _, attr = spec["target"].partition(":")
owner = importlib.import_module(module)
*path, name = attr.split(".")
for part in path:
    owner = getattr(owner, part)
original, calls = getattr(owner, name), [0]
def crashing(*args, **kwargs):
    calls[0] += 1
    if calls[0] == spec["nth"]:
        os._exit(137)
    return original(*args, **kwargs)
setattr(owner, name, crashing)
loader = importlib.util.spec_from_file_location("crash_test_ops", spec["test_file"])
ops = sys.modules["crash_test_ops"] = importlib.util.module_from_spec(loader)
loader.loader.exec_module(ops)
from csi.backends.file import FileBackend
from csi.catalog import Catalog
from csi.lun_service import LunService
luns = LunService(Catalog(spec["catalog"]), FileBackend(spec["pool"]))
ops.crash_op(luns, spec["op"], spec["ids"])
sys.exit(3)  # the crash point was never reached
"""

# (op, function that "kills" the process, on its Nth call, what repair must leave)
CRASH_POINTS = [
    ("create", "csi.backends.file:FileBackend.create_volume", 1, "absent"),
    ("create", "csi.backends.file:FileBackend._publish", 1, "absent"),  # temp written, not renamed
    ("create", "csi.catalog:Catalog.update_volume", 1, "absent"),  # file in place, row `creating`
    ("clone", "csi.backends.copy:sparse_copy", 1, "absent"),  # mid-copy (plain pool)
    ("clone", "csi.backends.file:FileBackend._publish", 1, "absent"),
    ("restore", "csi.catalog:Catalog.update_volume", 1, "absent"),
    ("snapshot", "csi.backends.file:FileBackend._publish", 1, "absent"),
    ("snapshot", "csi.catalog:Catalog.update_snapshot", 1, "absent"),
    ("expand", "csi.backends.file:FileBackend.expand_volume", 1, "old size"),
    ("expand", "csi.catalog:Catalog.update_volume", 1, "new size"),  # file grown, catalog not told
    ("group", "csi.backends.file:FileBackend._publish", 2, "absent"),  # one member renamed in place
    ("group", "csi.catalog:Catalog.update_snapshot", 2, "absent"),  # one member marked ready
    ("group", "csi.catalog:Catalog.update_group", 1, "absent"),  # every member ready, group not
    ("delete", "csi.backends.file:FileBackend.delete_volume", 1, "absent"),  # row `deleting`, file there
    ("delete", "csi.catalog:Catalog.remove_volume", 1, "absent"),  # file gone, row there
    ("delete_snapshot", "csi.catalog:Catalog.remove_snapshot", 1, "absent"),
    ("delete_group", "csi.backends.file:FileBackend.delete_snapshot", 2, "absent"),  # half the members gone
]


def _agrees(luns: LunService) -> None:
    for table in ("volumes", "snapshots"):
        assert all(state == READY for _, state in luns.catalog.all_ids(table)), f"{table} in flight after repair"
    assert all(g.state == READY for g in luns.catalog.groups())
    stored = luns.backend.stored_ids()
    known = ({i for i, _ in luns.catalog.all_ids("volumes")}, {i for i, _ in luns.catalog.all_ids("snapshots")})
    assert stored == known, f"pool {stored} != catalog {known}"
    vols, snaps = _pool_files(luns)
    assert not [n for n in vols + snaps if n.startswith(".")], "temporaries left"


@pytest.mark.parametrize("op,target,nth,after", CRASH_POINTS,
                         ids=[f"{op}-{t.rsplit(':', 1)[1]}-{n}" for op, t, n, _ in CRASH_POINTS])
def test_kill_at_exact_point_is_repaired_and_retry_is_idempotent(tmp_path, op, target, nth, after):

    catalog_path, pool = str(tmp_path / "catalog.db"), str(tmp_path / "pool")
    luns = LunService(Catalog(catalog_path), FileBackend(pool))
    ids = {name: luns.create_volume(name, MiB, 0, CAP, {}, {}).id for name in ("base", "other", "victim")}
    with open(luns.backend.volume_path(ids["base"]), "r+b") as f:
        f.write(marker_for("base"))
    ids["base-snap"] = luns.create_snapshot("base-snap", ids["base"], {}).id
    ids["victim-snap"] = luns.create_snapshot("victim-snap", ids["victim"], {}).id
    ids["group"] = luns.create_group("old-group", [ids["base"], ids["other"]], {})[0].id
    luns.catalog.close()

    spec = {"target": target, "nth": nth, "op": op, "ids": ids, "catalog": catalog_path, "pool": pool,
            "test_file": __file__}
    child = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(spec)], capture_output=True, timeout=60)
    assert child.returncode == 137, f"child exited {child.returncode}: {child.stderr.decode()[-2000:]}"

    luns = LunService(Catalog(catalog_path), FileBackend(pool))
    try:
        luns.repair()
        _agrees(luns)
        if op in ("create", "clone", "restore"):
            assert luns.catalog.volume_by_name("new") is None
        elif op == "snapshot":
            assert luns.catalog.snapshot_by_name("new-snap") is None
        elif op == "group":
            assert luns.catalog.group_by_name("new-group") is None
            assert not [s for s in luns.catalog.snapshots(state=None) if s.name.startswith("new-group")]
        elif op == "expand":
            assert luns.catalog.volume(ids["base"]).size == (MiB if after == "old size" else 3 * MiB)
        elif op == "delete":
            assert luns.catalog.volume(ids["victim"]) is None
        elif op == "delete_snapshot":
            assert luns.catalog.snapshot(ids["victim-snap"]) is None
        elif op == "delete_group":
            assert luns.catalog.group(ids["group"]) is None and not luns.catalog.snapshots(group_id=ids["group"], state=None)
        first, second = crash_op(luns, op, ids), crash_op(luns, op, ids)
        assert first == second, "the retried call is not idempotent"
        _agrees(luns)
        if op in ("clone", "restore"):
            with open(luns.backend.volume_path(first), "rb") as f:
                assert f.read(MARKER_LEN) == marker_for("base"), "the retried clone lost the source's bytes"
        assert luns.catalog.volume(ids["base"]) is not None and luns.catalog.snapshot(ids["base-snap"]) is not None
    finally:
        luns.catalog.close()
