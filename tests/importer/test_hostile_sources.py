"""Sources that change under the importer, and `file://` read as the sandbox user (issue 7,
hardening).

- A range server (nginx) that answers the checks (`qemu-img info`, `check`) with a clean image
  and the conversion with its same-length twin, which names a host file the conversion's
  sandbox holds (`/usr/bin/qemu-img`) as its qcow2 data file or as a VMDK flat extent: the
  volume holds the clean image, never the named file (qcow2 in place, its checked blocks
  pinned; VMDK from a local copy). The same for a `file://` image rewritten in place, or
  replaced by a link to the twin, between the checks and the conversion.
- `file://` is opened once, as the sandbox user: a file in a directory that user cannot enter
  is refused (test_hostile_images), and a path swapped for a link to a root-only file after
  the checks is never followed.
- With every check off, an image naming a public file under /usr/share finds none.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from importer import errors, formats
from importer.errors import ImportFailed
from importer.pipeline import Target
from importer.sources import FileSource

from hostile_support import checks_off, qcow2_data_file, vmdk_embedded, vmdk_patched  # noqa: F401  (a fixture)
from importer_support import MiB, assert_disk, assert_zero, block_target, published, qemu_img, run_import

NAMED = "/usr/bin/qemu-img"  # a host file every qemu-img sandbox holds


@dataclass(frozen=True)
class Twins:
    fmt: str
    clean: bytes  # the image the checks see
    twin: bytes   # what the source holds by the conversion: names NAMED, as a data file or an extent
    raw: Path     # the disk the clean image holds


@pytest.fixture(params=["qcow2", "vmdk"])
def twins(request, tmp_path) -> Twins:
    """A clean image (random data) and its same-length twin, which reads NAMED as its data: a
    qcow2 whose header names an external data file (a layout of its own: the clean image's data
    clusters are not where the clean one has them), or the clean monolithicSparse VMDK with a
    descriptor naming a flat extent (only its metadata differs)."""
    fmt = request.param
    raw = tmp_path / "disk.raw"
    raw.write_bytes(os.urandom(MiB) + bytes(MiB))
    clean = tmp_path / f"clean.{fmt}"
    qemu_img("convert", "-f", "raw", "-O", fmt, *(["-o", "subformat=monolithicSparse"] if fmt == "vmdk" else []),
             str(raw), str(clean))
    if fmt == "vmdk":
        twin = vmdk_patched(clean.read_bytes(), "monolithicFlat", [f'RW 2048 FLAT "{NAMED}" 0'])
    else:  # a qcow2 of its own layout, padded to the same length
        qcow2_data_file(tmp_path / "twin.qcow2", NAMED, tmp_path)
        twin = (tmp_path / "twin.qcow2").read_bytes()
        assert len(twin) <= clean.stat().st_size
        twin = twin.ljust(clean.stat().st_size, b"\0")
    control = tmp_path / "twin.raw"  # the twin converted outside any sandbox: it really reads NAMED
    (tmp_path / "twin.img").write_bytes(twin)
    subprocess.run(["qemu-img", "convert", "-f", fmt, "-O", "raw", str(tmp_path / "twin.img"), str(control)],
                   check=True, capture_output=True)
    assert control.read_bytes()[:MiB] == Path(NAMED).read_bytes()[:MiB]
    return Twins(fmt, clean.read_bytes(), twin, raw)


def swap_after_the_checks(monkeypatch, swap) -> list[str]:
    """Run `swap()` the moment the real checks of an in-place image are done."""
    checked = formats.verify_integrity
    done: list[str] = []

    def then_swap(node, **kwargs):
        checked(node, **kwargs)
        swap()
        done.append(node.fmt)

    monkeypatch.setattr(formats, "verify_integrity", then_swap)
    return done


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def assert_holds_the_checked_image(lun: Path, twins: Twins) -> None:
    """Never a byte of NAMED; the clean image exactly when the twin keeps its data (VMDK): a
    qcow2 twin's clusters lie elsewhere, and data is whatever the source serves, as for any image."""
    data = lun.read_bytes()
    assert b"\x7fELF" not in data and Path(NAMED).read_bytes()[64 * 1024:128 * 1024] not in data, \
        "the named host file reached the volume"
    if twins.fmt == "vmdk":
        assert_disk(lun, twins.raw, 16 * MiB)


