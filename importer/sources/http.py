"""The http/https source (and `file://` where the embedded mode allows it).

Info asks for the first 64 KiB with a Range request. A server that answers 206 and
advertises `Accept-Ranges: bytes` is read by qemu in place (through nbdkit's curl plugin),
so images convert without a scratch copy; one that answers 200 (no ranges) keeps that very response
open and `transfer()` continues from it, so nothing is fetched twice.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from typing import BinaryIO, Iterator

import requests

from host.sandbox import open_as_sandbox_user

from .. import errors, transfer_watch
from ..formats import HEAD_SIZE
from .base import DirectRead, PeekStream, SourceInfo, read_head
from .httpclient import (
    CHUNK,
    CABundle,
    ResponseStream,
    check_status,
    content_length,
    make_session,
    origin,
    request_errors,
    total_from_content_range,
)
from .nbd import NbdExport, NbdkitFile


class HttpSource:
    """A disk image behind an http(s) URL."""

    def __init__(
        self,
        url: str,
        *,
        auth: tuple[str, str] | None = None,
        ca_pems: list[str] | None = None,
        headers: dict[str, str] | None = None,
        secret_headers: dict[str, str] | None = None,
        checksum: str | None = None,
        insecure: bool = False,
    ):
        self.url = url
        self.insecure = insecure
        self.checksum = checksum
        self._auth = auth
        self._headers = {**(headers or {}), **(secret_headers or {})}
        self._ca = CABundle(ca_pems or [])
        # the credentials (basic auth, secretExtraHeaders) reach only the URL's own origin (make_session)
        self._session = make_session(ca=self._ca, auth=auth, headers=self._headers,
                                     secret_headers=tuple(secret_headers or ()), insecure=insecure)
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
        command line); everything else (CA bundle, basic auth through a memfd) is passed on, the
        credentials only if a redirect left the origin they were given for unchanged.
        """
        if size is None or self._headers:
            return None
        auth = self._auth if origin(final_url) == origin(self.url) else None
        with request_errors(final_url):
            head = self._session.head(final_url, allow_redirects=False, timeout=(15, 60),
                                      auth=auth or _no_auth)
        if head.status_code != 200 or "bytes" not in head.headers.get("Accept-Ranges", ""):
            return None
        return NbdkitCurl(final_url, size, auth=auth, cainfo=self._ca.path, insecure=self.insecure)

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


def _no_auth(request: requests.PreparedRequest) -> requests.PreparedRequest:
    """No credentials on this request (None would mean the session's)."""
    return request


class NbdkitCurl(NbdExport):
    """qemu reads the URL through nbdkit's curl plugin on a unix socket (as CDI does).

    Chosen over qemu's own curl driver, which hung now and then here under parallel
    requests (`qemu-img convert -m 16`, qemu 7.2); nbdkit's also takes a CA file. Redirects
    were resolved by us already, so nbdkit follows none, and speaks only http(s).
    nbdkit talks to a hostile server, so it is sandboxed too (with the network): it sees its
    socket's directory (the sandbox user's) and the CA file; the password comes on a pipe-like
    memfd, never in a file or on the command line.
    """

    network = True
    # nbdkit 1.32's curl plugin serializes requests (its readahead filter then does nothing,
    # and says so); measured: qemu-img convert over it from nginx reads the 512 MiB of
    # bench_import's qcow2 in 0.40-0.51 s, 2-4 parallel connections 0.37-0.61 s (no gain)

    def __init__(self, url: str, size: int, *, auth: tuple[str, str] | None, cainfo: str | None,
                 insecure: bool = False):
        super().__init__(size, url)
        self.url, self.auth, self.cainfo, self.insecure = url, auth, cainfo, insecure

    @contextlib.contextmanager
    def plugin(self) -> Iterator[tuple[list[str], dict, tuple[int, ...]]]:
        # a read that takes the import's stall timeout fails (curl's own timeout, per request)
        stall = max(1, round(transfer_watch.stall_seconds()))
        argv = ["curl", f"url={self.url}", "protocols=http,https", "followlocation=false", f"timeout={stall}"]
        read_only = []
        if self.insecure:
            argv.append("sslverify=false")
        if self.cainfo:
            argv.append(f"cainfo={self.cainfo}")
            read_only.append(self.cainfo)
        secret = os.memfd_create("pvlun-nbd-password")
        try:
            if self.auth:
                os.write(secret, self.auth[1].encode())
                os.lseek(secret, 0, os.SEEK_SET)
                argv += [f"user={self.auth[0]}", f"password=-{secret}"]
            yield argv, {"read_only": read_only}, (secret,)
        finally:
            os.close(secret)


class FileSource:
    """A local file (`file://`), only when the embedded mode's flag allows it.

    Opened once, by the unprivileged user the importer's tools run as, in the host's own tree
    (`open_as_sandbox_user`): root reading it for us would make file:// a way around the
    file's permissions or its directories'. Everything after reads that open file, never the
    path again: the head, the stream, and qemu's in-place reads (nbdkit serves the descriptor)."""

    def __init__(self, path: str, *, checksum: str | None = None):
        self.path = path
        self.checksum = checksum
        self._fd: int | None = None

    def _open(self) -> int:
        if self._fd is not None:
            return self._fd
        try:
            fd = open_as_sandbox_user(self.path)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                raise errors.ImportFailed(errors.NOT_FOUND, f"cannot read {self.path}: {exc.strerror}") from None
            if exc.errno in (errno.EACCES, errno.EPERM):
                raise errors.ImportFailed(errors.INVALID_SOURCE, f"{self.path} is not readable by the unprivileged user "
                                          "the importer's tools run as; make it world-readable (chmod o+r) and its "
                                          "directories searchable (chmod o+x)") from None
            raise errors.ImportFailed(errors.INVALID_SOURCE, f"cannot read {self.path}: {exc.strerror}") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise errors.ImportFailed(errors.INVALID_SOURCE, f"{self.path} is not a regular file")
        self._fd = fd
        return fd

    def info(self) -> SourceInfo:
        fd = self._open()
        head = os.pread(fd, HEAD_SIZE, 0)
        size = os.fstat(fd).st_size
        return SourceInfo(head, size, NbdkitFile(fd, size, f"file://{self.path}"), f"file://{self.path}")

    def transfer(self) -> BinaryIO:
        return _OpenFile(self._open())  # type: ignore[return-value]

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class _OpenFile:
    """The open file from its start, with an offset of its own (the descriptor stays the source's)."""

    def __init__(self, fd: int):
        self._fd, self._at = fd, 0

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            return b"".join(iter(lambda: self.read(CHUNK), b""))
        data = os.pread(self._fd, n, self._at)
        self._at += len(data)
        return data

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        pass
