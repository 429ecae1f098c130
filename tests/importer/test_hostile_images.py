"""Images never make qemu open anything it was not handed (issue 7, section 1).

Every image is built here, at test time, around a canary: a 0600 root-only file of
distinctive bytes. A hostile image names it (VMDK extents in a text descriptor or in the
descriptor embedded in a sparse header, qcow2 backing and data files in every spelling,
differencing VHD/VDI/VHDX) and must fail with its reason, leave the target reading as zeros
(a Filesystem volume empty) and put none of the canary's bytes into it: through a range
server (qemu reads in place through nbdkit), a server without ranges (scratch), the upload
server, `file://`, into Block and Filesystem volumes. Then with every check switched off, to
show the sandbox alone keeps the canary out. Also: fixed VHDs (raw data and a footer) and
sources whose declared size is already too large.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import ssl
import struct
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from importer import errors, formats, references
from importer.errors import ImportFailed
from importer.pipeline import Target
from importer.upload_client import upload_image
from importer.upload_server import issue_token

from hostile_support import (  # noqa: F401  (checks_off is a fixture)
    checks_off,
    fixed_vhd,
    qcow2_data_file,
    vdi_differencing,
    vhd_checksum,
    vhd_differencing,
    vhdx_with_parent,
    vmdk_embedded,
    vmdk_text,
)
from importer_support import KEY, MiB, assert_disk, assert_zero, block_target, published, qemu_img, run_import

SIZE = 16 * MiB


@dataclass(frozen=True)
class Canary:
    path: str
    token: bytes


@pytest.fixture(scope="module")
def canary(tmp_path_factory) -> Canary:
    path = tmp_path_factory.mktemp("canary") / "canary"
    token = b"PVLUN-CANARY-" + os.urandom(8).hex().encode() + b"|"
    path.write_bytes(token * (2 * MiB // len(token)))
    os.chmod(path, 0o600)
    return Canary(str(path), token)


# name -> expected reason, for images that name the canary (or a parent)
REFUSED = {
    "vmdk-text-flat": errors.BACKING_FILE,
    "vmdk-text-sparse": errors.BACKING_FILE,
    "vmdk-text-vmfs": errors.BACKING_FILE,
    "vmdk-text-zero-flat": errors.BACKING_FILE,
    "vmdk-text-many": errors.BACKING_FILE,
    "vmdk-text-vmfssparse": errors.BACKING_FILE,
    "kdmv-sparse-flat": errors.BACKING_FILE,
    "kdmv-sparse-vmfs-many": errors.BACKING_FILE,
    "kdmv-sparse-twogb-sparse": errors.BACKING_FILE,
    "kdmv-stream-flat": errors.BACKING_FILE,
    "kdmv-stream-sesparse": errors.BACKING_FILE,
    "kdmv-usr-file": errors.BACKING_FILE,      # a file that exists inside the sandbox: refused from qemu-img info
    "kdmv-parent-hint": errors.BACKING_FILE,
    "qcow2-backing-path": errors.BACKING_FILE,
    "qcow2-backing-json": errors.BACKING_FILE,
    "qcow2-backing-nbd": errors.BACKING_FILE,
    "qcow2-backing-http": errors.BACKING_FILE,
    "qcow2-data-file": errors.DATA_FILE,
    "qcow2-data-file-json": errors.DATA_FILE,
    "qcow2-data-file-nbd": errors.DATA_FILE,
    "vhd-differencing": errors.BACKING_FILE,
    "vdi-differencing": errors.BACKING_FILE,
    "vhdx-differencing": errors.INVALID_IMAGE,  # qemu 7.2 cannot open a differencing VHDX at all
}


@pytest.fixture(scope="module")
def hostile(images, canary, tmp_path_factory) -> dict[str, Path]:
    """Every hostile image, served by the same servers as the good ones (as <name>.bin)."""
    d, work = images.dir, tmp_path_factory.mktemp("hostile")
    c = canary.path
    out = {name: d / f"hostile-{name}.bin" for name in REFUSED}
    vmdk_text(out["vmdk-text-flat"], "monolithicFlat", [f'RW 2048 FLAT "{c}" 0'])
    vmdk_text(out["vmdk-text-sparse"], "twoGbMaxExtentSparse", [f'RW 2048 SPARSE "{c}"'])
    vmdk_text(out["vmdk-text-vmfs"], "vmfs", [f'RW 2048 VMFS "{c}"'])
    vmdk_text(out["vmdk-text-zero-flat"], "monolithicFlat", ["RW 1024 ZERO", f'RW 1024 FLAT "{c}" 0'])
    vmdk_text(out["vmdk-text-many"], "twoGbMaxExtentFlat", [f'RW 1024 FLAT "{c}" 0', f'RW 1024 FLAT "{c}" 1024'])
    vmdk_text(out["vmdk-text-vmfssparse"], "vmfsSparse", [f'RW 2048 VMFSSPARSE "{c}"'])
    vmdk_embedded(out["kdmv-sparse-flat"], "monolithicSparse", "monolithicFlat", [f'RW 2048 FLAT "{c}" 0'])
    vmdk_embedded(out["kdmv-sparse-vmfs-many"], "monolithicSparse", "vmfs",
                  ["RW 512 ZERO", f'RW 1024 VMFS "{c}"', f'RW 1024 FLAT "{c}" 1024'])
    vmdk_embedded(out["kdmv-sparse-twogb-sparse"], "monolithicSparse", "twoGbMaxExtentSparse", [f'RW 2048 FLAT "{c}" 0'])
    vmdk_embedded(out["kdmv-stream-flat"], "streamOptimized", "twoGbMaxExtentFlat", [f'RW 2048 FLAT "{c}" 0'])
    vmdk_embedded(out["kdmv-stream-sesparse"], "streamOptimized", "seSparse", [f'RW 2048 FLAT "{c}" 0'])
    vmdk_embedded(out["kdmv-usr-file"], "monolithicSparse", "monolithicFlat", ['RW 2048 FLAT "/usr/bin/qemu-img" 0'])
    vmdk_embedded(out["kdmv-parent-hint"], "monolithicSparse", "monolithicSparse", [], capacity_zero=False, parent=c)
    for name, backing in (("path", c), ("json", json.dumps({"driver": "file", "filename": c})),
                          ("nbd", "nbd:unix:/tmp/pvlun-test-nbd.sock"), ("http", "http://127.0.0.1:9/disk.img")):
        qemu_img("create", "-f", "qcow2", "-u", "-b", backing, "-F", "raw", str(out[f"qcow2-backing-{name}"]), "1M")
    qcow2_data_file(out["qcow2-data-file"], c, work)
    qcow2_data_file(out["qcow2-data-file-json"], json.dumps({"driver": "file", "filename": c}), work)
    qcow2_data_file(out["qcow2-data-file-nbd"], "nbd:unix:/tmp/pvlun-test-nbd.sock", work)
    vhd_differencing(out["vhd-differencing"])
    vdi_differencing(out["vdi-differencing"])
    vhdx_with_parent(out["vhdx-differencing"])
    for path in out.values():
        os.chmod(path, 0o644)
    return out


# -- importing them -------------------------------------------------------------------------------
def _target(tmp_path: Path, mode: str) -> Target:
    if mode == "Filesystem":
        vol = tmp_path / "mnt"
        vol.mkdir()
        return Target(str(vol), SIZE, mode="Filesystem")
    return Target(str(block_target(tmp_path, SIZE)), SIZE)


def _import(via: str, path: Path, target: Target, scratch: str, request) -> object:
    """Import `path` the way `via` names: range (nginx, in place), scratch (no ranges), upload, file."""
    if via == "upload":
        srv, control = request.getfixturevalue("upload")
        key = f"default/{request.node.name}"[:200]
        control.targets[key] = target
        try:
            return upload_image(srv.url, issue_token(KEY, key), str(path), ca_file=srv.cert_file)
        finally:
            assert control.events[-1][:2] == ("done", key), "the control plane hears how the upload ended"
    if via == "file":  # a world-readable copy where the sandbox user can reach it
        public = published(request.getfixturevalue("public"), path)
        return run_import({"http": {"url": f"file://{public}"}}, target, scratch, allow_file=True)
    server = request.getfixturevalue("nginx" if via == "range" else "py_http")
    return run_import({"http": {"url": f"{server.url}/img/{path.name}"}}, target, scratch)


def assert_untouched(target: Target, canary: Canary) -> None:
    """The failed import left nothing: zeros (a Block volume) or no file at all (Filesystem)."""
    if target.mode == "Filesystem":
        assert os.listdir(target.path) == [], "disk.img of a failed import is gone"
        return
    assert canary.token not in Path(target.path).read_bytes()
    assert_zero(target.path)


def assert_readable(err: ImportFailed, scratch: str) -> None:
    """A sentence for a person: no traceback, none of the daemon's own paths (scratch, sockets)."""
    for hidden in ("Traceback", scratch, "pvlun-scratch-", "pvlun-nbd-", "json:{"):
        assert hidden not in err.message, err.message


