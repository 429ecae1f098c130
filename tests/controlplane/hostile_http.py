"""HTTP servers that misbehave on purpose, on loopback, built at test time:

- `silent`: answers with headers, then sends nothing (a stalled transfer);
- `trickle`: sends the body a few bytes at a time, forever (a slow transfer, never stalled);
- `ranged_trickle`: serves an image with byte ranges, its first `fast` bytes at once and the
  rest at a trickle, so qemu inspects it quickly and then converts it in place, slowly;
- `ranged_503`: serves an image with byte ranges, but only its first 64 KiB (what the importer
  asks first): any other range gets 503, so qemu's reads in place fail at the server.

Each server counts its requests and notes when a client hung up on it.
"""

from __future__ import annotations

import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class HostileServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, behaviour: str, *, size: int = 64 << 20, image: bytes = b"", fast: int = 0):
        self.behaviour, self.size, self.image, self.fast = behaviour, len(image) or size, image, fast
        self.requests = 0
        self.hung_up_at: float | None = None  # when a client went away mid-body
        self.done = threading.Event()
        super().__init__(("127.0.0.1", 0), _Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}/disk.img"
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.done.set()
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: HostileServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_HEAD(self) -> None:
        self._headers(200, self.server.size, ranges=self.server.behaviour.startswith("ranged"))

    def do_GET(self) -> None:
        srv = self.server
        srv.requests += 1
        if srv.behaviour == "silent":
            self._headers(200, srv.size)
            srv.done.wait()
        elif srv.behaviour == "trickle":
            self._headers(200, srv.size)
            self._trickle(bytes([0x5A]) * srv.size)
        elif srv.behaviour == "ranged_503" and self._range() != (0, 65536):
            self._headers(503, 0)
        else:
            start, end = self._range()
            self._headers(206, end - start, content_range=f"bytes {start}-{end - 1}/{srv.size}")
            body = srv.image[start:end]
            if start < srv.fast:
                self._send(body)
            else:
                self._trickle(body)

    def _range(self) -> tuple[int, int]:
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if not m:
            return 0, self.server.size
        return int(m.group(1)), min(self.server.size, int(m.group(2)) + 1 if m.group(2) else self.server.size)

    def _headers(self, code: int, length: int, *, ranges: bool = True, content_range: str = "") -> None:
        self.send_response(code)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        if ranges:
            self.send_header("Accept-Ranges", "bytes")
        if content_range:
            self.send_header("Content-Range", content_range)
        self.end_headers()
        self.wfile.flush()

    def _send(self, data: bytes) -> bool:
        try:
            self.wfile.write(data)
            self.wfile.flush()
            return True
        except OSError:
            self.server.hung_up_at = self.server.hung_up_at or time.monotonic()
            return False

    def _trickle(self, body: bytes, piece: int = 4096, every: float = 0.05) -> None:
        for offset in range(0, len(body), piece):
            if self.server.done.is_set() or not self._send(body[offset:offset + piece]):
                return
            time.sleep(every)
