"""Import of a qcow2 (2100 MiB virtual, 512 MiB of random data) from nginx on loopback and
from a server without range requests (Python's http.server), each beside plain and `-W`
local `qemu-img convert` of the same file; allocated bytes of the result against the data.

`run()` returns rows (metric, value, note) for bench/__main__.py's table.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

MiB = 1 << 20
VIRTUAL = 2100 * MiB
DATA = 512 * MiB
PIECE = 8 * MiB


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen) -> None:
    for _ in range(400):
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} never opened")


def _make_image(work: str) -> str:
    """512 MiB of random data spread in 8 MiB pieces over 2100 MiB, as qcow2."""
    raw, qcow2 = os.path.join(work, "base.raw"), os.path.join(work, "disk.qcow2")
    pieces = DATA // PIECE
    stride = (VIRTUAL // PIECE) // pieces * PIECE
    with open(raw, "wb") as f:
        f.truncate(VIRTUAL)
        for i in range(pieces):
            f.seek(i * stride)
            f.write(os.urandom(PIECE))
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, qcow2], check=True)
    os.unlink(raw)
    return qcow2


def _timed(fn, repeat: int = 3) -> float:
    """Median of `repeat` runs, each starting with no dirty pages (os.sync) so that the
    writeback of one run does not slow the next."""
    times = []
    for _ in range(repeat):
        os.sync()
        start = time.monotonic()
        fn()
        times.append(time.monotonic() - start)
    return sorted(times)[len(times) // 2]


def _fresh(path: str, size: int = VIRTUAL) -> str:
    if os.path.exists(path):
        os.unlink(path)
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def _start_nginx(root: str, work: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    conf = os.path.join(work, "nginx.conf")
    with open(conf, "w") as f:
        f.write(f"""user root root; worker_processes 2; daemon off; pid {work}/nginx.pid; error_log {work}/error.log;
events {{ worker_connections 256; }}
http {{ access_log off; sendfile on; types {{ }} default_type application/octet-stream;
  client_body_temp_path {work}/b; proxy_temp_path {work}/p; fastcgi_temp_path {work}/f; uwsgi_temp_path {work}/u;
  scgi_temp_path {work}/s;
  server {{ listen 127.0.0.1:{port}; root {root}; }} }}
""")
    proc = subprocess.Popen(["nginx", "-c", conf, "-e", f"{work}/error.log"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_port(port, proc)
    return proc, f"http://127.0.0.1:{port}"


def _start_http_server(root: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory", root, str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_port(port, proc)
    return proc, f"http://127.0.0.1:{port}"


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


DV = """apiVersion: cdi.kubevirt.io/v1beta1
kind: DataVolume
metadata:
  name: bench-{n}
spec:
  source:
    http:
      url: {url}/disk.qcow2
  storage:
    volumeMode: Block
    resources:
      requests:
        storage: 2200Mi