def expect_refused(via: str, name: str, path: Path, target: Target, scratch: str, request, canary: Canary) -> ImportFailed:
    with pytest.raises(ImportFailed) as info:
        _import(via, path, target, scratch, request)
    assert info.value.reason == REFUSED[name], info.value
    assert_readable(info.value, scratch)
    assert_untouched(target, canary)
    assert os.listdir(scratch) == [], "scratch space is cleaned up"
    return info.value


@pytest.mark.parametrize("name", sorted(REFUSED))
@pytest.mark.parametrize("via", ["range", "scratch"])
def test_image_naming_another_file_is_refused_and_the_canary_never_reaches_the_volume(
        name, via, hostile, canary, request, tmp_path, scratch):
    err = expect_refused(via, name, hostile[name], _target(tmp_path, "Block"), scratch, request, canary)
    if REFUSED[name] != errors.INVALID_IMAGE:
        assert "self-contained" in err.message or "monolithic" in err.message


@pytest.mark.parametrize("name", ["vmdk-text-flat", "kdmv-sparse-flat", "kdmv-usr-file", "qcow2-data-file"])
@pytest.mark.parametrize("via", ["upload", "range", "scratch"])
def test_image_naming_another_file_into_a_filesystem_volume_is_refused(name, via, hostile, canary, request, tmp_path,
                                                                       scratch):
    expect_refused(via, name, hostile[name], _target(tmp_path, "Filesystem"), scratch, request, canary)


