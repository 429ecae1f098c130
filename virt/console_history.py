"""A VM's serial console history, kept across its runs, restarts and migrations.

Each QEMU writes the console to its own run directory (one per node), so a migration or a
restart would split the story. The launcher that currently owns the console appends what its
QEMU printed to one file per VM, `DATA_DIR/vms/NS/NAME/console.log`; a migration target
takes over only after the source's last bytes are in, so the order holds. The file keeps
the last `limit` bytes (cut at a line start), so a chatty guest cannot fill the data dir.

A QEMU's own serial log stays small too: QEMU appends to it, so once ROTATE_AT bytes of it
are in the history the follower cuts it back to nothing and QEMU writes on at its new end
(what the guest writes in the instant between the follower's last read and the cut is lost:
only a guest flooding its console comes that far). How far the history has the log is kept
beside it (`serial.offset`), so the follower of a daemon that crashed is succeeded by one that
goes on from there — bytes are never lost to a crash, at most a moment of them repeated.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from host.sandbox import open_no_follow

DEFAULT_LIMIT = 4 << 20
HISTORY_FILE = "console.log"
SERIAL_LOG = "serial.log"
OFFSET_FILE = "serial.offset"
ROTATE_AT = 1 << 20


class ConsoleHistory:
    """Append-only (then trimmed) console bytes of one VM; shared by its launchers."""

    def __init__(self, path: str | os.PathLike, limit: int = DEFAULT_LIMIT):
        self.path = Path(path)
        self.limit = limit
        self._lock = threading.Lock()

    def append(self, data: bytes) -> None:
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "ab") as f:
                f.write(data)
                size = f.tell()
            if size > self.limit + self.limit // 4:  # trim in steps, not on every append
                self._trim(size)

    def _trim(self, size: int) -> None:
        """Keep the last `limit` bytes from a line start; replaced atomically for readers."""
        with open(self.path, "rb") as f:
            f.seek(size - self.limit)
            tail = f.read()
        cut = tail.find(b"\n")
        tail = tail[cut + 1:] if 0 <= cut < len(tail) - 1 else tail
        partial = self.path.with_name(self.path.name + ".part")
        partial.write_bytes(tail)
        partial.replace(self.path)

    def read(self) -> bytes:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return b""


def history_file(data_dir: str, namespace: str, name: str) -> Path:
    """Where the VM's console history lives (beside its per-node run directories)."""
    return Path(data_dir, "vms", namespace, name, HISTORY_FILE)


class ConsoleFollower:
    """Copies what one QEMU's serial log (in `run_dir`) gains into the VM's history, once
    started: the launcher starts it when its QEMU owns the console. It goes on from where the
    last follower of this run directory stopped (its `serial.offset`); without one, from the
    log's end."""

    def __init__(self, history: ConsoleHistory, run_dir: str | os.PathLike):
        self.history = history
        self.run_dir = Path(run_dir)
        self.serial_log = str(self.run_dir / SERIAL_LOG)
        self._saved = _read_offset(self.run_dir)
        self.offset = self._saved if self._saved is not None else _size(self.serial_log)
        self.started = False
        self._lock = threading.Lock()

    def start(self, done: threading.Event, name: str) -> None:
        """Copy every 0.2 s until `done` is set (the final copy is the caller's, after exit)."""
        if self.started:
            return
        self.started = True
        self.history.append(b"")  # `pvlun logs` of a VM that runs: what there is, even nothing yet
        self._save()  # where the history stands, for the follower after a crash (before any copy)

        def follow() -> None:
            while not done.wait(0.2):
                self.copy()

        threading.Thread(target=follow, name=f"console-{name}", daemon=True).start()

    def copy(self) -> None:
        """Everything new in the serial log into the history; the log cut back once it is big."""
        with self._lock:
            if not self.started:
                return
            try:
                fd = open_no_follow(self.serial_log, os.O_RDWR)
            except OSError:
                return
            try:
                if os.fstat(fd).st_size < self.offset:
                    self.offset = 0  # cut back by another follower of this run dir
                while data := os.pread(fd, self.history.limit, self.offset):
                    self.history.append(data)
                    self.offset += len(data)
                if self.offset >= ROTATE_AT:
                    os.ftruncate(fd, 0)
                    self.offset = 0
            finally:
                os.close(fd)
            self._save()

    def _save(self) -> None:
        if self.offset == self._saved and self._saved is not None:
            return
        partial = self.run_dir / (OFFSET_FILE + ".part")
        fd = open_no_follow(str(partial), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            os.write(fd, str(self.offset).encode())
        finally:
            os.close(fd)
        os.replace(partial, self.run_dir / OFFSET_FILE)
        self._saved = self.offset


def catch_up(history: ConsoleHistory, run_dir: str | os.PathLike) -> None:
    """Copy what a QEMU of a crashed daemon wrote after that daemon's last copy (its QEMU is
    gone by now: start-up repair stopped it)."""
    if _read_offset(Path(run_dir)) is not None:
        follower = ConsoleFollower(history, run_dir)
        follower.started = True
        follower.copy()


def _read_offset(run_dir: Path) -> int | None:
    try:
        fd = open_no_follow(str(run_dir / OFFSET_FILE))
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        text = f.read(32).decode(errors="replace").strip()
    return int(text) if text.isdigit() else None


def _size(path: str) -> int:
    try:
        return os.lstat(path).st_size
    except OSError:
        return 0
