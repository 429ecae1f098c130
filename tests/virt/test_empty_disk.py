"""An emptyDisk is a file in the data dir, outside the pool's accounting: a capacity above the
limit is refused at admission and one above the free space where it would live at start, both
naming the field; the file is made whole or not at all, and a VM never starts with an emptyDisk
of the wrong size (what an earlier failed start left)."""

from __future__ import annotations

import os
import subprocess

import pytest
import yaml

from controlplane.admission import Refused, load_documents
from virt.local_volumes import local_attachments
from controlplane.vm_spec import SpecError, parse_virtual_machine

FIELD = "spec.template.spec.volumes[1].emptyDisk.capacity"


def with_empty_disk(manifest, capacity: str) -> dict:
    return manifest(disks=[{"name": "root", "disk": {}, "bootOrder": 1}, {"name": "scratch", "disk": {}}],
                    volumes=[{"name": "root", "persistentVolumeClaim": {"claimName": "r"}},
                             {"name": "scratch", "emptyDisk": {"capacity": capacity}}])


@pytest.mark.parametrize("capacity", ["1Ti", "1Ei", "257Gi"])
def test_an_empty_disk_over_the_limit_is_refused_at_admission_naming_the_field(manifest, capacity):
    with pytest.raises(Refused) as err:
        load_documents(yaml.safe_dump(with_empty_disk(manifest, capacity)))
    assert FIELD in str(err.value) and "256Gi" in str(err.value) and "\n" not in str(err.value)


def test_an_empty_disk_over_the_free_space_is_refused_at_start_naming_the_field(manifest, tmp_path):
    spec = parse_virtual_machine(with_empty_disk(manifest, "64Mi")).template
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "pvlun-test", str(small)], check=True)
    try:
        with pytest.raises(SpecError) as err:
            local_attachments(spec, small / "run")
        assert err.value.path == FIELD and "free" in err.value.message
        assert os.listdir(small / "run") == []  # nothing half made
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_an_empty_disk_of_the_wrong_size_is_made_anew(manifest, tmp_path):
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    (run / "scratch.empty.img").write_bytes(b"")  # what a start failing with "File too large" left
    spec = parse_virtual_machine(with_empty_disk(manifest, "64Mi")).template
    disks = local_attachments(spec, run)
    assert os.path.getsize(disks["scratch"].path) == 64 << 20
    assert sorted(os.listdir(run)) == ["scratch.empty.img"]
