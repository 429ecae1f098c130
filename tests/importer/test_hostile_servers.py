"""Servers that attack the importer itself (a hostile reviewer's findings, issue 11 hardening):

- a redirect to another origin gets none of the credentials (basic auth from secretRef or the
  URL, secretExtraHeaders), neither from requests nor from pvlun's HEAD or nbdkit's reads;
- documents (registry manifests, tokens) and error bodies are read bounded, and so are tar
  extended headers (a long name or pax header declaring hundreds of MiB);
- data that keeps coming ends: a layer at its manifest's size, a checksummed source at the
  import's size bound;
- an in-place read that fails or stalls at the server is a transfer failure (retried), not
  an invalid image;
- header numbers are ASCII digits ('²' is no Content-Length).

Each server is a Python http.server on 127.0.0.1, written for its one misbehaviour.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import io
import json
import re
import ssl
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

import pytest

from importer import errors, transfer_watch
from importer.errors import ImportFailed
from importer.pipeline import Target, import_into
from importer.sources import RegistrySource, S3Source, from_spec
from importer.upload_server import issue_token

from importer_support import KEY, MiB, assert_disk, assert_zero, block_target, no_lookup, run_import

BASIC = "Basic " + base64.b64encode(b"user:s3cret-pass").decode()


class Server(ThreadingHTTPServer):
    """Answers every request with `route(handler)`; notes each request's method, path and headers."""

    daemon_threads = True

    def __init__(self, route: Callable[[Handler], None]):
        self.route = route
        self.seen: list[tuple[str, str, dict[str, str]]] = []
        self.sent = 0  # body bytes written
        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(BaseHTTPRequestHandler):
    server: Server
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self.server.seen.append((self.command, self.path, dict(self.headers)))
        self.server.route(self)

    do_HEAD = do_GET

    def reply(self, code: int, body: bytes = b"", headers: dict[str, str] | None = None, length: str | None = None):
        self.send_response(code)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", length or str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.write(body)

    def write(self, data: bytes) -> bool:
        try:
            self.wfile.write(data)
            self.wfile.flush()
        except OSError:
            return False
        self.server.sent += len(data)
        return True

    def endless(self, code: int, first: bytes, total: int, headers: dict[str, str] | None = None) -> None:
        """`first`, then zeros up to `total` bytes, with no length: the body ends when the connection does."""
        self.send_response(code)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        if not self.write(first):
            return
        zeros = bytes(MiB)
        for _ in range(0, total - len(first), MiB):
            if not self.write(zeros):
                return

    def ranged(self, data: bytes) -> None:
        """The file `data` with byte ranges (as nginx serves one)."""
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if not m:
            return self.reply(200, data, {"Accept-Ranges": "bytes"})
        start, end = int(m[1]), min(len(data), int(m[2]) + 1 if m[2] else len(data))
        self.reply(206, data[start:end], {"Accept-Ranges": "bytes", "Content-Range": f"bytes {start}-{end - 1}/{len(data)}"})


@pytest.fixture
def serve():
    servers: list[Server] = []

    def make(route: Callable[[Handler], None]) -> Server:
        servers.append(Server(route))
        return servers[-1]

    yield make
    for server in servers:
        server.shutdown()
        server.server_close()


def test_a_redirect_to_another_origin_gets_no_credentials_from_requests_pvlun_or_nbdkit(serve, images, tmp_path,
                                                                                         scratch):
    """secretRef basic auth or userinfo: the origin asked gets them; the server it redirects to
    (another port) gets none, though it serves the image in place (pvlun's HEAD, nbdkit's reads)."""
    data = images.path("qcow2").read_bytes()
    other = serve(lambda h: h.ranged(data))
    origin = serve(lambda h: h.reply(302, headers={"Location": f"{other.url}/disk.qcow2"}))
    for i, (url, secrets) in enumerate([(f"{origin.url}/disk", {"creds": {"accessKeyId": "user",
                                                                          "secretKey": "s3cret-pass"}}),
                                        (origin.url.replace("//", "//user:s3cret-pass@") + "/disk", None)]):
        lun = block_target(tmp_path, name=f"lun{i}.img")
        spec = {"url": url, **({"secretRef": "creds"} if secrets else {})}
        result, _ = run_import({"http": spec}, Target(str(lun), 16 * MiB), scratch, secrets=secrets)
        assert result.method == "direct"
        assert_disk(lun, images.expected["qcow2"])
    assert {h.get("Authorization") for _, _, h in origin.seen} == {BASIC}
    methods = {m for m, _, _ in other.seen}
    assert methods == {"GET", "HEAD"} and len(other.seen) > 4  # requests' GET, pvlun's HEAD, nbdkit's reads
    assert [h for _, _, h in other.seen if "Authorization" in h] == []


