"""The upload endpoint (CDI's uploadproxy + upload server, in one): HTTPS, token per DataVolume.

`POST|PUT /v1beta1/upload` (or `/upload`) with `Authorization: Bearer <token>`; the token
is a short-lived HMAC-signed string naming one DataVolume (`issue_token`/`verify_token`).
The body goes through the same pipeline as every import, into the Target that the
`resolve` callback names. `on_done(dv_key, ok, message)` reports the outcome; an upload
cut off halfway calls `on_interrupted(dv_key, message)` instead (the data is discarded and
the DataVolume should get ready for upload again: it can be sent again).

`resolve` may acquire the target (attach a volume): it is called only once the body's
first byte has arrived, and `release(dv_key)` follows it on every path. A readiness probe
(GET) or a request that is no upload only asks `check(dv_key)`, which acquires nothing.
A body whose Content-Length the volume cannot hold is refused (413) before any byte is
written, without an outcome: the DataVolume stays ready for an upload that fits.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import ssl
import threading
import time
from typing import Callable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from . import errors
from .errors import ImportFailed
from .https_server import HttpsServer, TextHandler
from .pipeline import Target, import_into
from .sources.httpclient import header_number
from .sources.upload import UploadSource

log = logging.getLogger("pvlun.upload")
# CDI's upload proxy paths; an -async upload is answered once the image is converted, as a sync one is
UPLOAD_PATHS = ("/v1beta1/upload", "/upload", "/v1alpha1/upload", "/v1beta1/upload-async", "/v1alpha1/upload-async")
LINGER_SECONDS = 2.0
KEY_BYTES = 32  # the least a signing key may hold (an empty key would let anyone sign)


class InvalidToken(ValueError):
    """The token is malformed, forged or expired."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _usable(secret_key: bytes) -> bytes:
    if len(secret_key) < KEY_BYTES:
        raise ValueError(f"an upload signing key must hold at least {KEY_BYTES} bytes")
    return secret_key


def issue_token(secret_key: bytes, dv_key: str, ttl: float = 300) -> str:
    """A token that lets its bearer upload into DataVolume `dv_key` ("namespace/name") for `ttl` s."""
    _usable(secret_key)
    payload = _b64(json.dumps({"dv": dv_key, "op": "upload", "exp": time.time() + ttl}, separators=(",", ":")).encode())
    sig = _b64(hmac.new(secret_key, payload.encode(), hashlib.sha256).digest())
    return f"{payload}.{sig}"


def verify_token(secret_key: bytes, token: str) -> str:
    """Return the DataVolume key the token names, or raise InvalidToken."""
    payload, _, sig = token.partition(".")
    try:
        expected = hmac.new(_usable(secret_key), payload.encode(), hashlib.sha256).digest()
        if not sig or not hmac.compare_digest(expected, _unb64(sig)):
            raise InvalidToken("bad signature")
        claims = json.loads(_unb64(payload))
    except (ValueError, TypeError) as exc:
        raise InvalidToken(f"malformed token: {type(exc).__name__}") from None
    if claims.get("op") != "upload" or not isinstance(claims.get("dv"), str):
        raise InvalidToken("not an upload token")
    if float(claims.get("exp", 0)) < time.time():
        raise InvalidToken("token expired")
    return claims["dv"]


