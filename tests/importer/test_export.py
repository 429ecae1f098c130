"""A volume's disk back out, sparse, as raw or qcow2."""

from __future__ import annotations

import subprocess

import pytest

from importer.export import export_volume
from importer.pipeline import Target

from importer_support import MiB, allocated, assert_disk, block_target, published, run_import


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("mode", ["Block", "Filesystem"])
def test_export_round_trip_is_sparse_and_exact(fmt, mode, images, public, tmp_path, scratch):
    if mode == "Block":
        path = str(block_target(tmp_path))
    else:
        (tmp_path / "mnt").mkdir()
        path = str(tmp_path / "mnt")
    run_import({"http": {"url": f"file://{published(public, images.path('qcow2'))}"}}, Target(path, 16 * MiB, mode=mode), scratch,
               allow_file=True)
    out = tmp_path / f"out.{fmt}"
    export_volume(path, str(out), fmt)
    back = tmp_path / "back.raw"
    subprocess.run(["qemu-img", "convert", "-f", fmt, "-O", "raw", str(out), str(back)], check=True)
    assert_disk(back, images.expected["qcow2"])
    assert allocated(out) <= allocated(images.expected["raw"]) + 2 * MiB
