"""`pvlun serve` as a child process, and a directory served over plain HTTP on loopback:
what the quickstart, the benchmarks and the end-to-end tests all need, in one place."""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from csi.pool import is_mountpoint
from controlplane import serve_record
from host.command import run


def start_daemon(data_dir: str, *extra: str, pool_size: str = "8Gi", timeout: float = 60,
                 prefix: Sequence[str] = (), log_name: str = "serve.log") -> subprocess.Popen:
    """Start `pvlun serve` on data_dir (log in data_dir/`log_name`), behind `prefix` (a host's,
    host/netns.py); return once it serves."""
    log = open(os.path.join(data_dir, log_name), "w")
    proc = subprocess.Popen([*prefix, sys.executable, "-m", "pvlun.cli", "serve", "--data-dir", data_dir,
                             "--pool-size", pool_size, *extra], stdout=log, stderr=subprocess.STDOUT)
    log.close()
    mode = extra[extra.index("--mode") + 1] if "--mode" in extra else "all"
    node_id = extra[extra.index("--node-id") + 1] if "--node-id" in extra else socket.gethostname()
    pid_file = os.path.join(data_dir, serve_record.file_name(serve_record.role(mode, node_id), ".pid"))
    deadline = time.monotonic() + timeout
    while not os.path.exists(pid_file):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_daemon(proc, data_dir)
            with open(os.path.join(data_dir, log_name)) as f:
                raise RuntimeError(f"pvlun serve did not start:\n{f.read()[-4000:]}")
        time.sleep(0.05)
    return proc


def stop_daemon(proc: subprocess.Popen, data_dir: str, timeout: float = 60, owns_pool: bool = True) -> int | None:
    """SIGTERM, then SIGKILL; a pool the daemon could not unmount is detached lazily (unless
    the daemon is a node plugin: the pool is its controller's)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    pool = os.path.join(data_dir, "pool")
    if owns_pool and os.path.isdir(pool) and is_mountpoint(pool):
        subprocess.run(["umount", "-l", pool], check=False)
    return proc.returncode


class DirectoryServer(http.server.ThreadingHTTPServer):
    """Python's plain HTTP server (no range requests) on 127.0.0.1, in a thread; `.url`."""

    daemon_threads = True

    def __init__(self, directory: str):
        class Quiet(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *a, **kw):
                super().__init__(*a, directory=directory, **kw)

            def log_message(self, *a) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Quiet)
        self.root = directory
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


@contextmanager
def small_ext4(image: str, size: int) -> Iterator[str]:
    """A small real ext4 filesystem, loop-mounted: a host whose disk fills in seconds (tests
    of a pool on a host without room). Unmounted (lazily, if something still holds it) and
    deleted on leaving."""
    mount_point = image + ".mnt"
    with open(image, "wb") as f:
        f.truncate(size)
    try:
        run(["mkfs.ext4", "-q", image], timeout=120)
        os.mkdir(mount_point)
        run(["mount", "-o", "loop", image, mount_point], timeout=60)
        yield mount_point
    finally:
        if os.path.isdir(mount_point) and is_mountpoint(mount_point):
            if run(["umount", mount_point], check=False, timeout=60).returncode != 0:
                run(["umount", "--lazy", mount_point], check=False, timeout=60)
        if os.path.isdir(mount_point) and not is_mountpoint(mount_point):
            os.rmdir(mount_point)
        os.unlink(image)


@contextmanager
def small_xfs_pool(image: str, size: int) -> Iterator[str]:
    """A small real XFS filesystem with reflinks, loop-mounted: a pool for `pvlun serve
    --pool` that fills in seconds (tests of what happens when a pool is full). mkfs.xfs
    refuses filesystems under 300 MB unless it is told it runs under fstests (its
    TEST_DIR/TEST_DEV/QA_CHECK_FS variables). Unmounted and deleted on leaving; a pool
    something still holds is detached lazily and reported."""
    mount_point = image + ".mnt"
    with open(image, "wb") as f:
        f.truncate(size)
    busy = None
    try:
        run(["env", f"TEST_DIR={os.path.dirname(image)}", f"TEST_DEV={image}", "QA_CHECK_FS=1",
             "mkfs.xfs", "-q", "-m", "reflink=1", image], timeout=120)
        os.mkdir(mount_point)
        run(["mount", "-o", "loop", image, mount_point], timeout=60)
        yield mount_point
    finally:
        if os.path.isdir(mount_point) and is_mountpoint(mount_point):
            busy = run(["umount", mount_point], check=False, timeout=60).stderr.decode(errors="replace") or None
            if busy:
                run(["umount", "--lazy", mount_point], check=False, timeout=60)
        if os.path.isdir(mount_point) and not busy:
            os.rmdir(mount_point)
        os.unlink(image)
    if busy:
        raise RuntimeError(f"the pool at {mount_point} was still in use: {busy}")