def test_a_redirect_within_the_origin_keeps_the_credentials_nbdkit_included(serve, images, tmp_path, scratch):
    data = images.path("qcow2").read_bytes()

    def route(h: Handler) -> None:
        if h.headers.get("Authorization") != BASIC:
            return h.reply(401, headers={"WWW-Authenticate": 'Basic realm="x"'})
        if h.path == "/start":
            return h.reply(302, headers={"Location": "/disk.qcow2"})
        h.ranged(data)

    server = serve(route)
    lun = block_target(tmp_path)
    result, _ = run_import({"http": {"url": f"{server.url}/start", "secretRef": "creds"}}, Target(str(lun), 16 * MiB),
                           scratch, secrets={"creds": {"accessKeyId": "user", "secretKey": "s3cret-pass"}})
    assert result.method == "direct"
    assert_disk(lun, images.expected["qcow2"])


def test_secret_extra_headers_stay_with_their_origin_plain_extra_headers_follow(serve, images, tmp_path, scratch):
    """secretExtraHeaders are credentials like basic auth; extraHeaders follow a redirect as CDI's do."""
    data = images.path("raw.xz").read_bytes()
    other = serve(lambda h: h.reply(200, data))
    origin = serve(lambda h: h.reply(302, headers={"Location": f"{other.url}/disk.xz"}))
    lun = block_target(tmp_path)
    run_import({"http": {"url": f"{origin.url}/disk", "extraHeaders": ["X-Other: yes"], "secretExtraHeaders": ["hdrs"]}},
               Target(str(lun), 16 * MiB), scratch, secrets={"hdrs": {"apikey": "X-Api-Key: k3y-value"}})
    assert_disk(lun, images.expected["raw.xz"])
    assert {h.get("X-Api-Key") for _, _, h in origin.seen} == {"k3y-value"}
    assert {h.get("X-Api-Key") for _, _, h in other.seen} == {None}
    assert {h.get("X-Other") for _, _, h in other.seen} == {"yes"}


# -- bounded reads ----------------------------------------------------------------------------------
HUGE = 256 * MiB  # what a hostile server would send; the importer must stop long before


