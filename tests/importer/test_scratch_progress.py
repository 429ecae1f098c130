"""An import through scratch (a qcow2 from a server without range requests: downloaded, then
converted) reports its progress over both steps: the download 0-50 %, then qemu-img convert's
own `-p` progress 50-100 %, not 0-50 % and a jump to 100 %."""

from __future__ import annotations

import os
import subprocess

import pytest

from importer.pipeline import Target

from importer_support import MiB, PyServer, assert_disk, block_target, run_import


@pytest.fixture(scope="module")
def spread_images(tmp_path_factory):
    """A 64 MiB disk with data in every other 2 MiB, as qcow2 and vmdk, served without ranges."""
    d = tmp_path_factory.mktemp("spread")
    raw = d / "spread.raw"
    with open(raw, "wb") as f:
        f.truncate(64 * MiB)
        for at in range(0, 64, 4):
            f.seek(at * MiB)
            f.write(os.urandom(2 * MiB))
    for fmt in ("qcow2", "vmdk"):
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", fmt, str(raw), str(d / f"{fmt}.bin")], check=True)
    srv = PyServer(d, None)
    yield srv, raw
    srv.shutdown()
    srv.server_close()


@pytest.mark.parametrize("fmt", ["qcow2", "vmdk"])
def test_progress_through_scratch_covers_download_and_convert(fmt, spread_images, tmp_path, scratch):
    srv, raw = spread_images
    lun = block_target(tmp_path, 64 * MiB)
    result, progress = run_import({"http": {"url": f"{srv.url}/img/{fmt}.bin"}}, Target(str(lun), 64 * MiB), scratch)
    assert result.method == "scratch"
    assert_disk(lun, raw, 64 * MiB)
    assert progress == sorted(progress) and progress[-1] == 100.0
    download = [p for p in progress if 0 < p < 50]
    convert = [p for p in progress if 50 < p < 100]
    assert len(download) >= 5 and max(download) > 40, progress  # the download, as the bytes arrive
    assert 50.0 in progress, progress  # the download done: the checks and the convert begin
    # qemu-img convert -p's own steps (at least 16 for this image), every one scaled into 50-100,
    # also when a fast convert prints several in one read
    assert len(convert) >= 10 and min(convert) < 55 and max(convert) > 95, progress
