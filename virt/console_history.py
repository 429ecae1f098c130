"""A VM's serial console history, kept across its runs, restarts and migrations.

Each QEMU writes the console to its own run directory (one per node), so a migration or a
restart would split the story. The launcher that currently owns the console appends what its
QEMU printed to one file per VM, `DATA_DIR/vms/NS/NAME/console.log`; a migration target
takes over only after the source's last bytes are in, so the order holds. The file keeps
the last `limit` bytes (cut at a line start), so a chatty guest cannot fill the data dir.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

DEFAULT_LIMIT = 4 << 20
HISTORY_FILE = "console.log"


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
    """Copies what one QEMU's serial log gains (from `offset`) into the VM's history, once
    started: the launcher starts it when its QEMU owns the console."""

    def __init__(self, history: ConsoleHistory, serial_log: str, offset: int):
        self.history = history
        self.serial_log = serial_log
        self.offset = offset
        self.started = False
        self._lock = threading.Lock()

    def start(self, done: threading.Event, name: str) -> None:
        """Copy every 0.2 s until `done` is set (the final copy is the caller's, after exit)."""
        if self.started:
            return
        self.started = True
        self.history.append(b"")  # `pvlun logs` of a VM that runs: what there is, even nothing yet

        def follow() -> None:
            while not done.wait(0.2):
                self.copy()

        threading.Thread(target=follow, name=f"console-{name}", daemon=True).start()

    def copy(self) -> None:
        with self._lock:
            if not self.started:
                return
            try:
                with open(self.serial_log, "rb") as f:
                    f.seek(self.offset)
                    data = f.read(self.history.limit)
            except OSError:
                return
            self.offset += len(data)
            self.history.append(data)
