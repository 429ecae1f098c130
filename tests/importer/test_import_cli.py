"""`pvlun import` on its own, as an importer pod runs it: the real command as a subprocess,
real servers on loopback, a real loop device, the pod's way of handing over credentials, and
the outcome in the termination log and the exit code."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

from importer.pods import importer_pod
from importer.upload_client import upload_image
from importer.upload_server import issue_token
from importer_support import MiB, assert_disk, assert_zero, block_target, qemu_img
from pvlun.local_run import DirectoryServer

ROOT = Path(__file__).resolve().parents[2]
SIZE = 16 * MiB


def command(source: dict | None, target: str | Path, tmp_path: Path, *extra: str) -> list[str]:
    argv = [sys.executable, "-m", "pvlun.cli", "import", "--target", str(target),
            "--scratch-dir", str(tmp_path / "scratch"), "--termination-log", str(tmp_path / "termination-log")]
    if source is not None:
        (tmp_path / "source.json").write_text(json.dumps(source))
        argv += ["--source-file", str(tmp_path / "source.json")]
    return argv + list(extra)


def pvlun_import(source: dict | None, target: str | Path, tmp_path: Path, *extra: str, env: dict | None = None,
                 prefix: tuple[str, ...] = ()) -> tuple[subprocess.CompletedProcess, dict]:
    """Run it to the end; (the process, the termination log's JSON)."""
    proc = subprocess.run([*prefix, *command(source, target, tmp_path, *extra)], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, **(env or {})}, timeout=120)
    return proc, json.loads((tmp_path / "termination-log").read_text())