@pytest.mark.parametrize("name", ["vmdk-text-zero-flat", "kdmv-sparse-vmfs-many", "kdmv-stream-sesparse",
                                  "qcow2-backing-nbd", "qcow2-data-file-nbd", "vdi-differencing"])
def test_image_naming_another_file_is_refused_through_the_upload_server(name, hostile, canary, request, tmp_path,
                                                                        scratch):
    expect_refused("upload", name, hostile[name], _target(tmp_path, "Block"), scratch, request, canary)


def test_extent_named_relative_to_a_file_source_is_refused(canary, public, tmp_path, scratch):
    """file://: a world-readable copy of the canary sits right beside the image, named by a relative extent."""
    beside = public / "relative"
    beside.mkdir(mode=0o755)
    published(beside, canary.path, "canary")
    image = beside / "beside.vmdk"
    vmdk_embedded(image, "monolithicSparse", "monolithicFlat", ['RW 2048 FLAT "canary" 0'])
    os.chmod(image, 0o644)
    target = _target(tmp_path, "Block")
    with pytest.raises(ImportFailed) as info:
        run_import({"http": {"url": f"file://{image}"}}, target, scratch, allow_file=True)
    assert info.value.reason == errors.BACKING_FILE and "canary" in info.value.message
    assert_untouched(target, canary)