def certificate_pem(hosts: tuple[str, ...]) -> tuple[bytes, bytes]:
    """A fresh self-signed serving certificate for `hosts` (IP addresses or DNS names), valid a
    year: (certificate PEM, private key PEM). Clients trust the certificate itself."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pvlun-upload")])
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(key, hashes.SHA256())
    )
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


def ensure_certificate(cert_dir: str, hosts: tuple[str, ...] = ("127.0.0.1", "localhost", "::1")) -> tuple[str, str]:
    """A self-signed serving certificate in cert_dir (tls.crt/tls.key), made once; clients trust tls.crt."""
    cert_path, key_path = os.path.join(cert_dir, "tls.crt"), os.path.join(cert_dir, "tls.key")
    if os.path.exists(cert_path) and os.path.exists(key_path):
        return cert_path, key_path
    os.makedirs(cert_dir, exist_ok=True)
    cert, key = certificate_pem(hosts)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    with open(cert_path, "wb") as f:
        f.write(cert)
    return cert_path, key_path


class UploadServer(HttpsServer):
    """HTTPS upload endpoint; `start()` serves in a thread, `stop()` ends it."""

    thread_name = "pvlun-upload"

    def __init__(
        self,
        *,
        cert_dir: str,
        secret_key: bytes,
        resolve: Callable[[str], Target],
        on_done: Callable[[str, bool, str], None],
        scratch_dir: str,
        on_interrupted: Callable[[str, str], None] | None = None,
        progress: Callable[[str, float], None] | None = None,
        address: tuple[str, int] = ("127.0.0.1", 0),
        check: Callable[[str], None] | None = None,
        release: Callable[[str], None] | None = None,
    ):
        self.cert_file, key_file = ensure_certificate(cert_dir)
        self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.tls.load_cert_chain(self.cert_file, key_file)
        self.secret_key = _usable(secret_key)
        self.resolve, self.on_done, self.on_interrupted = resolve, on_done, on_interrupted
        self.check = check or (lambda dv_key: None)
        self.release = release or (lambda dv_key: None)
        self.progress = progress
        self.scratch_dir = scratch_dir
        self.busy: set[str] = set()
        self.lock = threading.Lock()
        super().__init__(address, _UploadHandler)

    def stop(self, wait: float = 15.0) -> None:
        """No new upload, and the ones under way end now (as interrupted uploads, their volumes
        zeroed and reported) before this returns, up to `wait` seconds: the daemon that stops
        is about to let go of their volumes and close the store their reports go to."""
        super().stop()
        self.close_connections()
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            with self.lock:
                if not self.busy:
                    return
            time.sleep(0.01)


class _UploadHandler(TextHandler):
    server: UploadServer
    log = log

    def _linger(self) -> None:
        """After refusing an upload early (a backing file, too large) the client may still be
        sending: read and drop what comes for a moment, so that closing the connection does not
        reset it before the client reads the answer (a lingering close, as web servers do)."""
        deadline = time.monotonic() + LINGER_SECONDS
        try:
            self.connection.settimeout(LINGER_SECONDS)
            while time.monotonic() < deadline and self.rfile.read1(1 << 20):
                pass
        except (OSError, ValueError):
            pass

    def do_GET(self) -> None:
        """/healthz, and a pre-flight on the upload path: is the token good, is the DataVolume waiting?"""
        if self.path == "/healthz":
            return self._reply(200, "ok")
        if self.path.split("?")[0] not in UPLOAD_PATHS:
            return self._reply(404, "not found")
        dv_key = self._authorize()
        if dv_key is None:
            return
        try:
            self.server.check(dv_key)
        except LookupError as exc:
            return self._reply(404, f"no DataVolume waiting for upload: {exc}")
        self._reply(200, "ready")

    def _authorize(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("Bearer "):
            self._reply(401, "missing bearer token")
            return None
        try:
            return verify_token(self.server.secret_key, auth[7:].strip())
        except InvalidToken as exc:
            self._reply(401, f"invalid token: {exc}")
            return None

    def do_PUT(self) -> None:
        self.do_POST()

    def do_POST(self) -> None:
        srv = self.server
        if self.path.split("?")[0] not in UPLOAD_PATHS:
            return self._reply(404, "not found")
        dv_key = self._authorize()
        if dv_key is None:
            return
        length = header_number(self.headers.get("Content-Length"))
        if length is None:
            return self._reply(411, "Content-Length required")
        if length == 0:
            return self._reply(400, f"{errors.INVALID_IMAGE}: the upload is empty")
        with srv.lock:
            if dv_key in srv.busy:
                return self._reply(409, f"an upload into {dv_key} is already in progress")
            srv.busy.add(dv_key)
        try:
            self._upload(dv_key, length)
        finally:
            with srv.lock:
                srv.busy.discard(dv_key)

    def _upload(self, dv_key: str, length: int) -> None:
        srv = self.server
        try:
            srv.check(dv_key)
        except LookupError as exc:
            return self._reply(404, f"no DataVolume waiting for upload: {exc}")
        if not self._body_started():
            return  # the client sent headers only and went away: nothing was acquired
        try:
            self._receive(dv_key, length)
        finally:
            srv.release(dv_key)

    def _body_started(self) -> bool:
        """Wait for the body's first byte before anything is acquired for it."""
        try:
            return bool(self.rfile.peek(1))  # type: ignore[attr-defined]
        except OSError:
            return False

    def _receive(self, dv_key: str, length: int) -> None:
        srv = self.server
        try:
            target = srv.resolve(dv_key)
        except LookupError as exc:
            return self._reply(404, f"no DataVolume waiting for upload: {exc}")
        except Exception:
            log.exception("upload into %s: cannot get its volume ready", dv_key)
            return self._reply(503, "the DataVolume's volume cannot be made ready now; try again")
        report = (lambda p: srv.progress(dv_key, p)) if srv.progress else (lambda p: None)
        try:
            import_into(UploadSource(self.rfile, length), target, progress=report, scratch_dir=srv.scratch_dir)  # type: ignore[arg-type]
        except errors.DeclaredTooLarge as exc:  # nothing written: the DataVolume waits for one that fits
            log.info("upload into %s refused: %s", dv_key, exc.message)
            self._reply(413, f"{exc}; the DataVolume is still ready for an upload that fits")
            return self._linger()
        except ImportFailed as exc:
            if exc.reason == errors.UPLOAD_INTERRUPTED:
                log.info("upload into %s interrupted: %s", dv_key, exc.message)
                if srv.on_interrupted:
                    srv.on_interrupted(dv_key, exc.message)
                else:
                    srv.on_done(dv_key, False, str(exc))
                return self._reply(400, str(exc))
            srv.on_done(dv_key, False, str(exc))
            self._reply(400, str(exc))
            return self._linger()
        srv.on_done(dv_key, True, "")
        self._reply(200, "upload complete")