"""


def _apply_rows(work: str, url: str, plain: float) -> list[tuple[str, str, str]]:
    """The issue's measure: the whole `pvlun apply --wait` of the DataVolume, through the
    daemon (claim, CSI volume, attach, import, detach), against a plain local convert."""
    data_dir = os.path.join(work, "pvlun")
    os.mkdir(data_dir)
    log = open(os.path.join(work, "serve.log"), "w")
    serve = subprocess.Popen([sys.executable, "-m", "pvlun.cli", "serve", "--data-dir", data_dir, "--pool-size", "16Gi"],
                             stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(os.path.join(data_dir, "serve.pid")):
            if serve.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("pvlun serve did not start")
            time.sleep(0.05)
        runs = iter(range(10))

        def apply() -> None:
            manifest = DV.format(n=next(runs), url=url)
            subprocess.run([sys.executable, "-m", "pvlun.cli", "apply", "-f", "-", "--wait", "--data-dir", data_dir],
                           input=manifest, text=True, check=True, capture_output=True)

        seconds = _timed(apply)
        from pvlun.store import SQLiteStore

        store = SQLiteStore(os.path.join(data_dir, "catalog.db"))
        pv = store.get("PersistentVolume", store.get("PersistentVolumeClaim", "bench-0", "default")["spec"]["volumeName"])
        lun = os.path.join(data_dir, "pool", "volumes", pv["spec"]["csi"]["volumeHandle"] + ".img")
        alloc = os.stat(lun).st_blocks * 512
        return [("pvlun apply --wait, qcow2 DataVolume from nginx", f"{seconds:.2f} s",
                 f"the whole command, Python start-up included; {seconds / plain:.2f}x plain local convert "
                 "(goal <= 1.0x)"),
                ("allocated/data of that volume", f"{alloc / DATA:.3f}x",
                 f"{alloc // MiB} MiB allocated in the LUN for {DATA // MiB} MiB of data (goal <= 1.05x)")]
    finally:
        serve.terminate()
        serve.wait(60)
        log.close()


def run() -> list[tuple[str, str, str]]:
    from importer.pipeline import Target, import_into
    from importer.sources import from_spec

    work = tempfile.mkdtemp(prefix="pvlun-bench-import-")
    rows: list[tuple[str, str, str]] = []
    procs: list[subprocess.Popen] = []
    try:
        serve = os.path.join(work, "www")
        os.mkdir(serve)
        qcow2 = _make_image(serve)
        out = os.path.join(work, "out.raw")
        plain = _timed(lambda: subprocess.run(["qemu-img", "convert", "-O", "raw", qcow2, _fresh(out, 0)], check=True))
        local_w = _timed(lambda: subprocess.run(["qemu-img", "convert", "-W", "-m", "16", "-O", "raw", qcow2,
                                                 _fresh(out, 0)], check=True))
        def convert_and_fsync():
            subprocess.run(["qemu-img", "convert", "-O", "raw", qcow2, _fresh(out, 0)], check=True)
            fd = os.open(out, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)

        plain_sync = _timed(convert_and_fsync)
        rows.append(("import qcow2: local qemu-img convert + fsync", f"{plain_sync:.2f} s", "what the importer does locally"))
        rows.append(("import qcow2: local qemu-img convert (plain)", f"{plain:.2f} s",
                     "2100 MiB virtual, 512 MiB data; median of 3; no fsync"))
        rows.append(("import qcow2: local qemu-img convert -W -m 16", f"{local_w:.2f} s", "same file, page-cached"))
        scratch = os.path.join(work, "scratch")
        os.mkdir(scratch)
        ng, ng_url = _start_nginx(serve, work)
        procs.append(ng)
        py, py_url = _start_http_server(serve)
        procs.append(py)
        for label, url, note in ((f"nginx (ranges)", ng_url, "nbdkit curl plugin -> qemu-img convert -W -m 16, no scratch, fsync included"),
                                 ("http.server (no ranges)", py_url, "download to scratch, then convert, fsync included")):
            lun = os.path.join(work, "lun.img")
            result = None

            def go():
                nonlocal result
                src = from_spec({"http": {"url": f"{url}/disk.qcow2"}}, secret=dict, configmap=dict)
                result = import_into(src, Target(_fresh(lun), VIRTUAL), progress=lambda p: None, scratch_dir=scratch)

            seconds = _timed(go)
            alloc = os.stat(lun).st_blocks * 512
            rows.append((f"import qcow2 from {label}", f"{seconds:.2f} s",
                         f"{note}; method={result.method}; {seconds / plain:.2f}x plain local convert (goal <= 1.0x), {seconds / plain_sync:.2f}x with fsync"))
            rows.append((f"allocated/data after import from {label}", f"{alloc / DATA:.3f}x",
                         f"{alloc // MiB} MiB allocated for {DATA // MiB} MiB of data (goal <= 1.05x)"))
        rows += _apply_rows(work, ng_url, plain)
    finally:
        for proc in procs:
            _stop(proc)
        shutil.rmtree(work, ignore_errors=True)
    return rows


if __name__ == "__main__":
    for row in run():
        print(" | ".join(row))
