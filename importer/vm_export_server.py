"""The HTTPS server of one VirtualMachineExport (KubeVirt's virt-exportserver, in-process).

It serves each exported volume read-only, as KubeVirt's exporter does, at
`/volumes/<volume>/disk.img` (raw, with HTTP Range: a download cut off resumes) and
`/volumes/<volume>/disk.img.gz` (gzip, streamed), and `/exportready` for a readiness probe.
Every other request needs the export's token, in the `x-kubevirt-export-token` header or the
query parameter of that name (as KubeVirt takes it), compared in constant time; a missing or
wrong token is 401 before anything else is looked at. A URL is only ever looked up in the
table of volumes the server was given: nothing in it reaches a path on the host, so
`/volumes/../...` or a name not exported is a 404. Each server has its own self-signed
certificate (its PEM goes to status.links.*.cert) and listens on loopback.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import ssl
import tempfile
import threading
import zlib
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

from host.sandbox import UnsafeFile, open_no_follow

from . import errors
from .https_server import HttpsServer, TextHandler
from .pipeline import DISK_IMG
from .upload_server import certificate_pem

log = logging.getLogger("pvlun.vmexport")
TOKEN_HEADER = "x-kubevirt-export-token"
READY_PATH = "/exportready"
RAW, GZIP = "disk.img", "disk.img.gz"
CHUNK = 1 << 20
_RANGE = re.compile(r"bytes=(\d{0,19})-(\d{0,19})")  # 19 digits: any offset of a real disk


@dataclass(frozen=True)
class ExportedVolume:
    name: str  # the volume's name in the URLs (the claim's, as KubeVirt names it)
    path: str  # the attached volume: a block device, or a Filesystem volume's mounted directory


def volume_urls(base: str, name: str) -> list[dict[str, str]]:
    """The formats of one volume as status.links.*.volumes[].formats lists them."""
    return [{"format": "raw", "url": f"{base}/volumes/{name}/{RAW}"},
            {"format": "gzip", "url": f"{base}/volumes/{name}/{GZIP}"}]


class ExportServer(HttpsServer):
    """One export's HTTPS endpoint; `start()` serves in a thread, `stop()` ends it and waits
    for the requests under way (their volumes are detached after it)."""

    thread_name = "pvlun-vmexport"

    def __init__(self, volumes: list[ExportedVolume], token: str, address: tuple[str, int] = ("127.0.0.1", 0),
                 tls_files: tuple[str, str] | None = None, export_uid: str = ""):
        """`tls_files`: (certificate, key) to serve with (an exporter Pod's mounted Secret);
        without them a self-signed certificate for the address is made. `export_uid` goes into
        each volume's ETag (a random one per server without it), so a download resumed with
        If-Range never appends one export's bytes to another's."""
        if not token:
            raise ValueError("an export needs a token")
        errors.register_secret(token)  # never in a log line or an event, as a URL's query or otherwise
        self.export_uid = export_uid or secrets.token_hex(16)
        self.volumes = {v.name: v for v in volumes}
        self.token = token.encode()
        self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        if tls_files is not None:
            self.tls.load_cert_chain(*tls_files)
            with open(tls_files[0]) as f:
                self.cert_pem = f.read()
        else:
            self._self_signed(address[0])
        self._open = 0  # disks open for requests under way
        self._idle = threading.Condition()
        self.stopping = threading.Event()  # downloads under way end at their next chunk
        super().__init__(address, _ExportHandler)

    def _self_signed(self, host: str) -> None:
        cert, key = certificate_pem((host, "localhost"))
        self.cert_pem = cert.decode()
        with tempfile.TemporaryDirectory(prefix="pvlun-vmexport-") as tmp:  # ssl loads keys from files only
            cert_file, key_file = os.path.join(tmp, "tls.crt"), os.path.join(tmp, "tls.key")
            for path, data in ((cert_file, cert), (key_file, key)):
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
            self.tls.load_cert_chain(cert_file, key_file)

    def stop(self, wait: float = 10.0) -> None:
        """No new request, and the ones under way end: their volumes are about to be detached."""
        self.stopping.set()
        super().stop()
        self.close_connections()  # a client that stopped reading holds no disk open past this
        with self._idle:
            self._idle.wait_for(lambda: self._open == 0, wait)

    def open_disk(self, volume: ExportedVolume) -> int:
        """The volume's disk, read-only: the device itself, or a Filesystem volume's disk.img
        opened without following a link (its owner may have put anything there)."""
        filesystem = os.path.isdir(volume.path)
        disk = os.path.join(volume.path, DISK_IMG) if filesystem else volume.path
        fd = open_no_follow(disk, devices=not filesystem)
        with self._idle:
            self._open += 1
        return fd

    def etag(self, volume: ExportedVolume, size: int) -> str:
        """A strong validator of the volume's bytes in this export (RFC 9110 8.8.3)."""
        digest = hashlib.sha256(f"{self.export_uid}/{volume.name}/{size}".encode()).hexdigest()[:32]
        return f'"{digest}"'

    def close_disk(self, fd: int) -> None:
        os.close(fd)
        with self._idle:
            self._open -= 1
            self._idle.notify_all()


class _ExportHandler(TextHandler):
    server: ExportServer
    log = log

    def _authorized(self, query: str) -> bool:
        given = self.headers.get(TOKEN_HEADER)
        if given is None:
            given = (parse_qs(query).get(TOKEN_HEADER) or [None])[0]
        if not given:
            self._reply(401, f"missing token: send it in the {TOKEN_HEADER} header")
            return False
        if not hmac.compare_digest(given.encode(), self.server.token):
            self._reply(401, "invalid token")
            return False
        return True

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        if parts.path == READY_PATH:
            return self._reply(200, "ready")
        if not self._authorized(parts.query):
            return
        segments = parts.path.split("/")
        # exactly "", "volumes", NAME, FILE: the name is looked up, never joined into a path
        if len(segments) != 4 or segments[:2] != ["", "volumes"] or segments[3] not in (RAW, GZIP):
            return self._reply(404, "not found")
        volume = self.server.volumes.get(unquote(segments[2]))
        if volume is None:
            return self._reply(404, "not found")
        try:
            fd = self.server.open_disk(volume)
        except (UnsafeFile, OSError) as exc:
            log.warning("export of volume %s: %s", volume.name, exc)
            return self._reply(500, f"the volume's disk cannot be read: {exc}")
        try:
            if segments[3] == RAW:
                self._send_raw(fd, volume)
            else:
                self._send_gzip(fd)
        except OSError:  # the client went away, or the export stopped
            self.close_connection = True
        finally:
            self.server.close_disk(fd)

    def _send_raw(self, fd: int, volume: ExportedVolume) -> None:
        size = os.lseek(fd, 0, os.SEEK_END)
        etag = self.server.etag(volume, size)
        start, end = 0, size - 1
        asked = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        partial = False
        if asked and (if_range is None or if_range.strip() == etag):  # another export's part: all of it
            match = _RANGE.fullmatch(asked.strip())
            if not match or not (match.group(1) or match.group(2)):
                return self._unsatisfiable(size, etag)
            first, last = match.groups()
            if first:
                start, end = int(first), min(int(last), size - 1) if last else size - 1
            else:  # the last N bytes
                start, end = max(0, size - int(last)), size - 1
            if start >= size or start > end:
                return self._unsatisfiable(size, etag)
            partial = True
        self.send_response(206 if partial else 200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", etag)
        self.send_header("Content-Length", str(end - start + 1))
        if partial:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if self.command == "HEAD":
            return
        offset = start
        while offset <= end:
            self._check_running()
            chunk = os.pread(fd, min(CHUNK, end - offset + 1), offset)
            if not chunk:
                raise OSError("the volume ended early")
            self.wfile.write(chunk)
            offset += len(chunk)

    def _check_running(self) -> None:
        if self.server.stopping.is_set():
            raise OSError("the export stopped")

    def _unsatisfiable(self, size: int, etag: str) -> None:
        self.send_response(416)
        self.send_header("ETag", etag)
        self.send_header("Content-Range", f"bytes */{size}")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _send_gzip(self, fd: int) -> None:
        """Compressed as it is read, in chunked encoding (its length is known only at the end)."""
        self.send_response(200)
        self.send_header("Content-Type", "application/gzip")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if self.command == "HEAD":
            return
        packer = zlib.compressobj(6, zlib.DEFLATED, 31)  # 31: a gzip header and trailer
        offset = 0
        while chunk := os.pread(fd, CHUNK, offset):
            self._check_running()
            offset += len(chunk)
            self._chunk(packer.compress(chunk))
        self._chunk(packer.flush())
        self.wfile.write(b"0\r\n\r\n")

    def _chunk(self, data: bytes) -> None:
        if data:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
