"""Helpers and fixtures for the importer tests (imported by conftest.py).

Real servers on loopback and real images for the importer tests.

Images are generated once per worker with qemu-img (a few MiB); servers are module
scoped: Python's http.server (no range requests) over HTTP and HTTPS with a CA made by
`cryptography`, nginx (range requests) with a temp config, Debian's docker-registry over
TLS, and moto's S3 server (PyPI `moto[server]`, a real S3 API on loopback).
"""

from __future__ import annotations

import base64
import datetime as dt
import gzip
import hashlib
import http.server
import ipaddress
import lzma
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

MiB = 1 << 20
DISK_FORMATS = ["raw", "qcow2", "vmdk", "vdi", "vhd", "vhdx", "iso"]
QEMU_NAME = {"vhd": "vpc"}


# -- small helpers ---------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited early: {proc.args}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} did not open")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def sha256_file(path: str | Path, length: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        left = length if length is not None else 1 << 62
        while left > 0 and (chunk := f.read(min(MiB, left))):
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def allocated(path: str | Path) -> int:
    return os.stat(path).st_blocks * 512


def block_target(tmp_path: Path, size: int = 16 * MiB, name: str = "lun.img") -> Path:
    """A fresh sparse raw file standing for a Block volume (a LUN of the file backend)."""
    path = tmp_path / name
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def assert_disk(path: str | Path, expected_raw: str | Path, disk_size: int | None = None) -> None:
    """The disk holds exactly the expected raw bytes, then zeros up to its size."""
    expected_len = os.path.getsize(expected_raw)
    assert sha256_file(path, expected_len) == sha256_file(expected_raw), f"{path} differs from {expected_raw}"
    size = os.path.getsize(path)
    if disk_size is not None:
        assert size == disk_size
    with open(path, "rb") as f:
        f.seek(expected_len)
        while chunk := f.read(MiB):
            assert chunk.count(0) == len(chunk), "bytes past the image are not zero"


def assert_zero(path: str | Path) -> None:
    """Nothing of a failed import is left: the volume reads as zeros and allocates nothing."""
    with open(path, "rb") as f:
        while chunk := f.read(MiB):
            assert chunk.count(0) == len(chunk), "a failed import left data behind"
    assert allocated(path) == 0


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


# -- PKI ---------------------------------------------------------------------------------
@dataclass
class Pki:
    ca_pem: str
    ca_file: str
    cert_file: str
    key_file: str
    cert_dir: str        # for skopeo --dest-cert-dir (holds ca.crt)
    other_ca_pem: str    # a CA that signed nothing we serve