METHOD = {"qcow2": "direct", "vmdk": "scratch"}  # VMDK is always converted from a local copy


def test_range_server_swapping_the_image_after_the_checks_gets_the_checked_one_converted(
        twins, nginx, images, monkeypatch, tmp_path, scratch):
    served = images.dir / f"swapping-{twins.fmt}.bin"
    served.write_bytes(twins.clean)
    staged = images.dir / f"swapping-{twins.fmt}-twin.part"
    staged.write_bytes(twins.twin)
    done = swap_after_the_checks(monkeypatch, lambda: os.replace(staged, served))
    lun = block_target(tmp_path)
    result, _ = run_import({"http": {"url": f"{nginx.url}/img/{served.name}"}}, Target(str(lun), 16 * MiB), scratch)
    assert done == [twins.fmt] and served.read_bytes() == twins.twin, "the server swapped between the checks and the convert"
    assert result.method == METHOD[twins.fmt] and result.format == twins.fmt
    assert_holds_the_checked_image(lun, twins)


@pytest.mark.parametrize("how", ["rewritten-in-place", "replaced-by-a-link"])
def test_file_swapped_after_the_checks_gets_the_checked_one_converted(how, twins, public, monkeypatch, tmp_path,
                                                                     scratch):
    path = public / f"swapping-{how}.{twins.fmt}"
    path.write_bytes(twins.clean)
    os.chmod(path, 0o644)
    other = public / f"twin-{how}.{twins.fmt}"
    other.write_bytes(twins.twin)
    os.chmod(other, 0o644)

    def swap() -> None:
        if how == "rewritten-in-place":
            with open(path, "r+b") as f:
                f.write(twins.twin)
        else:
            os.unlink(path)
            os.symlink(other, path)

    done = swap_after_the_checks(monkeypatch, swap)
    lun = block_target(tmp_path)
    result, _ = run_import({"http": {"url": f"file://{path}"}}, Target(str(lun), 16 * MiB), scratch, allow_file=True)
    assert done == [twins.fmt] and path.read_bytes() == twins.twin
    assert result.method == METHOD[twins.fmt]
    assert_holds_the_checked_image(lun, twins)


def test_file_source_streams_the_file_it_opened_not_what_its_path_names_later(public, tmp_path):
    data = os.urandom(3 * MiB)
    path = published(public, _write(tmp_path / "disk.raw", data))
    secret = _write(tmp_path / "root-only", b"root only " * 1000)
    os.chmod(secret, 0o600)
    source = FileSource(str(path))
    try:
        info = source.info()
        os.unlink(path)
        os.symlink(secret, path)  # swapped after the check, before the transfer
        assert info.head == data[:formats.HEAD_SIZE] and info.size == len(data)
        assert source.transfer().read() == data
    finally:
        source.close()


def test_file_source_that_is_no_regular_file_is_refused(public, tmp_path, scratch):
    fifo = public / "a-fifo"
    os.mkfifo(fifo, 0o644)
    lun = block_target(tmp_path)
    with pytest.raises(ImportFailed) as failed:
        run_import({"http": {"url": f"file://{fifo}"}}, Target(str(lun), 16 * MiB), scratch, allow_file=True)
    assert failed.value.reason == errors.INVALID_SOURCE and "not a regular file" in failed.value.message
    assert_zero(lun)


def test_with_every_check_off_public_files_under_usr_share_are_out_of_the_sandbox(checks_off, nginx, images, tmp_path,
                                                                                 scratch):
    public_file = "/usr/share/common-licenses/GPL-3"
    assert os.path.isfile(public_file)
    image = images.dir / "names-usr-share.bin"
    vmdk_embedded(image, "monolithicSparse", "monolithicFlat", [f'RW 2048 FLAT "{public_file}" 0'])
    lun = block_target(tmp_path)
    with pytest.raises(ImportFailed) as failed:
        run_import({"http": {"url": f"{nginx.url}/img/{image.name}"}}, Target(str(lun), 16 * MiB), scratch)
    assert failed.value.reason == errors.INVALID_IMAGE and "No such file" in failed.value.message
    assert b"GNU GENERAL PUBLIC LICENSE" not in lun.read_bytes()
    assert_zero(lun)
