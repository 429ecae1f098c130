"""The export server and the download client on their own (a regular file stands in for an
attached volume): Range edge cases, gzip, HEAD, a stopped server, certificate checks, resuming
only a part of the same export (ETag and If-Range), links refused, connections bounded."""

from __future__ import annotations

import gzip
import http.client
import logging
import os
import socket
import ssl
import threading
import time

import pytest

from host.sandbox import sandbox_ids
from importer import errors
from importer.vm_export_client import DownloadFailed, download, raw_to_qcow2
from importer.vm_export_server import ExportedVolume, ExportServer

TOKEN = "s3cret-token-0123456789"


@pytest.fixture
def served(tmp_path):
    disk = tmp_path / "disk"
    data = os.urandom(300_000) + bytes(200_000) + b"END"
    disk.write_bytes(data)
    server = ExportServer([ExportedVolume("vol", str(disk))], TOKEN).start()
    yield server, data
    server.stop()


def request(server: ExportServer, path: str, headers: dict | None = None, method: str = "GET"):
    """With the token header, unless `headers` is {} (the token then is in the URL's query)."""
    conn = http.client.HTTPSConnection("127.0.0.1", server.server_address[1], timeout=10,
                                       context=ssl.create_default_context(cadata=server.cert_pem))
    try:
        conn.request(method, path, headers={"x-kubevirt-export-token": TOKEN, **(headers or {})}
                     if headers != {} else {})
        resp = conn.getresponse()
        return resp.status, resp.read(), resp
    finally:
        conn.close()


@pytest.mark.parametrize("asked, want", [("bytes=0-9", slice(0, 10)), ("bytes=-3", slice(-3, None)),
                                         ("bytes=499990-", slice(499990, None)),
                                         ("bytes=10-99999999", slice(10, None))])
def test_ranges_are_served_as_asked(served, asked, want):
    server, data = served
    code, body, resp = request(server, "/volumes/vol/disk.img", {"Range": asked})
    assert code == 206 and body == data[want]
    assert resp.getheader("Content-Range").endswith(f"/{len(data)}")


@pytest.mark.parametrize("asked", ["bytes=999999-", "bytes=5-2", "bytes=-", "items=0-1", "bytes=0-1,4-5"])
def test_a_range_that_cannot_be_served_is_416(served, asked):
    server, data = served
    code, body, resp = request(server, "/volumes/vol/disk.img", {"Range": asked})
    assert code == 416 and body == b"" and resp.getheader("Content-Range") == f"bytes */{len(data)}"


def test_gzip_and_head(served):
    server, data = served
    code, body, _ = request(server, "/volumes/vol/disk.img.gz")
    assert code == 200 and gzip.decompress(body) == data
    code, body, resp = request(server, "/volumes/vol/disk.img", method="HEAD")
    assert code == 200 and body == b"" and resp.getheader("Content-Length") == str(len(data))
    assert request(server, "/exportready", {"x-kubevirt-export-token": ""})[0] == 200  # a probe needs no token


def test_the_client_resumes_and_checks_the_certificate(served, tmp_path):
    server, data = served
    url = f"{server.url}/volumes/vol/disk.img"
    out = str(tmp_path / "out")
    etag = request(server, "/volumes/vol/disk.img", method="HEAD")[2].getheader("ETag")
    seen: list[int] = []
    for part in (data[:123_456], data):  # cut off midway; whole already (the server's 416 ends it)
        with open(out + ".part", "wb") as f:
            f.write(part)
        with open(out + ".part.etag", "w") as f:
            f.write(etag)
        seen.clear()
        assert download(url, TOKEN, server.cert_pem, out, progress=lambda done, total: seen.append(done)) == len(data)
        assert open(out, "rb").read() == data and not os.path.exists(out + ".part")
        assert not os.path.exists(out + ".part.etag") and (not seen or seen[0] > 123_456)  # resumed, not again
    other = ExportServer([ExportedVolume("vol", str(tmp_path / "out"))], TOKEN)
    try:
        with pytest.raises(DownloadFailed, match="certificate does not verify"):
            download(url, TOKEN, other.cert_pem, str(tmp_path / "x"))
    finally:
        other.server_close()
    download(url, TOKEN, "", str(tmp_path / "insecure"), insecure=True)
    assert open(tmp_path / "insecure", "rb").read() == data
    with pytest.raises(DownloadFailed, match="401"):
        download(url, "wrong", server.cert_pem, str(tmp_path / "y"))
    assert not os.path.lexists(tmp_path / "y.part")  # refused before a byte: no empty part left behind
    with pytest.raises(DownloadFailed, match="not https"):
        download(url.replace("https", "http"), TOKEN, server.cert_pem, str(tmp_path / "z"))