def test_file_source_the_sandbox_user_cannot_read_is_refused_with_the_reason(canary, images, public, tmp_path, scratch):
    private = published(public, images.path("qcow2"), "private.qcow2")
    os.chmod(private, 0o600)
    hidden_dir = public / "root-only"  # a world-readable file in a directory only root may enter
    hidden_dir.mkdir(mode=0o700)
    hidden = published(hidden_dir, images.path("qcow2"))
    for path in (private, hidden):
        (tmp_path / path.stem).mkdir()
        target = _target(tmp_path / path.stem, "Block")
        with pytest.raises(ImportFailed) as info:
            run_import({"http": {"url": f"file://{path}"}}, target, scratch, allow_file=True)
        assert info.value.reason == errors.INVALID_SOURCE, path
        assert "not readable by the unprivileged user" in info.value.message and "chmod o+r" in info.value.message
        assert_zero(target.path)


# -- the decision itself, from what qemu-img 7.2 prints ---------------------------------------------
def _info_as_root(path: Path, fmt: str) -> dict:
    """`qemu-img info` outside any sandbox (as root, on the test's own canary): what qemu sees."""
    out = subprocess.run(["qemu-img", "info", "--output=json", formats.local_image(str(path), fmt).spec],
                         check=True, capture_output=True)
    return json.loads(out.stdout)


@pytest.mark.parametrize("name", ["vmdk-text-flat", "vmdk-text-vmfs", "vmdk-text-zero-flat", "vmdk-text-many",
                                  "kdmv-sparse-flat", "kdmv-sparse-vmfs-many", "kdmv-sparse-twogb-sparse",
                                  "kdmv-stream-flat", "kdmv-stream-sesparse", "kdmv-usr-file", "kdmv-parent-hint",
                                  "qcow2-backing-path", "qcow2-backing-json", "qcow2-backing-nbd", "qcow2-backing-http",
                                  "qcow2-data-file", "qcow2-data-file-json", "qcow2-data-file-nbd"])
def test_every_reference_qemu_img_info_shows_is_refused(name, hostile):
    info = _info_as_root(hostile[name], name.split("-")[0].replace("kdmv", "vmdk"))
    with pytest.raises(ImportFailed) as refused:
        references.refuse_references(info)
    assert refused.value.reason == REFUSED[name]


@pytest.mark.parametrize("fmt,subformat", [("vmdk", "monolithicSparse"), ("vmdk", "streamOptimized"), ("qcow2", None)])
def test_self_contained_images_pass_the_reference_check(fmt, subformat, tmp_path):
    image = tmp_path / "ok.img"
    qemu_img("create", "-f", fmt, *(["-o", f"subformat={subformat}"] if subformat else []), str(image), "1M")
    references.refuse_references(_info_as_root(image, fmt))


def test_sparse_vmdk_whose_descriptor_text_names_the_canary_reads_only_itself(canary, nginx, tmp_path, scratch, images):
    """The extent lines of a monolithic sparse VMDK's own descriptor are not followed: qemu-img
    info lists the image itself as its only extent, and the import holds only its own bytes."""
    image = images.dir / "hostile-kdmv-descriptor-text-only.bin"
    vmdk_embedded(image, "monolithicSparse", "monolithicSparse", [f'RW 2048 FLAT "{canary.path}" 0'], capacity_zero=False)
    info = _info_as_root(image, "vmdk")
    assert [e["filename"] for e in info["format-specific"]["data"]["extents"]] == [info["filename"]]
    lun = block_target(tmp_path, SIZE)
    result, _ = run_import({"http": {"url": f"{nginx.url}/img/{image.name}"}}, Target(str(lun), SIZE), scratch)
    assert result.format == "vmdk" and result.virtual_size == MiB
    assert_zero(lun)  # the image holds no data, and none came from the canary