def _registry(serve, blob: bytes, *, manifest: Callable[[Handler], None] | None = None, trailing: int = 0,
              token: Callable[[Handler], None] | None = None) -> tuple[Server, str]:
    """A registry with one image of one layer (`blob`, followed by `trailing` zero bytes the
    manifest does not count); `manifest` or `token` answer those requests instead."""
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    body = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digest,
                                   "size": len(blob)}]}).encode()

    def route(h: Handler) -> None:
        if h.path.startswith("/token"):
            return token(h)  # type: ignore[misc]
        if token is not None and h.headers.get("Authorization") != "Bearer t0ken-value":
            return h.reply(401, headers={"WWW-Authenticate": f'Bearer realm="{h.server.url}/token",service="r"'})
        if "/manifests/" in h.path:
            if manifest is not None:
                return manifest(h)
            return h.reply(200, body, {"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
        if h.path.endswith(digest):
            return h.endless(200, blob, len(blob) + trailing) if trailing else h.reply(200, blob)
        h.reply(404)

    server = serve(route)
    return server, f"docker://127.0.0.1:{server.server_address[1]}/repo:tag"


def _tar(name: str, data: bytes) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


@pytest.mark.parametrize("what", ["manifest", "token"])
def test_a_registry_document_that_never_ends_is_refused_after_4_mib(what, serve):
    endless = lambda h: h.endless(200, b'{"token": "', HUGE)  # noqa: E731
    server, url = _registry(serve, b"", **{what: endless})
    for call in ("info", "image_digest", "pin"):
        source = RegistrySource(url, insecure_http=True)
        sent = server.sent
        with pytest.raises(ImportFailed) as failed:
            getattr(source, call)()
        source.close()
        assert failed.value.reason == errors.INVALID_SOURCE and "more than 4096 KiB" in failed.value.message, call
        assert server.sent - sent < 32 * MiB, f"{call} read {server.sent - sent} bytes of an endless document"


def test_an_s3_error_body_that_never_ends_is_cut_to_its_first_64_kib(serve):
    server = serve(lambda h: h.endless(500, b"<Error><Code>SlowDown</Code>", HUGE))
    source = S3Source(f"{server.url}/bucket/disk.img", access_key=None, secret_key=None)
    with pytest.raises(ImportFailed) as failed:
        source.info()
    source.close()
    assert failed.value.reason == errors.TRANSFER_FAILED and "SlowDown" in failed.value.message
    assert server.sent < 32 * MiB


def _tar_with_huge_header(kind: bytes, size: int) -> bytes:
    """A tar whose first header is a GNU long name (L) or pax header (x) declaring `size` bytes
    (its first bytes follow; the server pads the rest with zeros)."""
    header = bytearray(512)
    header[:13] = b"././@LongLink"
    header[100:108] = b"0000644\0"
    header[124:136] = b"%011o\0" % size
    header[136:148] = b"00000000000\0"
    header[156:157] = kind
    header[257:265] = b"ustar  \0"
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


@pytest.mark.parametrize("kind", [b"L", b"x"], ids=["gnu-long-name", "pax"])
def test_a_tar_extended_header_over_1_mib_is_an_invalid_image_before_it_is_read(kind, serve, images, tmp_path,
                                                                                  scratch):
    """In an OVA (http) and in a registry layer: tarfile would read the whole header into memory."""
    head = _tar_with_huge_header(kind, 64 * MiB)
    server = serve(lambda h: h.endless(200, head, 64 * MiB + 512))
    lun = block_target(tmp_path)
    with pytest.raises(ImportFailed) as failed:
        run_import({"http": {"url": f"{server.url}/disk.ova"}}, Target(str(lun), 16 * MiB), scratch)
    assert failed.value.reason == errors.INVALID_IMAGE and "extended header" in failed.value.message
    assert server.sent < 32 * MiB
    layer = head + bytes(64 * MiB)
    registry, url = _registry(serve, layer)
    source = RegistrySource(url, insecure_http=True)
    with pytest.raises(ImportFailed) as failed:
        source.info()
    source.close()
    assert failed.value.reason == errors.INVALID_IMAGE and "extended header" in failed.value.message
    assert registry.sent < 32 * MiB
    assert_zero(lun)


# -- data that keeps coming ---------------------------------------------------------------------------
def test_a_layer_followed_by_endless_data_is_read_to_its_declared_size_then_fails(serve, images, tmp_path, scratch):
    """The disk's bytes (progress 100 %) and then zeros that never end: read to the size the
    manifest declares, one byte more is a mismatch, never a hash of the endless rest."""
    raw = images.path("raw").read_bytes()[:2 * MiB]
    server, url = _registry(serve, _tar("disk/disk.img", raw), trailing=HUGE)
    lun = block_target(tmp_path)
    with pytest.raises(ImportFailed) as failed:
        import_into(RegistrySource(url, insecure_http=True), Target(str(lun), 16 * MiB), progress=lambda p: None,
                    scratch_dir=scratch)
    assert failed.value.reason == errors.CHECKSUM_MISMATCH and "size its manifest declares" in failed.value.message
    assert server.sent < 64 * MiB
    assert_zero(lun)
    _, url = _registry(serve, _tar("disk/disk.img", raw))
    (tmp_path / "want.raw").write_bytes(raw)
    result = import_into(RegistrySource(url, insecure_http=True), Target(str(lun), 16 * MiB), progress=lambda p: None,
                         scratch_dir=scratch)
    assert result.format == "raw"
    assert_disk(lun, tmp_path / "want.raw", 16 * MiB)


def test_a_checksummed_source_that_never_ends_fails_at_the_size_bound(serve, images, tmp_path, scratch):
    """An OVA (a disk in a tar) with a checksum, followed by zeros that never end: the checksum's
    read of the rest stops at the import's bound (16 MiB volume: 82 MiB for a tar)."""
    ova = _tar("disk.img", images.path("raw").read_bytes()[:MiB])
    server = serve(lambda h: h.endless(200, ova, HUGE))
    lun = block_target(tmp_path)
    with pytest.raises(ImportFailed) as failed:
        run_import({"http": {"url": f"{server.url}/disk.ova", "checksum": "sha256:" + "0" * 64}},
                   Target(str(lun), 16 * MiB), scratch)
    assert failed.value.reason == errors.IMAGE_TOO_LARGE, failed.value
    assert server.sent < 128 * MiB
    assert_zero(lun)


# -- in-place reads that fail at the server ------------------------------------------------------------
@pytest.mark.parametrize("then", ["503", "stall"])
def test_an_in_place_read_the_server_fails_or_stalls_is_a_transfer_failure_not_an_invalid_image(then, serve, images,
                                                                                              tmp_path, scratch):
    """The server answers the first range GET (pvlun's Info) and HEAD, then 503s or goes silent on
    nbdkit's reads: TransferFailed or TransferStalled (retried), within the stall timeout."""
    data = images.path("qcow2").read_bytes()
    stop = threading.Event()

    def route(h: Handler) -> None:
        gets = [m for m, _, _ in h.server.seen if m == "GET"]
        if h.command == "HEAD" or len(gets) == 1:
            return h.ranged(data)
        if then == "503":
            return h.reply(503)
        stop.wait(30)

    server = serve(route)
    lun = block_target(tmp_path)
    started = time.monotonic()
    with transfer_watch.TransferWatch(stall=3), pytest.raises(ImportFailed) as failed:
        run_import({"http": {"url": f"{server.url}/disk.qcow2"}}, Target(str(lun), 16 * MiB), scratch)
    stop.set()
    want = errors.TRANSFER_FAILED if then == "503" else errors.TRANSFER_STALLED
    assert failed.value.reason == want, failed.value
    assert "reading" in failed.value.message and ("503" in failed.value.message or then == "stall")
    assert time.monotonic() - started < 20
    assert_zero(lun)


# -- header numbers and URLs ---------------------------------------------------------------------------
@pytest.mark.parametrize("header", ["Content-Length", "Content-Range"])
def test_a_header_number_in_other_digits_is_no_number(header, serve, images, tmp_path, scratch):
    """'²' is a digit to str.isdigit() and no number to int(): the size is unknown, the import goes on."""
    data = images.path("raw").read_bytes()

    def route(h: Handler) -> None:
        if header == "Content-Range" and h.headers.get("Range"):
            return h.reply(206, data[:65536], {"Content-Range": "bytes 0-65535/²", "Accept-Ranges": "bytes"})
        h.send_response(200)
        h.send_header("Content-Length", "²")
        h.send_header("Connection", "close")
        h.end_headers()
        h.close_connection = True
        h.write(data)

    server = serve(route)
    lun = block_target(tmp_path)
    run_import({"http": {"url": f"{server.url}/disk.img"}}, Target(str(lun), 16 * MiB), scratch)
    assert_disk(lun, images.expected["raw"])


def test_the_upload_server_answers_411_to_a_content_length_in_other_digits(upload):
    srv, _control = upload
    conn = http.client.HTTPSConnection(*srv.server_address[:2], context=ssl.create_default_context(cafile=srv.cert_file))
    conn.putrequest("PUT", "/v1beta1/upload")
    conn.putheader("Authorization", f"Bearer {issue_token(KEY, 'default/superscript')}")
    conn.putheader("Content-Length", "²")
    conn.endheaders()
    resp = conn.getresponse()
    body = resp.read().decode()
    conn.close()
    assert resp.status == 411 and "Content-Length required" in body


@pytest.mark.parametrize("source", [{"http": {"url": "http://[::1"}}, {"http": {"url": "http://u:p@127.0.0.1:99999/x"}},
                                    {"s3": {"url": "https://[::1/b/k"}}, {"registry": {"url": "docker://[::1/r"}}])
def test_a_url_python_cannot_parse_is_an_invalid_source_not_an_internal_error(source):
    with pytest.raises(ImportFailed) as failed:
        from_spec(source, secret=no_lookup, configmap=no_lookup)
    assert failed.value.reason == errors.INVALID_SOURCE and "not a valid URL" in failed.value.message


@pytest.mark.parametrize("line", ["X-A: b\rHost: evil", "X-A: b\nHost: evil", "X-A: b\0", "Bad Name: x", "no colon"])
def test_an_extra_header_with_a_control_character_or_no_token_name_is_an_invalid_source(line):
    with pytest.raises(ImportFailed) as failed:
        from_spec({"http": {"url": "http://127.0.0.1/x", "extraHeaders": [line]}}, secret=no_lookup, configmap=no_lookup)
    assert failed.value.reason == errors.INVALID_SOURCE and "extraHeaders" in failed.value.message


def _gnu_sparse_bomb(blocks: int) -> bytes:
    """An old-GNU sparse member ('S') whose map goes on for `blocks` extension blocks of 21
    entries each: tarfile collects them all before the member is seen."""
    info = tarfile.TarInfo("disk.img")
    info.type = tarfile.GNUTYPE_SPARSE
    header = bytearray(info.tobuf(format=tarfile.GNU_FORMAT))
    header[482] = 1  # isextended
    header[483:495] = b"%011o\0" % (1 << 30)  # realsize
    header[148:156] = b"        "
    header[148:156] = b"%06o\0 " % sum(header)
    entry = b"%011o\0%011o\0" % (512, 512)
    block = entry * 21 + b"\x01" + bytes(7)
    return bytes(header) + block * blocks


def test_a_gnu_sparse_map_that_never_ends_is_an_invalid_image_within_a_bounded_read(serve, tmp_path, scratch):
    """A sparse member's map of 6 MiB of extension blocks (a few KiB gzipped: a memory bomb for
    tarfile, which holds every entry): refused once the member's headers pass their bound."""
    body = _gnu_sparse_bomb(12 * 1024)
    server = serve(lambda h: h.endless(200, body, len(body)))
    lun = block_target(tmp_path)
    with pytest.raises(ImportFailed) as failed:
        run_import({"http": {"url": f"{server.url}/disk.ova"}}, Target(str(lun), 16 * MiB), scratch)
    assert failed.value.reason == errors.INVALID_IMAGE and "member headers" in failed.value.message
    assert_zero(lun)