def _make_ca(cn: str):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca_key, ca = _make_ca("pvlun test CA")
    _, other = _make_ca("some other CA")
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = lambda c: c.public_bytes(serialization.Encoding.PEM).decode()  # noqa: E731
    (d / "ca.pem").write_text(pem(ca))
    (d / "server.crt").write_text(pem(cert))
    (d / "server.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                     serialization.NoEncryption()))
    (d / "certs").mkdir()
    (d / "certs" / "ca.crt").write_text(pem(ca))
    return Pki(pem(ca), str(d / "ca.pem"), str(d / "server.crt"), str(d / "server.key"), str(d / "certs"), pem(other))


# -- images --------------------------------------------------------------------------------
@dataclass
class Images:
    dir: Path                       # served directory; files are named <kind>.bin (names prove nothing)
    expected: dict[str, Path]       # kind -> raw bytes `qemu-img convert -O raw` gives

    def path(self, kind: str) -> Path:
        return self.dir / f"{kind}.bin"


def _write_base_raw(path: Path) -> None:
    rnd = os.urandom
    with open(path, "wb") as f:
        f.truncate(6 * MiB)
        f.seek(0)
        f.write(rnd(MiB))
        f.seek(2 * MiB + 512 * 1024)
        f.write(rnd(512 * 1024 + 1234))           # ends off any block boundary
        f.seek(5 * MiB + 100_000)
        f.write(rnd(100_000))                     # starts off any block boundary


def _tar(out: Path, member: Path, arcname: str, mode: str = "w") -> None:
    with tarfile.open(out, mode, format=tarfile.GNU_FORMAT) as tar:
        tar.add(member, arcname=arcname)


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> Images:
    d = tmp_path_factory.mktemp("images")
    exp = tmp_path_factory.mktemp("expected")
    work = tmp_path_factory.mktemp("imgwork")
    base = work / "base.raw"
    _write_base_raw(base)
    expected: dict[str, Path] = {}
    shutil.copy(base, d / "raw.bin")
    expected["raw"] = base
    for fmt in ("qcow2", "vmdk", "vdi", "vhd", "vhdx"):
        qemu_img("convert", "-f", "raw", "-O", QEMU_NAME.get(fmt, fmt), str(base), str(d / f"{fmt}.bin"))
        qemu_img("convert", "-f", QEMU_NAME.get(fmt, fmt), "-O", "raw", str(d / f"{fmt}.bin"), str(exp / f"{fmt}.raw"))
        expected[fmt] = exp / f"{fmt}.raw"
    iso_dir = work / "iso"
    iso_dir.mkdir()
    (iso_dir / "hello.txt").write_bytes(os.urandom(300_000))
    subprocess.run(["genisoimage", "-quiet", "-o", str(d / "iso.bin"), "-V", "cidata", "-J", "-r", str(iso_dir)], check=True)
    expected["iso"] = d / "iso.bin"
    # compressed and archived variants: <inner>.<layer...>
    for inner in ("raw", "qcow2"):
        data = (d / f"{inner}.bin").read_bytes()
        (d / f"{inner}.gz.bin").write_bytes(gzip.compress(data, 1))
        (d / f"{inner}.xz.bin").write_bytes(lzma.compress(data, preset=0))
        (d / f"{inner}.zst.bin").write_bytes(zstandard.ZstdCompressor().compress(data))
        _tar(d / f"{inner}.tar.bin", d / f"{inner}.bin", f"disk/{inner}.img")
        _tar(d / f"{inner}.tar.gz.bin", d / f"{inner}.bin", f"{inner}.img", "w:gz")
        for v in ("gz", "xz", "zst", "tar", "tar.gz"):
            expected[f"{inner}.{v}"] = expected[inner]
    for fmt in ("vmdk", "vhdx"):
        (d / f"{fmt}.xz.bin").write_bytes(lzma.compress((d / f"{fmt}.bin").read_bytes(), preset=0))
        expected[f"{fmt}.xz"] = expected[fmt]
    return Images(d, expected)


# -- Python's http.server (no range requests) ---------------------------------------------------
class _Handler(http.server.SimpleHTTPRequestHandler):
    """Files under /img/, plus the misbehaviours the safety suite needs."""

    protocol_version = "HTTP/1.0"

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        parts = path.strip("/").split("/")
        if parts[0] == "redirect":                     # /redirect/<n>/<file>: n hops, then the file
            n = int(parts[1])
            to = f"/redirect/{n - 1}/{parts[2]}" if n > 1 else f"/img/{parts[2]}"
            return self._redirect(to)
        if parts[0] == "loop":
            return self._redirect("/loop")
        if parts[0] == "to-file":
            return self._redirect("file:///etc/passwd")
        if parts[0] == "auth":                          # /auth/<file>: basic auth user:s3cret
            want = "Basic " + base64.b64encode(b"user:s3cret-pass").decode()
            if self.headers.get("Authorization") != want:
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="x"')
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            return self._file(parts[1])
        if parts[0] == "hdr":                           # /hdr/<file>: needs X-Api-Key and X-Other
            if self.headers.get("X-Api-Key") != "k3y-value" or self.headers.get("X-Other") != "yes":
                self.send_error(403)
                return
            return self._file(parts[1])
        if parts[0] == "cut":                           # /cut/<file>: dies halfway through the body
            data = (self.server.root / parts[1]).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if parts[0] == "lie":                           # /lie/<file>: declares 1 GiB, sends the first 64 KiB
            self.send_response(200)
            self.send_header("Content-Length", str(1 << 30))
            self.end_headers()
            self.wfile.write((self.server.root / parts[1]).read_bytes()[:64 * 1024])
            return
        if parts[0] == "img":
            return self._file(parts[1])
        self.send_error(404)

    def do_HEAD(self) -> None:
        self.do_GET()

    def _redirect(self, to: str) -> None:
        self.send_response(302)
        self.send_header("Location", to)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _file(self, name: str) -> None:
        path = self.server.root / name
        if not path.is_file():
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(path.stat().st_size))
        self.end_headers()
        if self.command == "GET":
            with open(path, "rb") as f:
                shutil.copyfileobj(f, self.wfile, MiB)


class PyServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path, tls: ssl.SSLContext | None):
        self.root = root
        self.tls = tls
        super().__init__(("127.0.0.1", 0), _Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def finish_request(self, request, client_address):
        if self.tls:
            try:
                request = self.tls.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError):
                return
        super().finish_request(request, client_address)

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.server_address[1]}"


@pytest.fixture(scope="module")
def py_http(images):
    srv = PyServer(images.dir, None)
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def py_https(images, pki):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki.cert_file, pki.key_file)
    srv = PyServer(images.dir, ctx)
    yield srv
    srv.shutdown()
    srv.server_close()