@contextlib.contextmanager
def running(argv: list[str]) -> Iterator[subprocess.Popen]:
    """`pvlun import` started, stdout and stderr piped; killed if the test ends before it did."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def one_line_error(proc: subprocess.CompletedProcess, reason: str) -> None:
    """A failure a person can act on: exit 1, one line naming the reason, no traceback."""
    assert proc.returncode == 1, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {reason}: "), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def volume(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    return d / "disk.img"


@pytest.fixture
def loop_device(tmp_path):
    """A real block device (a loop device over a sparse file), detached afterwards."""
    backing = block_target(tmp_path, SIZE, "loop-backing.img")
    dev = subprocess.run(["losetup", "--find", "--show", str(backing)], check=True, capture_output=True,
                         text=True).stdout.strip()
    yield dev
    subprocess.run(["losetup", "--detach", dev], check=False)


class SlowServer(http.server.ThreadingHTTPServer):
    """Serves one file in small slow chunks (no ranges), so an import takes a few seconds;
    `stall_after` bytes, then silence."""

    daemon_threads = True

    def __init__(self, path: Path, *, delay: float = 0.04, stall_after: int | None = None):
        data = path.read_bytes()
        stop = threading.Event()

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a) -> None:
                pass

            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                for offset in range(0, len(data), 64 * 1024):
                    if stall_after is not None and offset >= stall_after:
                        stop.wait(30)
                        return
                    try:
                        self.wfile.write(data[offset:offset + 64 * 1024])
                    except OSError:
                        return
                    time.sleep(delay)

        super().__init__(("127.0.0.1", 0), Handler)
        self.stopping = stop
        self.url = f"http://127.0.0.1:{self.server_address[1]}/image"
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.stopping.set()
        self.shutdown()
        self.server_close()


@pytest.fixture
def slow_qcow2(images):
    srv = SlowServer(images.path("qcow2"))
    yield srv
    srv.stop()


# -- it works -----------------------------------------------------------------------------
def test_qcow2_over_http_into_disk_img_is_what_qemu_img_convert_gives(images, nginx, tmp_path):
    disk = volume(tmp_path)
    proc, result = pvlun_import({"http": {"url": f"{nginx.url}/img/qcow2.bin"}}, disk, tmp_path, "--size", "16Mi")
    assert proc.returncode == 0, proc.stderr
    assert result == {"phase": "Succeeded", "reason": "", "message": "Import Complete", "progress": "100.0%"}
    assert_disk(disk, images.expected["qcow2"], disk_size=15 * MiB)  # 16Mi less CDI's 5.5%, MiB-aligned
    assert os.stat(disk).st_mode & 0o777 == 0o660  # the fsGroup (KubeVirt's QEMU) may write it
    assert proc.stdout.splitlines()[-2] == "progress: 100.00%"
    assert proc.stdout.splitlines()[-1].startswith("import complete: qcow2")


def test_qcow2_into_a_loop_device_with_progress_on_the_metrics_while_it_runs(images, slow_qcow2, loop_device,
                                                                             tmp_path):
    argv = command({"http": {"url": slow_qcow2.url}}, loop_device, tmp_path, "--metrics-address", "127.0.0.1:0",
                   "--datavolume", "vms/fedora", "--owner-uid", "uid-123")
    with running(argv) as proc:
        first = proc.stdout.readline().strip()
        assert first.startswith("metrics: http://127.0.0.1:"), first
        url = first.split(" ", 1)[1]
        seen = []
        while proc.poll() is None:
            try:
                with urllib.request.urlopen(url, timeout=5) as resp:
                    text = resp.read().decode()
            except OSError:  # it ended (and its server with it) meanwhile
                continue
            cdi = [ln for ln in text.splitlines() if ln.startswith('kubevirt_cdi_import_progress_total{ownerUID="uid-123"}')]
            ours = [ln for ln in text.splitlines() if ln.startswith("pvlun_import_progress{")]
            if cdi and ours:
                seen.append((float(cdi[0].split()[-1]), ours[0]))
            time.sleep(0.1)
        out, err = proc.stdout.read(), proc.stderr.read()  # through the readline buffer (communicate would skip it)
    assert proc.returncode == 0, err
    assert any(0 < value < 100 for value, _ in seen), seen  # seen while it ran, not only at the end
    assert all('name="fedora"' in line and 'namespace="vms"' in line for _, line in seen)
    lines = [ln for ln in out.splitlines() if ln.startswith("progress: ")]
    assert lines[0] == "progress: 0.00%" and lines[-1] == "progress: 100.00%" and len(lines) > 3
    assert_disk(loop_device, images.expected["qcow2"])
    assert json.loads((tmp_path / "termination-log").read_text())["phase"] == "Succeeded"


def test_credentials_and_ca_come_as_the_pod_hands_them_over(images, nginx, pki, py_http, tmp_path):
    """secretRef: env IMPORTER_ACCESS_KEY_ID / IMPORTER_SECRET_KEY; certConfigMap: a mounted
    directory; secretExtraHeaders: mounted Secrets under DIR/<index> (kubelet's ..data layout)."""
    certs = tmp_path / "certs"
    certs.mkdir()
    (certs / "ca.pem").write_text(pki.ca_pem)
    lun = block_target(tmp_path, SIZE)
    source = {"http": {"url": f"{nginx.https_url}/auth/qcow2.bin", "secretRef": "creds", "certConfigMap": "ca"}}
    creds = {"IMPORTER_ACCESS_KEY_ID": "user", "IMPORTER_SECRET_KEY": "s3cret-pass"}
    proc, result = pvlun_import(source, lun, tmp_path, "--cert-dir", str(certs), env=creds)
    assert proc.returncode == 0, proc.stderr
    assert_disk(lun, images.expected["qcow2"], disk_size=SIZE)
    assert "s3cret-pass" not in proc.stdout + proc.stderr + json.dumps(result)

    proc, result = pvlun_import(source, block_target(tmp_path, SIZE, "other.img"), tmp_path, "--cert-dir", str(certs))
    one_line_error(proc, "InvalidSource")  # the pod would have the variables: without them, no secret
    assert result["reason"] == "InvalidSource" and "creds" in result["message"]

    headers = tmp_path / "extraheaders"
    data = headers / "0" / "..2025_01_01_00_00_00.0"
    data.mkdir(parents=True)
    (data / "token").write_text("X-Api-Key: k3y-value")
    os.symlink("..2025_01_01_00_00_00.0", headers / "0" / "..data")
    os.symlink("..data/token", headers / "0" / "token")
    lun = block_target(tmp_path, SIZE, "headers.img")
    source = {"http": {"url": f"{py_http.url}/hdr/raw.xz.bin", "extraHeaders": ["X-Other: yes"],
                       "secretExtraHeaders": ["api-key"]}}
    proc, result = pvlun_import(source, lun, tmp_path, "--extra-headers-dir", str(headers))
    assert proc.returncode == 0, proc.stderr
    assert_disk(lun, images.expected["raw"], disk_size=SIZE)
    assert "k3y-value" not in proc.stdout + proc.stderr


# -- it fails cleanly -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def hostile_server(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile")
    qemu_img("create", "-f", "qcow2", "-u", "-b", "/etc/hostname", "-F", "raw", str(d / "backing.qcow2"), "1M")
    (d / "garbage.bin").write_bytes(b"QFI\xfb" + os.urandom(4000))
    srv = DirectoryServer(str(d))
    yield srv
    srv.stop()


def test_a_qcow2_naming_a_backing_file_fails_and_leaves_no_disk(hostile_server, tmp_path):
    disk = volume(tmp_path)
    proc, result = pvlun_import({"http": {"url": f"{hostile_server.url}/backing.qcow2"}}, disk, tmp_path, "--size", "16Mi")
    one_line_error(proc, "BackingFileRefused")
    assert result["phase"] == "Failed" and result["reason"] == "BackingFileRefused"
    assert not os.path.lexists(disk)
    lun = block_target(tmp_path, SIZE)
    proc, result = pvlun_import({"http": {"url": f"{hostile_server.url}/backing.qcow2"}}, lun, tmp_path)
    one_line_error(proc, "BackingFileRefused")
    assert_zero(lun)


@pytest.mark.parametrize("source, target, reason", [
    ({"http": {"url": "{url}/missing.qcow2"}}, "lun", "NotFound"),
    ({"http": {"url": "{url}/garbage.bin"}}, "lun", "InvalidImage"),
    ({"http": {"url": "file:///etc/shadow"}}, "lun", "InvalidSource"),
    ({"http": {"url": "{url}/x", "certConfigMap": "ca"}}, "lun", "InvalidSource"),
    ({"pvc": {"name": "other"}}, "lun", "NotSupported"),
    ("not json {", "lun", "InvalidSource"),
    ({"http": {}, "s3": {}}, "lun", "InvalidSource"),
    ({"http": {"url": "{url}/backing.qcow2"}}, "dir", "InvalidTarget"),
    ({"http": {"url": "{url}/backing.qcow2"}}, "missing", "InvalidTarget"),
])
def test_failures_are_one_line_with_the_reason_in_the_termination_log(hostile_server, tmp_path, source, target, reason):
    targets = {"lun": block_target(tmp_path, SIZE), "dir": tmp_path, "missing": tmp_path / "nope" / "lun.img"}
    if isinstance(source, str):
        (tmp_path / "bad.json").write_text(source)
        argv = ["--source-file", str(tmp_path / "bad.json")]
        proc, result = pvlun_import(None, targets[target], tmp_path, *argv)
    else:
        source = json.loads(json.dumps(source).replace("{url}", hostile_server.url))
        proc, result = pvlun_import(source, targets[target], tmp_path)
    one_line_error(proc, reason)
    assert result["phase"] == "Failed" and result["reason"] == reason and "\n" not in result["message"]
    if target == "lun":
        assert_zero(targets["lun"])


def test_sigterm_cancels_and_the_device_reads_as_zeros_again(slow_qcow2, tmp_path):
    lun = block_target(tmp_path, SIZE)
    with running(command({"http": {"url": slow_qcow2.url}}, lun, tmp_path)) as proc:
        while not proc.stdout.readline().startswith("progress: ") or not proc.stdout.readline().startswith("progress: "):
            pass  # two progress lines: it is under way
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "error: ImportCancelled: " in err
    assert json.loads((tmp_path / "termination-log").read_text())["reason"] == "ImportCancelled"
    assert_zero(lun)


def test_a_source_that_goes_silent_ends_the_attempt_as_stalled(images, tmp_path):
    srv = SlowServer(images.path("raw"), stall_after=256 * 1024)
    try:
        lun = block_target(tmp_path, SIZE)
        proc, result = pvlun_import({"http": {"url": srv.url}}, lun, tmp_path, "--stall-timeout", "1")
    finally:
        srv.stop()
    one_line_error(proc, "TransferStalled")
    assert result["reason"] == "TransferStalled"
    assert_zero(lun)


def test_a_restarted_attempt_clears_what_the_killed_one_wrote(images, nginx, tmp_path):
    """The container was killed mid-write (nothing could clean up) and kubelet restarted it: the
    scratch emptyDir still holds the attempt marker, so the device is zeroed before the import,
    and the bytes the image does not cover read as zeros."""
    lun = block_target(tmp_path, SIZE)
    lun.write_bytes(os.urandom(SIZE))
    (tmp_path / "scratch").mkdir()
    (tmp_path / "scratch" / ".pvlun-import-attempt").touch()
    proc, _ = pvlun_import({"http": {"url": f"{nginx.url}/img/qcow2.bin"}}, lun, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert_disk(lun, images.expected["qcow2"], disk_size=SIZE)


# -- the upload pod's command -------------------------------------------------------------------
def test_upload_mode_takes_one_upload_for_its_datavolume_then_ends(images, tmp_path):
    secret_dir = tmp_path / "upload-secret"
    secret_dir.mkdir()
    key = os.urandom(32)
    (secret_dir / "token.key").write_bytes(key)
    lun = block_target(tmp_path, SIZE)
    argv = command(None, lun, tmp_path, "--upload-address", "127.0.0.1:0", "--upload-secret-dir", str(secret_dir),
                   "--datavolume", "vms/up")
    with running(argv) as proc:
        line = proc.stdout.readline()
        while not line.startswith("upload server: "):
            assert line, proc.stderr.read()
            line = proc.stdout.readline()
        url = line.split(": ", 1)[1].strip()
        ca = str(secret_dir / "tls.crt")
        from importer.errors import ImportFailed

        with pytest.raises(ImportFailed, match="no DataVolume waiting"):  # a token for another DataVolume
            upload_image(url, issue_token(key, "vms/other"), str(images.path("qcow2")), ca_file=ca)
        with pytest.raises(ImportFailed, match="refused the token"):
            upload_image(url, issue_token(os.urandom(32), "vms/up"), str(images.path("qcow2")), ca_file=ca)
        assert proc.poll() is None  # still waiting for the real one
        upload_image(url, issue_token(key, "vms/up"), str(images.path("qcow2")), ca_file=ca)
        _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert json.loads((tmp_path / "termination-log").read_text())["phase"] == "Succeeded"
    assert_disk(lun, images.expected["qcow2"], disk_size=SIZE)


# -- with exactly the privileges the pod spec grants -------------------------------------------
@pytest.mark.parametrize("mode", ["Filesystem", "Block"])
def test_it_works_with_only_the_capabilities_the_pod_grants(mode, images, nginx, loop_device, tmp_path):
    dv = {"metadata": {"name": "x", "namespace": "vms", "uid": "u"},
          "spec": {"source": {"http": {"url": "https://example.org/x"}},
                   "pvc": {"volumeMode": mode, "resources": {"requests": {"storage": "16Mi"}}}}}
    pvc = {"metadata": {"name": "x", "namespace": "vms", "uid": "p"},
           "spec": {"volumeMode": mode, "resources": {"requests": {"storage": "16Mi"}}}}
    context = importer_pod(dv, pvc, "img")["spec"]["containers"][0]["securityContext"]
    assert context["capabilities"]["drop"] == ["ALL"]
    caps = ",".join(f"+{c.lower()}" for c in context["capabilities"]["add"])
    target = volume(tmp_path) if mode == "Filesystem" else loop_device
    for url in (f"{nginx.url}/img/qcow2.bin", f"{nginx.url}/img/vmdk.bin"):  # read in place (nbdkit); via scratch
        prefix = ("setpriv", f"--bounding-set=-all,{caps}", "--inh-caps=-all", "--")
        proc, result = pvlun_import({"http": {"url": url}}, target, tmp_path, "--size", "16Mi", prefix=prefix)
        assert proc.returncode == 0, proc.stderr
        kind = url.rsplit("/", 1)[1].split(".")[0]
        assert_disk(target, images.expected[kind])
    proc, _ = pvlun_import({"http": {"url": f"{nginx.url}/img/qcow2.bin"}}, target, tmp_path, "--size", "16Mi",
                           prefix=("setpriv", f"--bounding-set=-all,{caps.replace('+sys_admin', '-sys_admin')}",
                                   "--inh-caps=-all", "--"))
    one_line_error(proc, "TransferFailed")  # without SYS_ADMIN there is no sandbox, and nothing runs unsandboxed
    assert "bwrap: Creating new namespace failed" in proc.stderr
