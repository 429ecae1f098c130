"""Import of a qcow2 (2100 MiB virtual, 512 MiB of random data) from nginx on loopback and
from a server without range requests (Python's http.server), each beside plain and `-W`
local `qemu-img convert` of the same file, and the same HTTP convert with no pvlun at all
(nbdkit's curl plugin and qemu-img, the floor); allocated bytes of the result against the data.
Then, through one real `pvlun serve`, the whole `pvlun apply --wait` of DataVolumes of that
qcow2 from nginx and from a docker-registry (a containerDisk), and the whole
`pvlun image-upload` of it; each volume's bytes are checked against `qemu-img convert`.

`run()` returns rows (metric, value, note) for bench/__main__.py's table.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from bench.import_fixtures import REGISTRY_PASSWORD, REGISTRY_USER, PvlunServe, Registry, free_port, stop, wait_port

MiB = 1 << 20
VIRTUAL = 2100 * MiB
DATA = 512 * MiB
PIECE = 8 * MiB


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
    port = free_port()
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
    wait_port(port, proc)
    return proc, f"http://127.0.0.1:{port}"


def _start_http_server(root: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory", root, str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port, proc)
    return proc, f"http://127.0.0.1:{port}"


def _sha256(path: str, length: int) -> str:
    """Of the first `length` bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while length > 0 and (chunk := f.read(min(8 * MiB, length))):
            h.update(chunk)
            length -= len(chunk)
    return h.hexdigest()


def _dv(name: str, source: dict) -> str:
    """A DataVolume manifest (JSON is YAML) for a 2200Mi Block volume."""
    return json.dumps({"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume", "metadata": {"name": name},
                       "spec": {"source": source, "storage": {"volumeMode": "Block",
                                                              "resources": {"requests": {"storage": "2200Mi"}}}}})


def _durable_convert(qcow2: str, out: str) -> subprocess.CompletedProcess:
    """What a user would do by hand to fill a volume durably: O_DIRECT writes, out of order."""
    return subprocess.run(["qemu-img", "convert", "-W", "-t", "none", "-O", "raw", qcow2, _fresh(out, 0)], check=True)


def _bare_nbdkit(url: str, work: str, out: str) -> float:
    """The HTTP import's floor without pvlun: nbdkit's curl plugin (as the importer starts it,
    unsandboxed) and `qemu-img convert -W -t none -m 16` from it into a fresh file, durable."""
    sock = os.path.join(work, "bare-nbd.sock")

    def one() -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sock)
        nbd = subprocess.Popen(["nbdkit", "--foreground", "--readonly", "--threads", "16", "-U", sock, "curl",
                                f"url={url}", "protocols=http,https", "followlocation=false", "timeout=60"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while not os.path.exists(sock):
                if nbd.poll() is not None:
                    raise RuntimeError("nbdkit did not start")
                time.sleep(0.005)
            subprocess.run(["qemu-img", "convert", "-W", "-t", "none", "-m", "16", "-f", "qcow2", "-O", "raw",
                            f"nbd+unix:///?socket={sock}", _fresh(out, 0)], check=True)
        finally:
            stop(nbd)

    return _timed(one, repeat=5)


def _concurrent(serve: PvlunServe, work: str, nginx_url: str, qcow2: str, count: int = 8) -> list[tuple[str, str, str]]:
    """`count` imports applied at once against `count` local durable converts run at once: aggregate MB/s of data."""
    manifest = "\n---\n".join(_dv(f"crowd-{i}", {"http": {"url": f"{nginx_url}/disk.qcow2"}}) for i in range(count))
    os.sync()
    start = time.monotonic()
    serve.apply(manifest)
    imports = time.monotonic() - start
    outs = [os.path.join(work, f"crowd-{i}.raw") for i in range(count)]
    os.sync()
    start = time.monotonic()
    procs = [subprocess.Popen(["qemu-img", "convert", "-W", "-t", "none", "-O", "raw", qcow2, _fresh(out, 0)])
             for out in outs]
    if any(p.wait() for p in procs):
        raise RuntimeError("a local qemu-img convert failed")
    local = time.monotonic() - start
    for out in outs:
        os.unlink(out)
    rate = lambda seconds: count * DATA / seconds / 1e6  # noqa: E731
    return [(f"{count} concurrent imports (pvlun apply --wait of {count} DataVolumes)", f"{rate(imports):.0f} MB/s",
             f"{imports:.2f} s for {count} x {DATA // MiB} MiB of data from nginx; {rate(imports) / rate(local):.2f}x "
             f"the aggregate rate of {count} concurrent durable local converts ({rate(local):.0f} MB/s, {local:.2f} s)")]


def _apply_rows(stack: contextlib.ExitStack, work: str, nginx_url: str, qcow2: str, plain: float, durable: float,
                expected_sha: str) -> list[tuple[str, str, str]]:
    """The issue's measures through one daemon (claim, CSI volume, attach, import, detach):
    the whole `pvlun apply --wait` from nginx and from a registry, the whole
    `pvlun image-upload`; each against a plain local convert."""
    serve = stack.enter_context(PvlunServe(os.path.join(work, "pvlun")))
    registry = stack.enter_context(Registry(os.path.join(work, "registry")))
    reg_url = registry.push_container_disk(qcow2, "bench/disk")
    serve.cli("apply", "-f", "-", input="\n---\n".join(json.dumps(doc) for doc in (
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "bench-registry"},
         "stringData": {"accessKeyId": REGISTRY_USER, "secretKey": REGISTRY_PASSWORD}},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "bench-registry-ca"},
         "data": {"ca.pem": registry.pki.ca_pem}})))

    def timed_runs(prefix: str, one, repeat: int = 3) -> float:
        runs = iter(range(10))
        return _timed(lambda: one(f"{prefix}-{next(runs)}"), repeat)

    from_nginx = timed_runs("http", lambda name: serve.apply(_dv(name, {"http": {"url": f"{nginx_url}/disk.qcow2"}})),
                            repeat=5)
    from_registry = timed_runs("registry", lambda name: serve.apply(_dv(name, {"registry": {
        "url": reg_url, "secretRef": "bench-registry", "certConfigMap": "bench-registry-ca"}})))
    upload = timed_runs("upload", lambda name: serve.cli("image-upload", "--dv", name, "--image-path", qcow2,
                                                         "--size", "2200Mi", "--block-volume"))
    checked = ["http-0", "registry-0", "upload-0"]
    wrong = [name for name in checked if _sha256(serve.lun_path(name), VIRTUAL) != expected_sha]
    if wrong:
        raise RuntimeError(f"the first {VIRTUAL // MiB} MiB of {', '.join(wrong)} differ from qemu-img convert -O raw of the qcow2")
    alloc = os.stat(serve.lun_path("http-0")).st_blocks * 512
    serve.free([f"{prefix}-{i}" for prefix, runs in (("http", 5), ("registry", 3), ("upload", 3))
                for i in range(1, runs)])  # room in the pool for the concurrent imports
    ratio = lambda s: f"{s / plain:.2f}x plain local convert"  # noqa: E731
    size = os.path.getsize(qcow2) // MiB
    met = "met" if from_nginx <= 1.25 * durable else "NOT met"
    return [("pvlun apply --wait, qcow2 DataVolume from nginx", f"{from_nginx:.2f} s",
             f"the whole command, Python start-up included, median of 5; {from_nginx / durable:.2f}x the durable "
             f"local convert (-W -t none, {durable:.2f} s; target <= 1.25x: {met}); {ratio(from_nginx)}"),
            ("allocated/data of that volume", f"{alloc / DATA:.3f}x",
             f"{alloc // MiB} MiB allocated in the LUN for {DATA // MiB} MiB of data (goal <= 1.05x)"),
            ("pvlun apply --wait, qcow2 containerDisk from docker-registry", f"{from_registry:.2f} s",
             f"whole command; disk/disk.qcow2 ({size} MiB) in one uncompressed tar layer, docker-registry on loopback "
             f"over TLS (certConfigMap) with basic auth (secretRef); a qcow2 in a layer is a stream, so it goes to "
             f"scratch, then convert; {ratio(from_registry)}"),
            ("pvlun image-upload of the qcow2", f"{upload:.2f} s",
             f"whole command: creates the DataVolume (--size 2200Mi --block-volume), waits for UploadReady, HTTPS "
             f"upload of {size} MiB, convert, Succeeded; {ratio(upload)}"),
            ("volume bytes == qemu-img convert -O raw", f"{len(checked)}/{len(checked)} equal",
             f"sha256 of the first {VIRTUAL // MiB} MiB of the LUNs of {', '.join(checked)}"),
            *_concurrent(serve, work, nginx_url, qcow2)]


