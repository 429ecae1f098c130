"""The one interface every source implements (CDI's DataSourceInterface, reduced).

`info()` says what the source holds without fetching all of it: its first bytes (for
detection by content), its size when known, and — when qemu can read it with random access
itself (HTTP range requests, a local file) — how to point qemu at it, so that images
convert straight from the source without a scratch copy. `transfer()` returns the whole
content as a stream, from byte 0, once. `close()` releases connections and temp files.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import BinaryIO, Protocol


@dataclass
class DirectRead:
    """A qemu block node (the `file` child of a `json:` spec) that reads the source in place.

    `attach(workdir)` returns that node, starting whatever must serve it first (an nbdkit);
    `seal()` says the checks are done (what they read is what the conversion gets, see
    `sources.nbd`); `detach()` stops it. `driver` names the node's kind for the pipeline's rules.
    qemu-img runs sandboxed: `read_only` and `writable` are the host paths it must be handed
    to reach the node (the file; the socket's directory), valid once attached.
    """

    spec: dict
    objects: list[str] = field(default_factory=list)  # qemu-img `--object` values (secrets)
    read_only: list[str] = field(default_factory=list)
    writable: list[str] = field(default_factory=list)

    @property
    def driver(self) -> str:
        return str(self.spec.get("driver", ""))

    def attach(self, workdir: str) -> dict:
        return self.spec

    def seal(self) -> None:
        pass

    def source_failure(self) -> Exception | None:
        """Why reading the source failed, if whatever serves the node knows (see sources.nbd)."""
        return None

    def detach(self) -> None:
        pass


@dataclass
class SourceInfo:
    head: bytes                 # the first bytes (up to formats.HEAD_SIZE)
    size: int | None            # total bytes, when the source knows it
    direct: DirectRead | None   # random access for qemu, or None (stream only)
    description: str            # for messages: a URL without credentials


class Source(Protocol):
    checksum: str | None  # "md5|sha1|sha256|sha512:<hex>" of the bytes `transfer()` yields, or None

    def info(self) -> SourceInfo: ...

    def transfer(self) -> BinaryIO: ...

    def close(self) -> None: ...


class PeekStream(io.RawIOBase):
    """A stream whose first bytes were already read (for detection) and are served again."""

    def __init__(self, head: bytes, rest: BinaryIO | None):
        self._head = memoryview(head)
        self._rest = rest

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if self._head:
            if n < 0 or n >= len(self._head):
                data = bytes(self._head)
                self._head = memoryview(b"")
                if n < 0 and self._rest is not None:
                    data += self._rest.read()
                return data
            data = bytes(self._head[:n])
            self._head = self._head[n:]
            return data
        return self._rest.read(n) if self._rest is not None else b""

    def readinto(self, buf) -> int:  # for io.BufferedReader / tarfile
        data = self.read(len(buf))
        buf[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if self._rest is not None:
            self._rest.close()
        super().close()


def read_head(stream: BinaryIO, size: int) -> bytes:
    """Read up to `size` bytes, however the stream chooses to chunk them."""
    parts: list[bytes] = []
    got = 0
    while got < size:
        data = stream.read(size - got)
        if not data:
            break
        parts.append(data)
        got += len(data)
    return b"".join(parts)
