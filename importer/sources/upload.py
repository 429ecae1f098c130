"""The upload source: the body of one HTTP request to the upload server.

A body that ends before its Content-Length (the client went away) raises
UploadInterrupted, which the upload server turns into "ready for upload again".
"""

from __future__ import annotations

from typing import BinaryIO

from .. import errors
from ..errors import ImportFailed
from ..formats import HEAD_SIZE
from .base import PeekStream, SourceInfo, read_head


class _BoundedBody:
    def __init__(self, body: BinaryIO, length: int):
        self._body = body
        self._left = length

    def read(self, n: int = -1) -> bytes:
        if self._left <= 0:
            return b""
        want = self._left if n is None or n < 0 else min(n, self._left)
        try:
            data = self._body.read(min(want, 4 << 20))
        except (OSError, ValueError):
            data = b""
        if not data:
            raise ImportFailed(errors.UPLOAD_INTERRUPTED, f"the upload ended {self._left} bytes early; send it again")
        self._left -= len(data)
        return data

    def close(self) -> None:
        pass


class UploadSource:
    """A request body of known length."""

    def __init__(self, body: BinaryIO, length: int, *, checksum: str | None = None):
        self.checksum = checksum
        self._length = length
        self._body = _BoundedBody(body, length)
        self._head: bytes | None = None

    def info(self) -> SourceInfo:
        if self._head is None:
            self._head = read_head(self._body, HEAD_SIZE)  # type: ignore[arg-type]
        return SourceInfo(self._head, self._length, None, "upload")

    def transfer(self) -> BinaryIO:
        self.info()
        return PeekStream(self._head or b"", self._body)  # type: ignore[arg-type]

    def close(self) -> None:
        pass
