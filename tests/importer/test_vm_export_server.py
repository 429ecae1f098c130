"""The export server and the download client on their own (a regular file stands in for an
attached volume): Range edge cases, gzip, HEAD, a stopped server, certificate checks."""

from __future__ import annotations

import gzip
import http.client
import os
import ssl

import pytest

from importer.vm_export_client import DownloadFailed, download
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
    conn = http.client.HTTPSConnection("127.0.0.1", server.server_address[1], timeout=10,
                                       context=ssl.create_default_context(cadata=server.cert_pem))
    try:
        conn.request(method, path, headers={"x-kubevirt-export-token": TOKEN, **(headers or {})})
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
    with open(out + ".part", "wb") as f:
        f.write(data[:123_456])
    assert download(url, TOKEN, server.cert_pem, out) == len(data)
    assert open(out, "rb").read() == data and not os.path.exists(out + ".part")
    with open(out + ".part", "wb") as f:  # whole already: the server's 416 ends it
        f.write(data)
    assert download(url, TOKEN, server.cert_pem, out) == len(data) and open(out, "rb").read() == data
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
    with pytest.raises(DownloadFailed, match="not https"):
        download(url.replace("https", "http"), TOKEN, server.cert_pem, str(tmp_path / "z"))


def test_a_stopped_server_answers_nothing(served):
    server, _ = served
    server.stop()
    with pytest.raises(OSError):
        request(server, "/volumes/vol/disk.img")