def test_a_stopped_server_answers_nothing(served):
    server, _ = served
    server.stop()
    with pytest.raises(OSError):
        request(server, "/volumes/vol/disk.img")


def test_range_offsets_of_thousands_of_digits_are_416(served):
    server, data = served
    for asked in (f"bytes={'9' * 5000}-", f"bytes=0-{'9' * 5000}", f"bytes=-{'9' * 20}"):
        code, body, resp = request(server, "/volumes/vol/disk.img", {"Range": asked})
        assert code == 416 and resp.getheader("Content-Range") == f"bytes */{len(data)}"
    assert request(server, "/volumes/vol/disk.img", {"Range": "bytes=0-9"})[1] == data[:10]  # served still


def test_the_etag_names_the_export_and_if_range_with_another_sends_it_all(served, tmp_path):
    server, data = served
    etag = request(server, "/volumes/vol/disk.img", method="HEAD")[2].getheader("ETag")
    assert etag.startswith('"') and etag == ExportServer([ExportedVolume("vol", "x")], TOKEN,
                                                         export_uid=server.export_uid).etag(server.volumes["vol"], len(data))
    other = ExportServer([ExportedVolume("vol", "x")], TOKEN, export_uid="another-export")
    other.server_close()
    assert other.etag(server.volumes["vol"], len(data)) != etag
    code, body, _ = request(server, "/volumes/vol/disk.img", {"Range": "bytes=10-", "If-Range": etag})
    assert code == 206 and body == data[10:]
    code, body, _ = request(server, "/volumes/vol/disk.img", {"Range": "bytes=10-", "If-Range": '"stale"'})
    assert code == 200 and body == data


@pytest.mark.parametrize("stale, etag", [
    ("longer", "ours"),     # the server's 416 says another size: not this volume's part
    ("longer", "other"),    # an earlier export's part, longer than this volume
    ("shorter", "other"),   # an earlier export's part, shorter: nothing appended to it
    ("shorter", None),      # a part whose ETag is lost
])
def test_a_stale_part_is_never_resumed_into_the_wrong_disk(served, tmp_path, stale, etag):
    server, data = served
    out = str(tmp_path / "out")
    with open(out + ".part", "wb") as f:
        f.write(os.urandom(len(data) + 4096) if stale == "longer" else os.urandom(200_000))
    if etag is not None:
        ours = request(server, "/volumes/vol/disk.img", method="HEAD")[2].getheader("ETag")
        with open(out + ".part.etag", "w") as f:
            f.write(ours if etag == "ours" else '"an-earlier-export"')
    assert download(f"{server.url}/volumes/vol/disk.img", TOKEN, server.cert_pem, out) == len(data)
    assert open(out, "rb").read() == data


def test_a_download_cut_off_resumes_where_it_stopped(tmp_path):
    disk = tmp_path / "disk"
    data = os.urandom(5 << 20)
    disk.write_bytes(data)
    server = ExportServer([ExportedVolume("vol", str(disk))], TOKEN).start()
    out, seen = str(tmp_path / "out"), []

    def cut(done, total):
        seen.append(done)
        if done >= 2 << 20 and len(seen) < 10:
            raise KeyboardInterrupt

    try:
        with pytest.raises(KeyboardInterrupt):
            download(f"{server.url}/volumes/vol/disk.img", TOKEN, server.cert_pem, out, progress=cut)
        seen.clear()
        seen.extend([0] * 10)  # no more cuts
        download(f"{server.url}/volumes/vol/disk.img", TOKEN, server.cert_pem, out, progress=cut)
    finally:
        server.stop()
    assert open(out, "rb").read() == data and seen[10] > 2 << 20