def run() -> list[tuple[str, str, str]]:
    from importer.pipeline import Target, import_into
    from importer.sources import from_spec

    rows: list[tuple[str, str, str]] = []
    with contextlib.ExitStack() as stack:  # on any failure: servers stopped, then the temp dir removed
        work = tempfile.mkdtemp(prefix="pvlun-bench-import-")
        stack.callback(shutil.rmtree, work, ignore_errors=True)
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
        durable = _timed(lambda: _durable_convert(qcow2, out), repeat=5)
        expected_sha = _sha256(out, VIRTUAL)  # out is now exactly `qemu-img convert -O raw` of the qcow2
        rows.append(("import qcow2: local qemu-img convert + fsync", f"{plain_sync:.2f} s", "what the importer does locally"))
        rows.append(("import qcow2: local qemu-img convert -W -t none (durable)", f"{durable:.2f} s",
                     "median of 5: the reference of the whole pvlun apply --wait"))
        rows.append(("import qcow2: local qemu-img convert (plain)", f"{plain:.2f} s",
                     "2100 MiB virtual, 512 MiB data; median of 3; no fsync"))
        rows.append(("import qcow2: local qemu-img convert -W -m 16", f"{local_w:.2f} s", "same file, page-cached"))
        scratch = os.path.join(work, "scratch")
        os.mkdir(scratch)
        ng, ng_url = _start_nginx(serve, work)
        stack.callback(stop, ng)
        py, py_url = _start_http_server(serve)
        stack.callback(stop, py)
        bare = _bare_nbdkit(f"{ng_url}/disk.qcow2", work, out)
        rows.append(("import qcow2: nbdkit curl -> qemu-img convert -W -t none, no pvlun", f"{bare:.2f} s",
                     f"from nginx, median of 5: {bare / durable:.2f}x the durable local convert; the floor of an "
                     f"HTTP import here (nbdkit 1.32's curl plugin reads one range at a time)"))
        for label, url, note in (("nginx (ranges)", ng_url, "nbdkit curl plugin -> qemu-img convert -W -m 16, no scratch, fsync included"),
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
        for path in (out, os.path.join(work, "lun.img")):  # 4 GiB of page cache and disk the daemon can use
            os.unlink(path)
        rows += _apply_rows(stack, work, ng_url, qcow2, plain, durable, expected_sha)
    return rows


if __name__ == "__main__":
    for row in run():
        print(" | ".join(row))