# -- the sandbox alone ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["vmdk-text-many", "kdmv-sparse-flat", "kdmv-stream-flat", "qcow2-data-file"])
@pytest.mark.parametrize("via,mode", [("range", "Block"), ("upload", "Block"), ("scratch", "Filesystem")])
def test_with_every_check_switched_off_the_sandbox_alone_keeps_the_canary_out(
        name, via, mode, hostile, canary, checks_off, request, tmp_path, scratch):
    fmt = name.split("-")[0].replace("kdmv", "vmdk")
    control = tmp_path / "control.raw"  # the same image converted by qemu-img outside the sandbox, as root
    subprocess.run(["qemu-img", "convert", "-O", "raw", formats.local_image(str(hostile[name]), fmt).spec, str(control)],
                   check=True, capture_output=True)
    assert canary.token in control.read_bytes(), "the crafted image really reads the canary when qemu can reach it"
    target = _target(tmp_path, mode)
    with pytest.raises(ImportFailed) as info:
        _import(via, hostile[name], target, scratch, request)
    assert info.value.reason == errors.INVALID_IMAGE
    assert "No such file or directory" in info.value.message
    assert_readable(info.value, scratch)
    assert_untouched(target, canary)


def _processes(needle: bytes) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[0] == b"nbdkit" and any(needle in arg for arg in argv):
            found.append(pid)
    return found