@pytest.mark.parametrize("what", ["part", "etag"])
def test_the_download_never_writes_through_a_link(served, tmp_path, what):
    server, data = served
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    out = str(tmp_path / "out")
    if what == "etag":
        open(out + ".part", "wb").close()
    os.symlink(victim, out + ".part" + (".etag" if what == "etag" else ""))
    with pytest.raises(DownloadFailed, match="symbolic link"):
        download(f"{server.url}/volumes/vol/disk.img", TOKEN, server.cert_pem, out)
    assert victim.read_bytes() == b"precious"


def test_qcow2_conversion_hands_no_linked_file_to_the_sandbox_user(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    os.chown(victim, 0, 0)
    os.symlink(victim, tmp_path / "out.raw")  # put in place of the finished raw download
    with pytest.raises(DownloadFailed, match="symbolic link"):
        raw_to_qcow2(str(tmp_path / "out.raw"), str(tmp_path / "out.qcow2"))
    st = os.stat(victim)
    assert (st.st_uid, st.st_gid) == (0, 0) and sandbox_ids()[0] != 0
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".pvlun-vmexport-")]


class _Small(ExportServer):
    max_connections = 4
    head_seconds = 1.5


def _connect(server) -> socket.socket:
    sock = socket.create_connection(server.server_address[:2], timeout=5)
    return sock


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        return sock.recv(1) == b""
    except socket.timeout:
        return False
    except OSError:
        return True


def test_connections_are_bounded_and_idle_or_trickling_ones_cut_off(tmp_path):
    disk = tmp_path / "disk"
    disk.write_bytes(b"x" * 4096)
    server = _Small([ExportedVolume("vol", str(disk))], TOKEN).start()
    threads = threading.active_count()
    try:
        idle = [_connect(server) for _ in range(3)]
        trickler = _connect(server)
        extra = _connect(server)  # the fifth: closed at once, no thread for it
        assert _closed_within(extra, 1.0) and threading.active_count() <= threads + 4
        started = time.monotonic()
        for _ in range(10):  # a byte now and then keeps no connection past the deadline
            try:
                trickler.send(b"\x16")
            except OSError:
                break
            time.sleep(0.3)
        assert all(_closed_within(s, 3.0) for s in (*idle, trickler)) and time.monotonic() - started < 5
        code, body, _ = request(server, "/volumes/vol/disk.img")  # served again
        assert code == 200 and body == b"x" * 4096
    finally:
        for s in (*idle, trickler, extra):
            s.close()
        server.stop()


def test_stop_ends_a_download_whose_client_stopped_reading(tmp_path):
    disk = tmp_path / "disk"
    with open(disk, "wb") as f:
        f.truncate(256 << 20)  # sparse: far more than socket buffers hold
    server = ExportServer([ExportedVolume("vol", str(disk))], TOKEN).start()
    conn = http.client.HTTPSConnection("127.0.0.1", server.server_address[1], timeout=10,
                                       context=ssl.create_default_context(cadata=server.cert_pem))
    try:
        conn.request("GET", "/volumes/vol/disk.img", headers={"x-kubevirt-export-token": TOKEN})
        resp = conn.getresponse()
        resp.read(1000)  # and no more
        deadline = time.monotonic() + 5
        while server._open == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1)  # the server's write blocks once the socket buffers are full
        started = time.monotonic()
        server.stop(wait=10)
        assert time.monotonic() - started < 3 and server._open == 0
    finally:
        conn.close()


def test_the_export_token_is_never_logged(served, caplog):
    server, _ = served
    assert errors.scrub("GET /v/disk.img?x-kubevirt-export-token=abcdefgh123 HTTP/1.1") == \
        "GET /v/disk.img?x-kubevirt-export-token=*** HTTP/1.1"
    assert TOKEN not in errors.scrub(f"import from https://h/v?a=1 failed: token {TOKEN} refused")
    with caplog.at_level(logging.DEBUG, logger="pvlun.vmexport"):
        assert request(server, f"/volumes/vol/disk.img?x-kubevirt-export-token={TOKEN}",
                       {}, method="HEAD")[0] == 200
    assert "disk.img" in caplog.text and TOKEN not in caplog.text
