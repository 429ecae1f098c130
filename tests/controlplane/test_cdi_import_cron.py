"""CDI's DataImportCron through `pvlun serve`, against Debian's docker-registry on loopback:
the first import at creation, a new image pushed under the same tag imported at the next tick
of the schedule with the DataSource moving to it, and only importsToKeep imports kept.

The schedule fires once a year; the test moves the clock instead of waiting: it runs the
poll (`poll_if_due`, what the daemon runs with the real time) with the time of the next tick."""

from __future__ import annotations

import hashlib
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "importer"))

from importer_support import pki, stop  # noqa: E402,F401  (pki: a fixture)
from registry_support import build_oci_layout, push_image, serve_registry  # noqa: E402

from controlplane.cron_schedule import CronSchedule  # noqa: E402
from manifests import clone_grant  # noqa: E402
from importer.import_cron import DESIRED_DIGEST, RETRY_SECONDS, dv_name, poll_if_due  # noqa: E402

MiB = 1 << 20
SCHEDULE = "0 3 1 1 *"  # 03:00 on the first of January: never during a test


@pytest.fixture(scope="module")
def registry(pki, tmp_path_factory):
    d = tmp_path_factory.mktemp("registry")
    proc, host = serve_registry(d, pki)
    yield d, host
    stop(proc)


def push_disk(registry, pki, version: int) -> bytes:
    """A new 8 MiB raw disk as golden/tick:latest; its bytes."""
    d, host = registry
    disk = os.urandom(MiB) + bytes(6 * MiB) + f"golden v{version}".encode().ljust(MiB, b".")
    layout = d / f"v{version}"
    build_oci_layout(layout, "latest", [({"disk/disk.img": disk}, "gzip")])
    push_image(layout, "latest", pki, f"docker://{host}/golden/tick:latest")
    return disk


def cron_yaml(host: str) -> str:
    return f"""apiVersion: cdi.kubevirt.io/v1beta1
kind: DataImportCron
metadata:
  name: tick-cron
  namespace: os-images
spec:
  template:
    metadata:
      labels:
        os: tick
    spec:
      source:
        registry:
          url: "docker://{host}/golden/tick:latest"
          certConfigMap: registry-ca
      storage:
        volumeMode: Block
        resources:
          requests:
            storage: 8Mi
  schedule: "{SCHEDULE}"
  garbageCollect: Outdated
  importsToKeep: 2
  managedDataSource: tick
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: registry-ca
  namespace: os-images
"""


def lun_bytes(inst, claim: str, namespace: str, length: int) -> bytes:
    with open(inst.lun_path(claim, namespace), "rb") as f:
        return f.read(length)


def settled(inst, digest: str):
    """The cron once the import of `digest` is done and its DataSource names it."""
    cron = inst.get("DataImportCron", "tick-cron", "os-images")
    ds = inst.get("DataSource", "tick", "os-images") or {}
    name = dv_name(cron, digest)
    conditions = {c["type"]: c["reason"] for c in (cron.get("status") or {}).get("conditions", [])}
    ready = {c["type"]: c["status"] for c in (ds.get("status") or {}).get("conditions", [])}
    if ((ds.get("spec") or {}).get("source") or {}).get("pvc", {}).get("name") == name \
            and conditions.get("UpToDate") == "UpToDate" and ready.get("Ready") == "True":
        return cron
    return None


