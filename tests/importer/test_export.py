"""A volume's disk back out, sparse, as raw or qcow2."""

from __future__ import annotations

import os
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


@pytest.mark.parametrize("kind", ["symlink", "fifo"])
def test_a_disk_img_that_is_not_a_regular_file_is_never_followed_into_an_export(kind, tmp_path):
    """A Filesystem volume's disk.img is its owner's to replace: a link to a root-only file of
    the host (or a FIFO, which would block) is refused, and nothing of the host file is written."""
    from importer.errors import ImportFailed

    canary = tmp_path / "canary"
    canary.write_bytes(b"root-only canary\n" * 4096)
    canary.chmod(0o600)
    volume = tmp_path / "mnt"
    volume.mkdir()
    if kind == "symlink":
        (volume / "disk.img").symlink_to(canary)
    else:
        os.mkfifo(volume / "disk.img")
    out = tmp_path / "out.raw"
    with pytest.raises(ImportFailed, match="disk.img is a (symbolic link|FIFO)"):
        export_volume(str(volume), str(out), "raw")
    assert not out.exists() and not (tmp_path / "out.raw.part").exists()
    assert canary.stat().st_mode & 0o777 == 0o600
