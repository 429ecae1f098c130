"""The http/https source (and `file://` where the embedded mode allows it).

Info asks for the first 64 KiB with a Range request. A server that answers 206 and
advertises `Accept-Ranges: bytes` is read by qemu in place (through nbdkit's curl plugin),
so images convert without a scratch copy; one that answers 200 (no ranges) keeps that very response
open and `transfer()` continues from it, so nothing is fetched twice.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from typing import BinaryIO

import requests

from pvlun.sandbox import Sandbox, prepare_dir, readable_by_sandbox

from .. import errors, transfer_watch
from ..formats import HEAD_SIZE
from .base import DirectRead, PeekStream, SourceInfo, read_head
from .httpclient import (
    CABundle,
    ResponseStream,
    check_status,
    content_length,
    make_session,
    request_errors,
    total_from_content_range,
)


class HttpSource:
    """A disk image behind an http(s) URL."""

    def __init__(
        self,
        url: str,
        *,
        auth: tuple[str, str] | None = None,
        ca_pems: list[str] | None = None,
        headers: dict[str, str] | None = None,
        checksum: str | None = None,
    ):
        self.url = url
        self.checksum = checksum
        self._auth = auth
        self._headers = dict(headers or {})
        self._ca = CABundle(ca_pems or [])
        self._session = make_session(ca=self._ca, auth=auth, headers=self._headers)
        self._pending: tuple[bytes, requests.Response] | None = None
        for value in self._headers.values():
            errors.register_secret(value)

    def info(self) -> SourceInfo:
        with request_errors(self.url):
            resp = self._session.get(self.url, headers={"Range": f"bytes=0-{HEAD_SIZE - 1}"}, stream=True, timeout=(15, 60))
        check_status(resp, self.url)
        final_url = resp.url
        if resp.status_code == 206:
            head = read_head(ResponseStream(resp, self.url), HEAD_SIZE)  # type: ignore[arg-type]
            size = total_from_content_range(resp)
            resp.close()
            direct = self._direct(final_url, size)
            return SourceInfo(head, size, direct, errors.scrub(self.url))
        size = content_length(resp)
        stream = ResponseStream(resp, self.url)
        head = read_head(stream, HEAD_SIZE)
        self._pending = (head, resp)
        return SourceInfo(head, size, None, errors.scrub(self.url))

    def _direct(self, final_url: str, size: int | None) -> DirectRead | None:
        """nbdkit's curl plugin can serve this to qemu if the server advertises byte ranges on HEAD.

        Not used with extra headers (they may be secrets, and nbdkit takes headers on its
        command line); everything else (CA bundle, basic auth through a 0600 file) is passed on.
        """
        if size is None or self._headers:
            return None
        with request_errors(final_url):
            head = self._session.head(final_url, allow_redirects=False, timeout=(15, 60))
        if head.status_code != 200 or "bytes" not in head.headers.get("Accept-Ranges", ""):
            return None
        return NbdkitCurl(final_url, auth=self._auth, cainfo=self._ca.path)

    def transfer(self) -> BinaryIO:
        if self._pending is not None:
            head, resp = self._pending
            self._pending = None
            return PeekStream(head, ResponseStream(resp, self.url))  # type: ignore[arg-type]
        with request_errors(self.url):
            resp = self._session.get(self.url, stream=True, timeout=(15, 60))
        check_status(resp, self.url)
        return ResponseStream(resp, self.url)  # type: ignore[return-value]

    def close(self) -> None:
        if self._pending is not None:
            self._pending[1].close()
            self._pending = None
        self._session.close()
        self._ca.close()


class NbdkitCurl(DirectRead):
    """qemu reads the URL through nbdkit's curl plugin on a unix socket (as CDI does).

    Chosen over qemu's own curl driver, which hung now and then here under parallel
    requests (`qemu-img convert -m 16`, qemu 7.2); nbdkit's also takes a CA file. Redirects
    were resolved by us already, so nbdkit follows none, and speaks only http(s).
    nbdkit talks to a hostile server, so it is sandboxed too (with the network): it sees its
    socket's directory (the sandbox user's) and the CA file; the password comes on a pipe-like
    memfd, never in a file or on the command line.
    """

    def __init__(self, url: str, *, auth: tuple[str, str] | None, cainfo: str | None):
        super().__init__({"driver": "nbd"})
        self.url, self.auth, self.cainfo = url, auth, cainfo
        self._proc: subprocess.Popen | None = None
        self._dir: str | None = None
        self._stderr = None
        self._unwatch = lambda: None

    def attach(self, workdir: str) -> dict:
        if self._proc is not None:
            return self.spec
        # a private (0700) dir of the sandbox user's for the socket; unix socket paths must be short
        self._dir = prepare_dir(workdir if len(workdir) < 60 else None, "pvlun-nbd-")
        sock = os.path.join(self._dir, "nbd.sock")
        # nbdkit 1.32's curl plugin serializes requests; the readahead filter turns qemu's
        # 64 KiB cluster reads into growing sequential ranges (measured: 3x faster from nginx)
        argv = ["nbdkit", "--foreground", "--exit-with-parent", "--readonly", "--threads", "16", "-U", sock,
                "--filter=readahead", "curl", f"url={self.url}", "protocols=http,https", "followlocation=false", "timeout=60"]
        read_only = []
        if self.cainfo:
            argv.append(f"cainfo={self.cainfo}")
            read_only.append(self.cainfo)
        secret = os.memfd_create("pvlun-nbd-password")
        try:
            if self.auth:
                os.write(secret, self.auth[1].encode())
                os.lseek(secret, 0, os.SEEK_SET)
                argv += [f"user={self.auth[0]}", f"password=-{secret}"]
            self._stderr = tempfile.TemporaryFile()
            box = Sandbox(read_only=read_only, writable=[self._dir], network=True)
            self._proc = subprocess.Popen(box.wrap(argv), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                          stderr=self._stderr, pass_fds=(secret,))
        finally:
            os.close(secret)
        self.writable = [self._dir]
        watch = transfer_watch.current()
        if watch is not None:  # a cancelled import kills nbdkit, so qemu-img reading through it ends too
            self._unwatch = watch.on_abort(self._proc.kill)
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self._stderr.seek(0)
                text = self._stderr.read().decode(errors="replace")
                self.detach()
                raise errors.ImportFailed(errors.TRANSFER_FAILED, f"nbdkit could not serve {self.url}: {errors.tool_text(text)}")
            time.sleep(0.01)
        self.spec = {"driver": "nbd", "server": {"type": "unix", "path": sock}}
        return self.spec

    def detach(self) -> None:
        self._unwatch()
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


class FileSource:
    """A local file (`file://`), only when the embedded mode's flag allows it."""

    def __init__(self, path: str, *, checksum: str | None = None):
        self.path = path
        self.checksum = checksum

    def info(self) -> SourceInfo:
        try:
            with open(self.path, "rb") as f:
                head = f.read(HEAD_SIZE)
                st = os.fstat(f.fileno())
        except OSError as exc:
            reason = errors.NOT_FOUND if isinstance(exc, FileNotFoundError) else errors.INVALID_SOURCE
            raise errors.ImportFailed(reason, f"cannot read {self.path}: {exc.strerror}") from None
        if not readable_by_sandbox(st):
            # qemu-img reads it as the unprivileged sandbox user; root reading it for us would
            # make file:// a way around the file's own permissions
            raise errors.ImportFailed(errors.INVALID_SOURCE, f"{self.path} is not readable by the unprivileged user the "
                                                             "importer's tools run as; make it world-readable (chmod o+r)")
        real = os.path.realpath(self.path)
        return SourceInfo(head, st.st_size, DirectRead({"driver": "file", "filename": real}, read_only=[real]),
                          f"file://{self.path}")

    def transfer(self) -> BinaryIO:
        return open(self.path, "rb")

    def close(self) -> None:
        pass
