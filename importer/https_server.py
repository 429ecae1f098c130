"""A threaded HTTPS server on Python's http.server (the upload endpoint, an export's server):
the TLS handshake runs in the request's worker thread, so a client that connects and sends
nothing holds its own thread only, for at most a minute."""

from __future__ import annotations

import logging
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from . import errors


class HttpsServer(ThreadingHTTPServer):
    """Serves with `tls` (set before `__init__` of this class runs); `start()` serves in a thread
    named `thread_name`, `stop()` ends it."""

    daemon_threads = True
    thread_name = "pvlun-https"
    tls: ssl.SSLContext

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"https://{host}:{port}"

    def finish_request(self, request, client_address) -> None:
        request.settimeout(60)
        try:
            tls_sock = self.tls.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            return
        try:
            super().finish_request(tls_sock, client_address)
        finally:
            try:
                tls_sock.close()
            except OSError:
                pass

    def start(self):
        threading.Thread(target=self.serve_forever, name=self.thread_name, daemon=True).start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class TextHandler(BaseHTTPRequestHandler):
    """HTTP/1.1 requests answered, when not with data, with one line of text; request lines
    (they may carry a token) are logged only scrubbed, at debug level, to `log`."""

    protocol_version = "HTTP/1.1"
    log = logging.getLogger("pvlun.https")

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