# -- nginx (range requests) -------------------------------------------------------------------
@dataclass
class Nginx:
    url: str
    https_url: str


NGINX_CONF = """
user root root;
worker_processes 2;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    sendfile on;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    types {{ }}
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port};
        listen 127.0.0.1:{tls_port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        root {root};
        location /img/ {{ alias {root}/; }}
        location /auth/ {{
            alias {root}/;
            auth_basic "pvlun";
            auth_basic_user_file {d}/htpasswd;
        }}
    }}
}}
"""


def start_nginx(root: Path, workdir: Path, pki: Pki | None = None):
    port, tls_port = free_port(), free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "htpasswd").write_text("user:{PLAIN}s3cret-pass\n")
    conf = workdir / "nginx.conf"
    conf.write_text(NGINX_CONF.format(d=workdir, port=port, tls_port=tls_port, root=root,
                                      cert=pki.cert_file if pki else "", key=pki.key_file if pki else ""))
    if pki is None:
        conf.write_text(conf.read_text().replace(f"listen 127.0.0.1:{tls_port} ssl;", "")
                        .replace("ssl_certificate ;", "").replace("ssl_certificate_key ;", ""))
    proc = subprocess.Popen(["nginx", "-c", str(conf), "-e", str(workdir / "error.log")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_port(port, proc)
    return proc, Nginx(f"http://127.0.0.1:{port}", f"https://127.0.0.1:{tls_port}")


@pytest.fixture(scope="module")
def nginx(images, pki, tmp_path_factory):
    proc, info = start_nginx(images.dir, tmp_path_factory.mktemp("nginx"), pki)
    yield info
    stop(proc)


# -- the upload server --------------------------------------------------------------------------
KEY = b"k" * 32


class Control:
    """What the control plane would do with the upload server's callbacks."""

    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.targets: dict = {}
        self.events: list[tuple] = []
        self.progress: dict[str, float] = {}
        self.done = threading.Event()

    def resolve(self, dv_key: str):
        return self.targets[dv_key]

    def on_done(self, dv_key: str, ok: bool, message: str) -> None:
        self.events.append(("done", dv_key, ok, message))
        self.done.set()

    def on_interrupted(self, dv_key: str, message: str) -> None:
        self.events.append(("interrupted", dv_key, message))
        self.done.set()


@pytest.fixture(scope="module")
def upload(tmp_path_factory):
    from importer.upload_server import UploadServer

    d = tmp_path_factory.mktemp("upload")
    control = Control(d)
    (d / "scratch").mkdir()
    srv = UploadServer(cert_dir=str(d / "certs"), secret_key=KEY, resolve=control.resolve, on_done=control.on_done,
                       on_interrupted=control.on_interrupted, scratch_dir=str(d / "scratch"),
                       progress=lambda k, p: control.progress.__setitem__(k, p)).start()
    yield srv, control
    srv.stop()


# -- file:// sources ----------------------------------------------------------------------------
@pytest.fixture(scope="session")
def public():
    """A directory the sandbox user can reach: file:// sources are opened as that user, through
    every directory on the way, and pytest's temporary directories are private (0700)."""
    d = Path(tempfile.mkdtemp(prefix="pvlun-test-public-"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def published(public: Path, path: str | Path, name: str | None = None) -> Path:
    """A world-readable copy of `path` in `public` (under `name`, by default its own)."""
    out = public / (name or Path(path).name)
    shutil.copyfile(path, out)
    os.chmod(out, 0o644)
    return out


# -- targets and lookups --------------------------------------------------------------------
@pytest.fixture
def scratch(tmp_path) -> str:
    d = tmp_path / "scratch"
    d.mkdir()
    return str(d)


def no_lookup(name: str) -> dict[str, str]:
    raise LookupError(name)


def lookups(secrets: dict | None = None, configmaps: dict | None = None):
    secrets, configmaps = secrets or {}, configmaps or {}
    return (lambda n: secrets[n]), (lambda n: configmaps[n])


def python_exe() -> str:
    return sys.executable


def run_import(source: dict, target, scratch: str, *, secrets: dict | None = None,
               configmaps: dict | None = None, allow_file: bool = False):
    """from_spec + import_into, as the control plane calls them; returns (result, progress values)."""
    from importer.pipeline import import_into
    from importer.sources import from_spec

    secret, configmap = lookups(secrets, configmaps)
    src = from_spec(source, secret=secret, configmap=configmap, allow_file=allow_file)
    seen: list[float] = []
    result = import_into(src, target, progress=seen.append, scratch_dir=scratch)
    return result, seen
