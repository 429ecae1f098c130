"""A real userspace iSCSI target for the node tests: Debian's `tgtd` on 127.0.0.1, on a free
portal port and its own control port (so a system tgtd is never touched), configured with
`tgtadm` as the test says. tgtd keeps nothing over a restart, so `restart` starts it again
and exports again what was exported, as pvlun's target side does.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from dataclasses import dataclass, field

from host.command import run
from host.tgt import SOCKET_DIR as TGT_SOCKET_DIR
from iscsi_target_support import free_control_port, free_port


@dataclass
class Lun:
    tid: int
    iqn: str
    lun: int
    path: str
    accounts: tuple[tuple[str, str], ...] = ()


@dataclass
class Tgtd:
    """One tgtd process and what it exports."""

    log_path: str
    port: int = field(default_factory=free_port)
    control: int = field(default_factory=free_control_port)
    luns: list[Lun] = field(default_factory=list)
    proc: subprocess.Popen | None = None

    @property
    def portal(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(["tgtd", "-f", "-C", str(self.control), "--iscsi",
                                          f"portal=127.0.0.1:{self.port}"],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.tgtadm("--op", "show", "--mode", "sys")
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except Exception:  # noqa: BLE001 - not up yet
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def tgtadm(self, *args: str) -> None:
        run(["tgtadm", "-C", str(self.control), "--lld", "iscsi", *args], timeout=20)

    def export(self, lun: Lun, first: bool = True) -> None:
        """Make the target (when the LUN is the target's first), add the LUN, open the ACL to
        every initiator and bind the CHAP accounts."""
        if first:
            self.tgtadm("--op", "new", "--mode", "target", "--tid", str(lun.tid), "-T", lun.iqn)
            self.tgtadm("--op", "bind", "--mode", "target", "--tid", str(lun.tid), "-I", "ALL")
            for user, password in lun.accounts:
                self.tgtadm("--op", "new", "--mode", "account", "--user", user, "--password", password)
                self.tgtadm("--op", "bind", "--mode", "account", "--tid", str(lun.tid), "--user", user)
        self.tgtadm("--op", "new", "--mode", "logicalunit", "--tid", str(lun.tid), "--lun", str(lun.lun),
                    "-b", lun.path)
        if lun not in self.luns:
            self.luns.append(lun)

    def reexport_lun(self, lun: Lun) -> None:
        """Take the LU down and add it again: tgtd reads the file's size only then (a grown LUN)."""
        self.tgtadm("--op", "delete", "--mode", "logicalunit", "--tid", str(lun.tid), "--lun", str(lun.lun))
        self.tgtadm("--op", "new", "--mode", "logicalunit", "--tid", str(lun.tid), "--lun", str(lun.lun),
                    "-b", lun.path)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for name in (f"socket.{self.control}", f"socket.{self.control}.lock"):
            try:
                os.unlink(os.path.join(TGT_SOCKET_DIR, name))
            except FileNotFoundError:
                pass

    def restart(self) -> None:
        """Start again on the same ports and export everything again (tgtd kept nothing)."""
        self.start()
        done: set[int] = set()
        for lun in self.luns:
            self.export(lun, first=lun.tid not in done)
            done.add(lun.tid)
