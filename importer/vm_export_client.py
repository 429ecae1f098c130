"""Downloading an exported volume as `virtctl vmexport download` does: over HTTPS, trusting the
certificate the export's status gives (or nothing with `insecure`), with the export's token
in the `x-kubevirt-export-token` header.

A raw download goes to `OUTPUT.part` and is resumed from what that file holds with an HTTP
Range request, so a download cut off midway goes on where it stopped; the file takes its
name only once whole. qcow2 is made from the raw download by `qemu-img convert` in the
sandbox (the bytes are a VM's disk: untrusted), reading it strictly as raw.
"""

from __future__ import annotations

import http.client
import os
import shutil
import ssl
from typing import Callable
from urllib.parse import urlsplit

from host.command import CommandError, Limits, run
from host.sandbox import Sandbox, give, prepare_dir

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
    """Fetch `url` into `output` (via OUTPUT.part, resumed with Range when `resume`); the bytes written."""
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise DownloadFailed(f"the export's URL is not https: {url[:200]}")
    part = output + ".part"
    have = os.path.getsize(part) if resume and os.path.exists(part) else 0
    conn = http.client.HTTPSConnection(parts.hostname, parts.port or 443, timeout=timeout,
                                       context=_context(cert_pem, insecure))
    try:
        headers = {TOKEN_HEADER: token}
        if have:
            headers["Range"] = f"bytes={have}-"
        try:
            conn.request("GET", parts.path + (f"?{parts.query}" if parts.query else ""), headers=headers)
            resp = conn.getresponse()
        except ssl.SSLCertVerificationError as exc:
            raise DownloadFailed(f"the export server's certificate does not verify: {exc.verify_message}") from None
        except OSError as exc:
            raise DownloadFailed(f"cannot reach the export server at {parts.netloc}: {exc}") from None
        if resp.status == 416 and have:  # the part file is already whole
            resp.read()
            os.replace(part, output)
            return have
        if resp.status not in (200, 206):
            text = resp.read(300).decode(errors="replace").strip()
            raise DownloadFailed(f"the export server answered {resp.status} {resp.reason}: {text}")
        if resp.status == 200:
            have = 0  # no range: the whole file again
        total = resp.length + have if resp.length is not None else None
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | (0 if have else os.O_TRUNC), 0o600)
        with os.fdopen(fd, "r+b" if have else "wb") as f:
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
        os.replace(part, output)
        return done
    finally:
        conn.close()


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
        give(inside_raw)
        argv = ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-S", "4k", inside_raw, inside_out]
        with Sandbox(writable=[work], limits=CONVERT_LIMITS) as box:
            try:
                run(box.wrap(argv), timeout=None)
            except CommandError as exc:
                raise DownloadFailed(f"qemu-img convert to qcow2 failed: {exc.stderr.strip()[-300:]}") from None
        os.chown(inside_out, os.getuid(), os.getgid())
        os.replace(inside_out, output)
    finally:
        shutil.rmtree(work, ignore_errors=True)
