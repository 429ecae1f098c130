"""Downloading an exported volume as `virtctl vmexport download` does: over HTTPS, trusting the
certificate the export's status gives (or nothing with `insecure`), with the export's token
in the `x-kubevirt-export-token` header.

A raw download goes to `OUTPUT.part` and is resumed from what that file holds with an HTTP
Range request, so a download cut off midway goes on where it stopped; the file takes its
name only once whole. qcow2 is made from the raw download by `qemu-img convert` in the
sandbox (the bytes are a VM's disk: untrusted), reading it strictly as raw.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import ssl
from typing import Callable
from urllib.parse import urlsplit

from host.command import CommandError, Limits, run
from host.sandbox import Sandbox, open_no_follow, prepare_dir, sandbox_ids

from . import errors
from .vm_export_server import TOKEN_HEADER

CHUNK = 1 << 20
CONVERT_LIMITS = Limits(address_space=2 << 30, cpu_seconds=3600)


class DownloadFailed(Exception):
    """The export server refused or the transfer broke; the message says which."""


def _context(cert_pem: str, insecure: bool) -> ssl.SSLContext:
    if insecure:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    if not cert_pem:
        raise DownloadFailed("the export gives no certificate to verify its server with (use --insecure to skip it)")
    return ssl.create_default_context(cadata=cert_pem)


def download(url: str, token: str, cert_pem: str, output: str, *, insecure: bool = False, resume: bool = True,
             timeout: float = 60, progress: Callable[[int, int | None], None] | None = None) -> int:
    """Fetch `url` into `output` (via OUTPUT.part, resumed with Range when `resume`); the bytes written.

    A part is resumed only with `If-Range` and the ETag the server gave for it (kept in
    OUTPUT.part.etag): a part of another export, or one whose ETag is lost, is fetched again
    whole. Both files are opened without following a link and must be regular files."""
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise DownloadFailed(f"the export's URL is not https: {url[:200]}")
    errors.register_secret(token)
    part, tag_file = output + ".part", output + ".part.etag"
    made = not os.path.lexists(part)
    fd = _open_own(part)
    try:
        etag = _read_etag(tag_file) if resume else ""
        have = os.fstat(fd).st_size if etag else 0
        conn = http.client.HTTPSConnection(parts.hostname, parts.port or 443, timeout=timeout,
                                           context=_context(cert_pem, insecure))
        try:
            return _fetch(conn, parts, token, fd, have, etag, tag_file, part, output, progress)
        finally:
            conn.close()
    except DownloadFailed:
        if made:
            _drop_if_empty(part, fd)  # refused before a byte came (a bad token, no server): nothing to resume
        raise
    finally:
        os.close(fd)


def _drop_if_empty(path: str, fd: int) -> None:
    """Remove the part this run made if it is still empty and still the file at `path`."""
    own = os.fstat(fd)
    with contextlib.suppress(OSError):
        now = os.stat(path, follow_symlinks=False)
        if own.st_size == 0 and (now.st_dev, now.st_ino) == (own.st_dev, own.st_ino):
            os.unlink(path)


def _fetch(conn: http.client.HTTPSConnection, parts, token: str, fd: int, have: int, etag: str, tag_file: str,
           part: str, output: str, progress: Callable[[int, int | None], None] | None) -> int:
    headers = {TOKEN_HEADER: token}
    if have:
        headers.update({"Range": f"bytes={have}-", "If-Range": etag})
    try:
        conn.request("GET", parts.path + (f"?{parts.query}" if parts.query else ""), headers=headers)
        resp = conn.getresponse()
    except ssl.SSLCertVerificationError as exc:
        raise DownloadFailed(f"the export server's certificate does not verify: {exc.verify_message}") from None
    except OSError as exc:
        raise DownloadFailed(f"cannot reach the export server at {parts.netloc}: {exc}") from None
    if resp.status == 416 and have:
        resp.read()
        if resp.getheader("Content-Range", "") == f"bytes */{have}" and resp.getheader("ETag") == etag:
            _finish(part, tag_file, output)  # the part is the whole volume of this export
            return have
        return _fetch(conn, parts, token, fd, 0, "", tag_file, part, output, progress)  # not ours: all again
    if resp.status not in (200, 206):
        text = resp.read(300).decode(errors="replace").strip()
        raise DownloadFailed(f"the export server answered {resp.status} {resp.reason}: {text}")
    if resp.status == 200:
        have = 0  # no range (or another export's part): the whole file again
        _write_etag(tag_file, resp.getheader("ETag") or "")
    total = resp.length + have if resp.length is not None else None
    f = os.fdopen(fd, "r+b", closefd=False)
    with f:
        if not have:
            f.truncate(0)
        f.seek(have)
        done = have
        try:
            while chunk := resp.read(CHUNK):
                _write_sparse(f, chunk)
                done += len(chunk)
                if progress:
                    progress(done, total)
        except (OSError, http.client.HTTPException) as exc:
            raise DownloadFailed(f"the download broke off after {done} bytes ({exc}); run it again to "
                                 "resume it") from None
        f.truncate(done)
    if total is not None and done != total:
        raise DownloadFailed(f"the download broke off after {done} of {total} bytes; run it again to resume it")
    _finish(part, tag_file, output)
    return done


def _open_own(path: str) -> int:
    """Open (or make) a file to write, refusing a link or anything but a regular file: the
    directory may be shared, and root must not write through a link someone planted."""
    try:
        return open_no_follow(path, os.O_RDWR | os.O_CREAT)
    except OSError as exc:
        raise DownloadFailed(f"cannot write {path}: {exc.strerror or exc}") from None


def _read_etag(path: str) -> str:
    """The ETag a part was fetched under; "" when there is none (the part is not resumed)."""
    try:
        fd = open_no_follow(path)
    except FileNotFoundError:
        return ""
    except OSError as exc:
        raise DownloadFailed(f"cannot read {path}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "rb") as f:
        text = f.read(200).decode(errors="replace").strip()
    return text if text.startswith('"') and text.endswith('"') and len(text) > 2 else ""  # strong ETags only


def _write_etag(path: str, etag: str) -> None:
    """Kept beside the part before a byte of it is written; none given: none kept (no resume)."""
    fd = _open_own(path)
    with os.fdopen(fd, "wb") as f:
        f.truncate(0)
        f.write(etag.encode())


def _finish(part: str, tag_file: str, output: str) -> None:
    os.replace(part, output)
    try:
        os.unlink(tag_file)
    except FileNotFoundError:
        pass


def _write_sparse(f, chunk: bytes) -> None:
    """Zero blocks are skipped (a hole), as a disk image's free space should stay."""
    if chunk.count(0) == len(chunk):
        f.seek(len(chunk), os.SEEK_CUR)
    else:
        f.write(chunk)


