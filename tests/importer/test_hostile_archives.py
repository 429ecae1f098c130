"""`contentType: archive` unpacks a hostile tar into a Filesystem volume: nothing outside the
volume is created, changed or linked to, whatever the members name (issue 7, hardening).

Every archive is built here, at test time, around an `outside` directory and a root-only
canary beside the volume: CVE-2025-4517's chain of links longer than PATH_MAX (which Python
3.11.7's `tarfile` "data" filter lets through), `..` and absolute names, links that lead out
(one hop or many), hard links to host files, device nodes, FIFOs, and names longer than
PATH_MAX. Each import fails with InvalidImage and a sentence a person understands, the volume
is left empty, and `outside` and the canary are as they were. Good archives with links that
stay inside still unpack, owned by root.
"""

from __future__ import annotations

import os
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from importer import errors
from importer.errors import ImportFailed
from importer.pipeline import Target

from hostile_tar import link_chain_escape, tar_entries
from importer_support import MiB, run_import

REG, DIR, SYM, LNK, CHR, FIFO = (tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE,
                                 tarfile.FIFOTYPE)


@dataclass
class Host:
    outside: Path  # a directory beside the volume: nothing may appear in it
    canary: Path   # a root-only file beside the volume: never read, changed or linked
    vol: Path


@pytest.fixture
def host(tmp_path) -> Host:
    outside, vol = tmp_path / "outside", tmp_path / "mnt"
    outside.mkdir()
    vol.mkdir()
    canary = tmp_path / "canary"
    canary.write_bytes(b"root only\n")
    os.chmod(canary, 0o600)
    return Host(outside, canary, vol)


def hostile_entries(kind: str, host: Host) -> list:
    chain, escape = link_chain_escape()
    outside, canary = str(host.outside), str(host.canary)
    return {
        # the CVE as reported: a file written through the chain, and disk.img linked to a root-only file
        "cve-2025-4517": chain + [(f"{escape}{outside}/pwned.txt", REG, "pwned"), ("disk.img", SYM, escape + canary)],
        "cve-links-only": chain + [("disk.img", SYM, escape + canary)],
        "dot-dot-name": [("../../outside/pwned.txt", REG, "pwned")],
        "link-to-outside-then-write": [("out", SYM, outside), ("out/pwned.txt", REG, "pwned")],
        "relative-link-climbing-out": [("sub", DIR, ""), ("sub/up", SYM, "../../../outside"), ("sub/up/pwned.txt", REG, "pwned")],
        "absolute-link": [("disk.img", SYM, canary)],
        "link-through-inner-link": [("a", DIR, ""), ("a/top", SYM, ".."), ("up", SYM, "a/top/..")],
        "hard-link-to-host-file": [("disk.img", LNK, canary)],
        "device-node": [("null", CHR, "")],
        "fifo": [("pipe", FIFO, "")],
        "path-over-path-max": [("/".join(["n" * 250] * 18) + "/f", REG, "x")],
    }[kind]


def assert_nothing_escaped(host: Host) -> None:
    assert list(host.outside.iterdir()) == [], "a member landed outside the volume"
    st = os.stat(host.canary, follow_symlinks=False)
    assert (st.st_uid, stat.S_IMODE(st.st_mode), st.st_nlink) == (0, 0o600, 1)
    assert host.canary.read_bytes() == b"root only\n"
    assert os.listdir(host.vol) == [], "a failed archive import leaves the volume empty"


def import_archive(name: str, images, py_http, host: Host, scratch: str):
    return run_import({"http": {"url": f"{py_http.url}/img/{name}"}},
                      Target(str(host.vol), 64 * MiB, mode="Filesystem", content_type="archive"), scratch)


@pytest.mark.parametrize("kind", ["cve-2025-4517", "cve-links-only", "dot-dot-name", "link-to-outside-then-write",
                                  "relative-link-climbing-out", "absolute-link", "link-through-inner-link",
                                  "hard-link-to-host-file", "device-node", "fifo", "path-over-path-max"])
def test_hostile_archive_fails_with_a_reason_and_nothing_outside_the_volume_changes(kind, host, images, py_http,
                                                                                    request, scratch):
    name = f"hostile-archive-{request.node.callspec.id}.tar"
    tar_entries(images.dir / name, hostile_entries(kind, host))
    with pytest.raises(ImportFailed) as failed:
        import_archive(name, images, py_http, host, scratch)
    assert failed.value.reason == errors.INVALID_IMAGE, failed.value
    message = failed.value.message
    assert "archive" in message and len(message) < 700, message
    for internal in ("Traceback", "Errno", "Error:", "KeyError", str(host.vol)):
        assert internal not in message, message
    assert_nothing_escaped(host)
    assert os.listdir(scratch) == []


@pytest.mark.parametrize("kind,says", [("path-over-path-max", "too long"), ("cve-links-only", "leads outside"),
                                       ("absolute-link", "leads outside"), ("fifo", "special file"),
                                       ("dot-dot-name", "above its own root")])
def test_hostile_archive_reason_says_what_is_wrong(kind, says, host, images, py_http, request, scratch):
    name = f"hostile-archive-says-{request.node.callspec.id}.tar"
    tar_entries(images.dir / name, hostile_entries(kind, host))
    with pytest.raises(ImportFailed) as failed:
        import_archive(name, images, py_http, host, scratch)
    assert says in failed.value.message, failed.value.message


def test_archive_with_links_that_stay_inside_unpacks_owned_by_root(host, images, py_http, scratch):
    name = "archive-inner-links.tar"
    tar_entries(images.dir / name, [
        ("data", DIR, ""), ("data/disk.raw", REG, b"\1" * 4096), ("data/sub", DIR, ""),
        ("data/sub/up", SYM, "../disk.raw"), ("current", SYM, "data/sub/.."), ("dangling", SYM, "data/missing"),
        ("data/twin", LNK, "data/disk.raw"), ("setuid", REG, b"#!/bin/sh\n", 0o6755),
    ])
    result, _ = import_archive(name, images, py_http, host, scratch)
    assert result.method == "archive"
    assert sorted(os.listdir(host.vol)) == ["current", "dangling", "data", "setuid"]
    assert (host.vol / "current" / "sub" / "up").read_bytes() == b"\1" * 4096
    assert os.stat(host.vol / "data" / "twin").st_ino == os.stat(host.vol / "data" / "disk.raw").st_ino
    for path in [host.vol / "data", host.vol / "data" / "sub" / "up", host.vol / "dangling", host.vol / "setuid"]:
        st = os.stat(path, follow_symlinks=False)
        assert (st.st_uid, st.st_gid) == (0, 0), path
        assert not st.st_mode & (stat.S_ISUID | stat.S_ISGID), path
    assert list(host.outside.iterdir()) == []
