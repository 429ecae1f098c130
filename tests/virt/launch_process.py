"""`pvlun` processes of the virt tests (`pvlun launch`, as a Pod's container would run it):
output in files, nothing blocking on a pipe, and nothing left behind when they stop; the tick
guest's count read from a console."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from host.sandbox import processes_below

ROOT = Path(__file__).resolve().parents[2]


def ticks(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"tick (\d+)\r\n", text)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Launch:
    """One `pvlun` process; stdout and stderr in files (nothing blocks on a pipe)."""

    def __init__(self, tmp: Path, name: str, args: list[str], prefix: list[str] = (), env: dict | None = None):
        self.out, self.err = tmp / f"{name}.out", tmp / f"{name}.err"
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen([*prefix, sys.executable, "-m", "pvlun.cli", *args], stdout=out, stderr=err,
                                         stdin=subprocess.DEVNULL, cwd=ROOT,
                                         env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})

    def stdout(self) -> str:
        return self.out.read_bytes().decode(errors="replace")

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def events(self) -> list[dict]:
        return [json.loads(line) for line in self.stderr().splitlines() if line.startswith("{")]

    def wait_for(self, text: str, timeout: float = 20) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.stdout():
                return True
            if self.proc.poll() is not None:
                return text in self.stdout()
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        """SIGTERM, as a Pod deletion; whatever is left (QEMU, bwrap, passt) is killed by pid."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                for pid in reversed(processes_below(self.proc.pid)):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                self.proc.kill()
                self.proc.wait()