def tick(inst, registry_host: str) -> str:
    """Run the poll at the schedule's next tick after the last one; the digest it recorded."""
    cron = inst.get("DataImportCron", "tick-cron", "os-images")
    from datetime import datetime, timezone
    last = datetime.strptime(cron["status"]["lastExecutionTimestamp"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    at = CronSchedule(SCHEDULE).next_after(last)
    assert poll_if_due(inst.store, cron, at - timedelta(minutes=1)) > 0  # not due a minute before: nothing read
    assert inst.get("DataImportCron", "tick-cron", "os-images")["status"]["lastExecutionTimestamp"] == \
        cron["status"]["lastExecutionTimestamp"]
    poll_if_due(inst.store, cron, at)
    return inst.get("DataImportCron", "tick-cron", "os-images")["metadata"]["annotations"][DESIRED_DIGEST]


def test_import_cron_imports_each_new_digest_moves_its_data_source_and_keeps_the_newest(instance, registry, pki):
    _d, host = registry
    disks = [push_disk(registry, pki, 1)]
    manifest = cron_yaml(host) + f"data:\n  ca.pem: |\n" + "".join(f"    {line}\n" for line in pki.ca_pem.splitlines())
    instance.apply(manifest)
    digests = [instance.wait(lambda: (instance.get("DataImportCron", "tick-cron", "os-images")["metadata"]
                                      .get("annotations") or {}).get(DESIRED_DIGEST), 30, "the first digest check")]
    cron = instance.wait(lambda: settled(instance, digests[0]), 60, "the first import")
    status = cron["status"]
    first = dv_name(cron, digests[0])
    assert first == "tick-" + digests[0].removeprefix("sha256:")[:12]
    assert status["lastImportedPVC"] == {"name": first, "namespace": "os-images"}
    assert status["currentImports"] == [{"DataVolumeName": first, "Digest": digests[0]}]
    assert {c["type"]: c["status"] for c in status["conditions"]} == {"UpToDate": "True", "Progressing": "False"}
    assert lun_bytes(instance, first, "os-images", len(disks[0])) == disks[0]
    dv = instance.get("DataVolume", first, "os-images")
    assert dv["spec"]["source"]["registry"]["url"] == f"docker://{host}/golden/tick@{digests[0]}"  # pinned
    assert dv["metadata"]["labels"] == {"os": "tick", "cdi.kubevirt.io/dataImportCron": "tick-cron"}

    # the same image at the next tick: nothing new
    assert tick(instance, host) == digests[0]
    # new images under the same tag: each tick imports the new digest and moves the DataSource
    for version in (2, 3):
        disks.append(push_disk(registry, pki, version))
        digests.append(tick(instance, host))
        assert digests[-1] != digests[-2]
        cron = instance.wait(lambda: settled(instance, digests[-1]), 60, f"import of v{version}")
        assert lun_bytes(instance, dv_name(cron, digests[-1]), "os-images", len(disks[-1])) == disks[-1]
    # importsToKeep 2: the first import is gone, the last two stay
    names = [dv_name(cron, d) for d in digests]
    instance.wait(lambda: instance.get("DataVolume", names[0], "os-images") is None, 20, "the oldest import collected")
    assert all(instance.get("DataVolume", n, "os-images") for n in names[1:])
    # what the golden image stands for now: a DataVolume by sourceRef clones v3 (granted, as CDI asks)
    instance.apply(clone_grant("os-images", "default"))
    instance.apply(f"""apiVersion: cdi.kubevirt.io/v1beta1
kind: DataVolume
metadata:
  name: from-golden
spec:
  sourceRef:
    kind: DataSource
    name: tick
    namespace: os-images
  storage:
    volumeMode: Block
    resources:
      requests:
        storage: 8Mi
""", "--wait")
    assert lun_bytes(instance, "from-golden", "default", len(disks[-1])) == disks[-1]
    assert hashlib.sha256(disks[-1]).digest() != hashlib.sha256(disks[0]).digest()
    # retentionPolicy All (the default): the golden image outlives its cron
    instance.cli("delete", "dic", "tick-cron", "-n", "os-images")
    instance.wait(lambda: instance.get("DataImportCron", "tick-cron", "os-images") is None, 20, "the cron gone")
    time.sleep(1)  # the garbage collector's turn: nothing of the cron's names it as owner
    assert instance.get("DataSource", "tick", "os-images")["spec"]["source"]["pvc"]["name"] == names[-1]
    assert all(instance.get("DataVolume", n, "os-images") for n in names[1:])


def test_cdis_documented_import_cron_and_source_ref_are_admitted_as_written():
    from controlplane.admission import load_documents

    from test_deploy_crds import GOLDEN_MANIFESTS  # CDI's documented DataImportCron and sourceRef DataVolume

    cron, ref, *_ = load_documents(GOLDEN_MANIFESTS)
    assert cron["spec"]["importsToKeep"] == 2 and ref["spec"]["sourceRef"] == {"kind": "DataSource", "name": "fedora"}


def test_import_cron_fields_are_checked_at_apply(instance):
    bad = cron_yaml("127.0.0.1:1").replace(SCHEDULE, "every day")
    out = instance.apply(bad, check=False)
    assert out.returncode != 0 and "spec.schedule" in out.stderr
    bad = cron_yaml("127.0.0.1:1").replace("        registry:\n          url:", "        http:\n          url:")
    out = instance.apply(bad, check=False)
    assert out.returncode != 0 and "a DataImportCron imports from a registry" in out.stderr


def test_a_digest_check_that_fails_is_told_and_tried_again_later(instance):
    instance.apply(cron_yaml("127.0.0.1:1").replace("namespace: os-images", "namespace: unreachable")
                   .replace("          certConfigMap: registry-ca\n", "")
                   .replace("  managedDataSource: tick\n", "  managedDataSource: tick\n  retentionPolicy: None\n"))
    cron = instance.wait(lambda: (c := instance.get("DataImportCron", "tick-cron", "unreachable")) and
                         (c.get("status") or {}).get("lastExecutionTimestamp") and c, 30, "the first check")
    events = instance.store.events(cron)
    assert [e["reason"] for e in events if e["type"] == "Warning"] == ["DigestCheckFailed"]
    assert "127.0.0.1:1" in events[0]["message"], events[0]["message"]
    conditions = {c["type"]: c["reason"] for c in instance.get("DataImportCron", "tick-cron", "unreachable")["status"]
                  .get("conditions", [])}
    assert conditions.get("UpToDate") == "NoDigest"
    assert instance.get("DataVolume", "tick", "unreachable") is None
    assert not [dv for dv in instance.store.list("DataVolume", "unreachable")]
    # not before RETRY_SECONDS (no retry storm), then again
    from datetime import datetime, timezone
    last = datetime.strptime(cron["status"]["lastExecutionTimestamp"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    assert poll_if_due(instance.store, cron, last + timedelta(seconds=RETRY_SECONDS - 5)) > 0
    status = lambda: instance.get("DataImportCron", "tick-cron", "unreachable")["status"]  # noqa: E731
    assert status()["lastExecutionTimestamp"] == cron["status"]["lastExecutionTimestamp"]
    poll_if_due(instance.store, cron, last + timedelta(seconds=RETRY_SECONDS))
    again = (last + timedelta(seconds=RETRY_SECONDS)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert status()["lastExecutionTimestamp"] == again and status()["conditions"][0]["reason"] == "NoDigest"
    # retentionPolicy None: what it made goes with it
    assert instance.get("DataSource", "tick", "unreachable") is not None
    instance.cli("delete", "dataimportcron", "tick-cron", "-n", "unreachable")
    instance.wait(lambda: instance.get("DataSource", "tick", "unreachable") is None, 20, "its DataSource collected")
    out = instance.apply(cron_yaml("127.0.0.1:1").replace(SCHEDULE, "0 0 31 2 *"), check=False)
    assert out.returncode != 0 and "never fires" in out.stderr
