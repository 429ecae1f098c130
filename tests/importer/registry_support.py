"""Registry helpers for the importer tests: OCI layouts for skopeo to push, and a token server.

The token server is Docker's token authentication as its spec describes it: a client that
got `401` + `WWW-Authenticate: Bearer realm=...,service=...,scope=...` from the registry
asks the realm (here, https on loopback) for a token, with basic credentials or none; the
answer is a JWT signed by a key whose certificate is the registry's `rootcertbundle`,
carrying `access` for the scopes it granted. Debian's docker-registry (distribution 2.8)
finds the signing key by the header's `kid`, libtrust's fingerprint of the public key.
Built with `cryptography` by hand (ES256): no JWT library needed.
"""

from __future__ import annotations

import base64
import datetime as dt
import gzip
import hashlib
import http.server
import io
import json
import os
import ssl
import tarfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import zstandard
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID


# -- OCI layouts -----------------------------------------------------------------------------
def _tar_bytes(files: dict[str, bytes | tuple[str, str]]) -> bytes:
    """A tar of `files`: name → content, or ("symlink", target)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted({str(Path(n).parent) for n in files} - {"."}):
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            if isinstance(data, tuple):
                info.type, info.linkname = tarfile.SYMTYPE, data[1]
                tar.addfile(info)
                continue
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def build_oci_layout(root: Path, tag: str, layers: list[tuple[dict | bytes, str]]) -> None:
    """An OCI image layout with one manifest; each layer is (files, "gzip"|"zstd"), files a
    dict for _tar_bytes or a tar already made (bytes, taken as they are)."""
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)

    def put(data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return "sha256:" + digest

    descs, diff_ids = [], []
    for files, comp in layers:
        raw = files if isinstance(files, bytes) else _tar_bytes(files)
        diff_ids.append("sha256:" + hashlib.sha256(raw).hexdigest())
        blob = gzip.compress(raw, 1) if comp == "gzip" else zstandard.ZstdCompressor().compress(raw)
        descs.append({"mediaType": f"application/vnd.oci.image.layer.v1.tar+{comp}", "digest": put(blob), "size": len(blob)})
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": diff_ids},
                         "config": {}}).encode()
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": put(config),
                                      "size": len(config)},
                           "layers": descs}).encode()
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": put(manifest), "size": len(manifest),
        "annotations": {"org.opencontainers.image.ref.name": tag}}]}))


# -- Debian's docker-registry on loopback --------------------------------------------------------
def serve_registry(d: Path, pki, auth_yaml: str = "", log: Path | None = None):
    """A docker-registry over TLS (the test PKI's server cert) on a free loopback port, keeping
    its blobs under `d`; `auth_yaml` is its config's `auth:` section, if any; its stderr goes to
    `log`. (process, host:port)."""
    import subprocess

    from importer_support import free_port, stop, wait_port

    port = free_port()
    (d / "config.yml").write_text(f"""
version: 0.1
log: {{level: error}}
storage:
  filesystem: {{rootdirectory: {d / 'data'}}}
http:
  addr: 127.0.0.1:{port}
  tls: {{certificate: {pki.cert_file}, key: {pki.key_file}}}
{auth_yaml}""")
    with open(log or os.devnull, "wb") as err:
        proc = subprocess.Popen(["docker-registry", "serve", str(d / "config.yml")], stdout=subprocess.DEVNULL,
                                stderr=err)
    try:
        wait_port(port, proc)
    except BaseException:
        stop(proc)
        raise
    return proc, f"127.0.0.1:{port}"


def push_image(layout: Path, tag: str, pki, dest: str, creds: str | None = None) -> None:
    """skopeo copies the OCI layout's `tag` to `dest` (docker://host/repo:tag)."""
    import subprocess

    auth = ["--dest-creds", creds] if creds else []
    subprocess.run(["skopeo", "--insecure-policy", "copy", "-q", "--dest-cert-dir", pki.cert_dir, *auth,
                    f"oci:{layout}:{tag}", dest], check=True, capture_output=True)


# -- JWTs the way docker-registry verifies them ------------------------------------------------
def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def libtrust_key_id(public_key) -> str:
    """libtrust's key id: base32 of the first 30 bytes of sha256(DER SPKI), 12 groups of 4 joined by ':'."""
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    text = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode().rstrip("=")
    return ":".join(text[i:i + 4] for i in range(0, len(text), 4))


def es256_jwt(key: ec.EllipticCurvePrivateKey, kid: str, claims: dict) -> str:
    """A compact JWS: ES256's signature is r || s, 32 bytes each (not DER)."""
    header = {"typ": "JWT", "alg": "ES256", "kid": kid}
    signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
    r, s = decode_dss_signature(key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
    return f"{signing_input}.{_b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


# -- the token server ----------------------------------------------------------------------------
@dataclass
class TokenRequest:
    """What the token server saw: who asked (None: anonymous), whether the password matched, for what."""

    account: str | None
    authenticated: bool
    service: str
    scopes: list[str]
    granted: list[dict] = field(default_factory=list)


class _TokenHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    server: TokenServer

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if url.path.startswith("/v2/"):             # a stand-in registry whose realm answers no token
            realm = f"https://127.0.0.1:{self.server.server_address[1]}/{url.path.split('/')[2]}"
            return self._reply(401, {"errors": [{"code": "UNAUTHORIZED"}]},
                               {"WWW-Authenticate": f'Bearer realm="{realm}",service="{self.server.service}"'})
        if url.path == "/html":
            return self._reply(200, "<html>sign in first</html>")
        if url.path == "/empty":
            return self._reply(200, {"details": "no token here"})
        if url.path != "/token":
            return self._reply(404, {"errors": [{"code": "NOT_FOUND"}]})
        query = parse_qs(url.query)
        service = (query.get("service") or [""])[0]
        scopes = [s for value in query.get("scope", []) for s in value.split(" ") if s]
        account, password = None, None
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Basic "):
            try:
                account, _, password = base64.b64decode(auth[6:]).decode().partition(":")
            except ValueError:
                return self._reply(400, {"errors": [{"code": "BAD_REQUEST"}]})
        srv = self.server
        seen = TokenRequest(account, account is not None and srv.users.get(account) == password, service, scopes)
        with srv.lock:
            srv.seen.append(seen)
        if service != srv.service:
            return self._reply(400, {"errors": [{"code": "UNSUPPORTED", "message": "unknown service"}]})
        if account is not None and not seen.authenticated:
            return self._reply(401, {"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]},
                               {"WWW-Authenticate": f'Basic realm="{srv.service}"'})
        for scope in scopes:                      # repository:NAME:actions; anonymous gets nothing (no public repos)
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            if kind == "repository" and name and seen.authenticated:
                allowed = [a for a in actions.split(",") if a in ("pull", "push")]
                seen.granted.append({"type": "repository", "name": name, "actions": allowed})
        now = int(time.time())
        token = es256_jwt(srv.key, srv.kid, {
            "iss": srv.issuer, "sub": account or "", "aud": srv.service, "exp": now + 300, "nbf": now - 10,
            "iat": now, "jti": os.urandom(12).hex(), "access": seen.granted,
        })
        issued = dt.datetime.fromtimestamp(now, dt.timezone.utc).isoformat()
        self._reply(200, {"token": token, "access_token": token, "expires_in": 300, "issued_at": issued})

    def _reply(self, status: int, body: dict | str, headers: dict[str, str] | None = None) -> None:
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)


class TokenServer(http.server.ThreadingHTTPServer):
    """A Docker token service on https://127.0.0.1:PORT/token with its own signing key."""

    daemon_threads = True

    def __init__(self, tls: ssl.SSLContext, users: dict[str, str], *, service: str, issuer: str, workdir: Path):
        self.tls, self.users, self.service, self.issuer = tls, users, service, issuer
        self.lock = threading.Lock()
        self.seen: list[TokenRequest] = []
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.kid = libtrust_key_id(self.key.public_key())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pvlun test token signer")])
        now = dt.datetime.now(dt.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(self.key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(hours=1))
                .not_valid_after(now + dt.timedelta(days=2)).sign(self.key, hashes.SHA256()))
        self.cert_bundle = workdir / "token-signer.pem"    # the registry's rootcertbundle
        self.cert_bundle.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        super().__init__(("127.0.0.1", 0), _TokenHandler)
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()

    def finish_request(self, request, client_address):
        try:
            wrapped = self.tls.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            return
        with wrapped:                            # wrap_socket detached `request`: close what holds the fd
            super().finish_request(wrapped, client_address)

    @property
    def realm(self) -> str:
        return f"https://127.0.0.1:{self.server_address[1]}/token"

    def requests_since(self, mark: int) -> list[TokenRequest]:
        with self.lock:
            return list(self.seen[mark:])

    def mark(self) -> int:
        with self.lock:
            return len(self.seen)

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join(10)