def raw_to_qcow2(raw: str, output: str) -> None:
    """Convert a downloaded raw disk to qcow2 in the sandbox: qemu-img sees only a private
    directory holding the raw file and its output, as the sandbox user, under limits."""
    work = prepare_dir(os.path.dirname(os.path.abspath(output)) or ".", ".pvlun-vmexport-")
    try:
        inside_raw, inside_out = os.path.join(work, "disk.raw"), os.path.join(work, "disk.qcow2")
        os.replace(raw, inside_raw)
        _chown(inside_raw, *sandbox_ids(), mode=0o600)
        argv = ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-S", "4k", inside_raw, inside_out]
        with Sandbox(writable=[work], limits=CONVERT_LIMITS) as box:
            try:
                run(box.wrap(argv), timeout=None)
            except CommandError as exc:
                raise DownloadFailed(f"qemu-img convert to qcow2 failed: {exc.stderr.strip()[-300:]}") from None
        _chown(inside_out, os.getuid(), os.getgid())
        os.replace(inside_out, output)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _chown(path: str, uid: int, gid: int, mode: int | None = None) -> None:
    """Owner of the file itself, by descriptor: a link put in its place hands nothing over."""
    try:
        fd = open_no_follow(path)
    except OSError as exc:
        raise DownloadFailed(f"cannot convert {os.path.basename(path)}: {exc.strerror or exc}") from None
    try:
        os.fchown(fd, uid, gid)
        if mode is not None:
            os.fchmod(fd, mode)
    finally:
        os.close(fd)
