"""The http/https source (and `file://` where the embedded mode allows it).

Info asks for the first 64 KiB with a Range request. A server that answers 206 and
advertises `Accept-Ranges: bytes` can be read by qemu's curl driver directly, so images
convert without a scratch copy; one that answers 200 (no ranges) keeps that very response
open and `transfer()` continues from it, so nothing is fetched twice.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from typing import BinaryIO

import requests

from .. import errors
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

READAHEAD = 1 << 20  # qemu curl driver readahead (the measured sweet spot)


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
        self._secret_dir: str | None = None
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
        """qemu's curl driver can read this server if it advertises byte ranges on HEAD.

        Not used when qemu could not reproduce our request: custom CAs (qemu's curl driver
        has no CA option, libcurl-gnutls uses the system store only) and extra headers.
        """
        if size is None or self._ca.custom or self._headers:
            return None
        with request_errors(final_url):
            head = self._session.head(final_url, allow_redirects=False, timeout=(15, 60))
        if head.status_code != 200 or "bytes" not in head.headers.get("Accept-Ranges", ""):
            return None
        scheme = final_url.split(":", 1)[0].lower()
        spec: dict = {"driver": scheme, "url": final_url, "readahead": READAHEAD, "timeout": 60}
        if scheme == "https":
            spec["sslverify"] = True
        objects: list[str] = []
        if self._auth:
            self._secret_dir = tempfile.mkdtemp(prefix="pvlun-secret-")
            path = os.path.join(self._secret_dir, "password")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(self._auth[1])
            sid = "pw" + secrets.token_hex(4)
            objects.append(f"secret,id={sid},file={path}")
            spec["username"] = self._auth[0]
            spec["password-secret"] = sid
        return DirectRead(spec, objects)

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
        if self._secret_dir:
            for name in os.listdir(self._secret_dir):
                os.unlink(os.path.join(self._secret_dir, name))
            os.rmdir(self._secret_dir)
            self._secret_dir = None


class FileSource:
    """A local file (`file://`), only when the embedded mode's flag allows it."""

    def __init__(self, path: str, *, checksum: str | None = None):
        self.path = path
        self.checksum = checksum

    def info(self) -> SourceInfo:
        try:
            with open(self.path, "rb") as f:
                head = f.read(HEAD_SIZE)
                size = os.fstat(f.fileno()).st_size
        except OSError as exc:
            reason = errors.NOT_FOUND if isinstance(exc, FileNotFoundError) else errors.INVALID_SOURCE
            raise errors.ImportFailed(reason, f"cannot read {self.path}: {exc.strerror}") from None
        return SourceInfo(head, size, DirectRead({"driver": "file", "filename": self.path}), f"file://{self.path}")

    def transfer(self) -> BinaryIO:
        return open(self.path, "rb")

    def close(self) -> None:
        pass
