"""Streams that used to end in InternalError with Python's words in the status (issue 7,
hardening): too many compression or tar layers, and tar headers Python's tarfile parses
without checking, fail as InvalidImage with a sentence a person understands. Every stream
is built here, at test time, around the base raw disk. (Names longer than PATH_MAX in an
unpacked archive: test_hostile_archives.)
"""

from __future__ import annotations

import gzip
import io
import tarfile
import pytest

from importer import errors
from importer.errors import ImportFailed
from importer.pipeline import Target

from importer_support import MiB, assert_disk, assert_zero, block_target, run_import


def _tar_of(name: str, data: bytes, pax: dict[str, str] | None = None) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(name)
        info.size, info.pax_headers = len(data), pax or {}
        tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _layered(kinds: list[str], data: bytes) -> bytes:
    for kind in kinds:
        data = gzip.compress(data, 1) if kind == "gzip" else _tar_of("disk.img", data)
    return data


@pytest.mark.parametrize("kinds", [["gzip"] * 5, ["tar"] * 5, ["gzip", "tar", "gzip", "tar", "gzip"]])
def test_more_than_four_layers_of_compression_or_tar_is_an_invalid_image(kinds, images, py_http, tmp_path, scratch):
    name = f"layers-{'-'.join(kinds)}.bin"
    (images.dir / name).write_bytes(_layered(kinds, images.path("raw").read_bytes()))
    lun = block_target(tmp_path)
    with pytest.raises(ImportFailed) as failed:
        run_import({"http": {"url": f"{py_http.url}/img/{name}"}}, Target(str(lun), 16 * MiB), scratch)
    assert failed.value.reason == errors.INVALID_IMAGE
    assert "more than 4 layers of compression or tar" in failed.value.message
    assert_zero(lun)


def test_four_layers_are_still_unpacked(images, py_http, tmp_path, scratch):
    (images.dir / "layers-4.bin").write_bytes(_layered(["gzip", "tar", "gzip", "gzip"], images.path("raw").read_bytes()))
    lun = block_target(tmp_path)
    result, _ = run_import({"http": {"url": f"{py_http.url}/img/layers-4.bin"}}, Target(str(lun), 16 * MiB), scratch)
    assert result.layers == ("gzip", "gzip", "tar", "gzip")
    assert_disk(lun, images.expected["raw"], 16 * MiB)


@pytest.mark.parametrize("pax", [{"GNU.sparse.map": "a,b,c", "GNU.sparse.size": "100"},
                                 {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": "x",
                                  "GNU.sparse.realsize": "zz"}])
def test_tar_header_python_parses_without_checking_is_an_invalid_image(pax, images, py_http, request, tmp_path,
                                                                       scratch):
    name = f"bad-pax-{request.node.callspec.id}.bin"
    (images.dir / name).write_bytes(_tar_of("disk.img", images.path("raw").read_bytes()[:MiB], pax))
    lun = block_target(tmp_path)
    with pytest.raises(ImportFailed) as failed:
        run_import({"http": {"url": f"{py_http.url}/img/{name}"}}, Target(str(lun), 16 * MiB), scratch)
    assert failed.value.reason == errors.INVALID_IMAGE and "tar" in failed.value.message
    assert_zero(lun)
