"""A threaded HTTPS server on Python's http.server (the upload endpoint, an export's server):
the TLS handshake runs in the request's worker thread, so a client that connects and sends
nothing holds its own thread only. Nothing is trusted before a request's headers are read:
at most `max_connections` connections are served at once (one more is closed at once), and
the handshake and each request's headers together get `head_seconds` (a client trickling
bytes is cut off then); a request's body (an upload) has no such deadline."""

from __future__ import annotations

import logging
import math
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from . import errors


class HttpsServer(ThreadingHTTPServer):
    """Serves with `tls` (set before `__init__` of this class runs); `start()` serves in a thread
    named `thread_name`, `stop()` ends it."""

    daemon_threads = True
    thread_name = "pvlun-https"
    max_connections = 64
    head_seconds = 30.0
    tls: ssl.SSLContext

    def __init__(self, *args, **kwargs):
        self._slots = threading.BoundedSemaphore(self.max_connections)
        self._connections: dict[ssl.SSLSocket, float] = {}  # -> deadline of its handshake or headers
        self._connections_lock = threading.Lock()
        self._closing = False
        super().__init__(*args, **kwargs)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"https://{host}:{port}"

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):  # as many as one serves: no thread for it
            logging.getLogger("pvlun.https").debug("%s: too many connections, closed", client_address[0])
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def finish_request(self, request, client_address) -> None:
        request.settimeout(60)
        try:
            tls_sock = self.tls.wrap_socket(request, server_side=True, do_handshake_on_connect=False)
        except (ssl.SSLError, OSError):
            return
        self.expect_head(tls_sock)
        try:
            try:
                tls_sock.do_handshake()
            except (ssl.SSLError, OSError):
                return
            super().finish_request(tls_sock, client_address)
        finally:
            with self._connections_lock:
                self._connections.pop(tls_sock, None)
            try:
                tls_sock.close()
            except OSError:
                pass

    def expect_head(self, conn: ssl.SSLSocket) -> None:
        """From now the connection has `head_seconds` to finish its handshake or next request's headers."""
        with self._connections_lock:
            self._connections[conn] = time.monotonic() + self.head_seconds
            if self._closing:
                _cut(conn)

    def head_read(self, conn: ssl.SSLSocket) -> None:
        """The request's headers are in: its body and the answer take what they take."""
        with self._connections_lock:
            if conn in self._connections:
                self._connections[conn] = math.inf

    def service_actions(self) -> None:
        """Run by serve_forever every half second: cut off the connections past their deadline."""
        now = time.monotonic()
        with self._connections_lock:
            for conn, deadline in self._connections.items():
                if deadline < now:
                    _cut(conn)

    def close_connections(self) -> None:
        """End every connection now (a blocked read or write in its thread fails), and any still to come."""
        with self._connections_lock:
            self._closing = True
            for conn in self._connections:
                _cut(conn)

    def handle_error(self, request, client_address) -> None:
        logging.getLogger("pvlun.https").debug("%s: request failed", client_address[0], exc_info=True)

    def start(self):
        threading.Thread(target=self.serve_forever, name=self.thread_name, daemon=True).start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


def _cut(conn: ssl.SSLSocket) -> None:
    """Shut the socket down under the TLS layer (its thread may be inside a read or a write)."""
    try:
        socket.socket.shutdown(conn, socket.SHUT_RDWR)
    except OSError:
        pass


class TextHandler(BaseHTTPRequestHandler):
    """HTTP/1.1 requests answered, when not with data, with one line of text; request lines
    (they may carry a token) are logged only scrubbed, at debug level, to `log`."""

    protocol_version = "HTTP/1.1"
    log = logging.getLogger("pvlun.https")

    server: HttpsServer

    _heads = 0  # requests whose headers were read on this connection

    def handle_one_request(self) -> None:
        if self._heads:  # the first one's deadline began before the handshake
            self.server.expect_head(self.connection)
        super().handle_one_request()

    def parse_request(self) -> bool:
        ok = super().parse_request()  # reads the headers
        self.server.head_read(self.connection)
        self._heads += 1
        return ok

    def log_message(self, fmt: str, *args) -> None:
        self.log.debug("%s: %s", self.client_address[0], errors.scrub(fmt % args))

    def _reply(self, code: int, message: str) -> None:
        """The answer, and the connection closed after it."""
        body = (message + "\n").encode()
        try:
            self.send_response(code)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
        except OSError:
            pass
        self.close_connection = True