def test_nbdkit_serves_from_its_sandbox_as_nobody_and_stops_with_its_import(nginx, images, tmp_path):
    from importer.sources.http import NbdkitCurl

    url = f"{nginx.url}/img/qcow2.bin"
    nbd = NbdkitCurl(url, os.path.getsize(images.path("qcow2")), auth=("user", "s3cret-pass"), cainfo=None)
    spec = nbd.attach(str(tmp_path))
    try:
        (pid,) = _processes(spec["server"]["path"].encode())
        status = Path(f"/proc/{pid}/status").read_text()
        assert "Uid:\t65534\t65534" in status and "CapEff:\t0000000000000000" in status
        assert os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
        assert b"s3cret-pass" not in Path(f"/proc/{pid}/cmdline").read_bytes()
        info = formats.inspect(formats.ImageNode("qcow2", spec, writable=tuple(nbd.writable)))
        assert info.virtual_size == os.path.getsize(images.expected["qcow2"])
    finally:
        nbd.detach()
    deadline = time.monotonic() + 5
    while _processes(spec["server"]["path"].encode()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _processes(spec["server"]["path"].encode()) == []


# -- fixed VHD: raw data followed by a footer ---------------------------------------------------------
@pytest.fixture(scope="module")
def vhds(images, tmp_path_factory) -> dict[str, Path]:
    """A fixed VHD of the base disk, one whose disk fills the 16 MiB volume exactly, and two raw
    streams ending in a near-footer (bad checksum; a size that is not the data's)."""
    d, work = images.dir, tmp_path_factory.mktemp("vhd")
    fixed_vhd(images.expected["raw"], d / "fixed-vhd.bin")
    full = work / "full.raw"
    full.write_bytes(os.urandom(MiB) + bytes(SIZE - 2 * MiB) + os.urandom(MiB))
    fixed_vhd(full, d / "fixed-vhd-full.bin")
    data = (d / "fixed-vhd.bin").read_bytes()
    footer = bytearray(data[-512:])
    footer[200] ^= 0xFF  # in the reserved area: only the checksum notices
    (d / "fixed-vhd-bad-checksum.bin").write_bytes(data[:-512] + footer)
    footer = bytearray(data[-512:])
    struct.pack_into(">Q", footer, 48, len(data) - 512 + MiB)
    vhd_checksum(footer)
    (d / "fixed-vhd-wrong-size.bin").write_bytes(data[:-512] + footer)
    return {"base": images.expected["raw"], "full": full}


@pytest.mark.parametrize("via", ["range", "scratch", "upload", "file"])
def test_fixed_vhd_is_recognised_and_the_volume_holds_exactly_its_disk(via, vhds, images, request, tmp_path, scratch):
    target = _target(tmp_path, "Block")
    result = _import(via, images.dir / "fixed-vhd.bin", target, scratch, request)
    if via != "upload":
        assert result[0].format == "vhd" and result[0].virtual_size == os.path.getsize(vhds["base"])
    assert_disk(target.path, vhds["base"], SIZE)  # the footer is not in the volume: zeros follow the disk


def test_fixed_vhd_whose_disk_fills_the_volume_fits_it(vhds, images, py_http, tmp_path, scratch):
    lun = block_target(tmp_path, SIZE)
    result, _ = run_import({"http": {"url": f"{py_http.url}/img/fixed-vhd-full.bin"}}, Target(str(lun), SIZE), scratch)
    assert result.format == "vhd" and result.virtual_size == SIZE
    assert lun.read_bytes() == vhds["full"].read_bytes()


@pytest.mark.parametrize("name", ["fixed-vhd-bad-checksum", "fixed-vhd-wrong-size"])
def test_stream_ending_in_an_invalid_vhd_footer_stays_raw(name, images, py_http, tmp_path, scratch):
    lun = block_target(tmp_path, SIZE)
    result, _ = run_import({"http": {"url": f"{py_http.url}/img/{name}.bin"}}, Target(str(lun), SIZE), scratch)
    assert result.format == "raw"
    assert_disk(lun, images.dir / f"{name}.bin", SIZE)  # every byte, the would-be footer too


# -- a declared size already too large --------------------------------------------------------------
@pytest.mark.parametrize("kind", ["raw", "qcow2", "raw.gz"])
@pytest.mark.parametrize("mode", ["Block", "Filesystem"])
def test_http_source_declaring_more_than_the_volume_is_refused_before_a_byte_is_written(kind, mode, py_http, canary,
                                                                                        tmp_path, scratch):
    target = _target(tmp_path, mode)
    with pytest.raises(ImportFailed) as info:  # the server declares 1 GiB and sends 64 KiB
        run_import({"http": {"url": f"{py_http.url}/lie/{kind}.bin"}}, target, scratch)
    # refused on the declared size: the short body (a TransferFailed later) is never read
    assert info.value.reason == errors.IMAGE_TOO_LARGE and str(1 << 30) in info.value.message
    assert_untouched(target, canary)


@pytest.mark.parametrize("kind", ["raw", "qcow2"])
def test_upload_declaring_more_than_the_volume_is_refused_before_a_byte_is_written(kind, upload, images, canary,
                                                                                   tmp_path):
    srv, control = upload
    target = _target(tmp_path, "Block")
    key = f"default/too-large-{kind}"
    control.targets[key] = target
    conn = http.client.HTTPSConnection(*srv.server_address[:2], context=ssl.create_default_context(cafile=srv.cert_file))
    conn.putrequest("PUT", "/v1beta1/upload")
    conn.putheader("Authorization", f"Bearer {issue_token(KEY, key)}")
    conn.putheader("Content-Length", str(1 << 30))
    conn.endheaders()
    conn.send(images.path(kind).read_bytes()[:formats.HEAD_SIZE])  # what the server reads to tell the format
    resp = conn.getresponse()
    body = resp.read().decode()
    conn.close()
    assert resp.status == 413 and body.startswith(errors.IMAGE_TOO_LARGE) and str(1 << 30) in body
    assert not [e for e in control.events if e[1] == key], "refused without an outcome: ready for one that fits"
    assert_untouched(target, canary)
