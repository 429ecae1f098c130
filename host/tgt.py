"""Debian's userspace iSCSI target, tgtd, driven with tgtadm.

pvlun runs a tgtd of its own: `tgtd -f -C PORT --iscsi portal=ADDR:PORT`, on a control
port of its own (its socket is /var/run/tgtd/socket.PORT), so it never meets a system tgtd.
tgtd keeps nothing over a restart; whoever owns the targets (csi/backends/iscsi.py) puts
them back. Every name that reaches tgtadm's argv passes a strict pattern here first.

Limits found in tgt's source (usr/spc.c, REPORT LUNS): the reply is built in one 4096-byte
page, 8 bytes of header and 8 per LUN, and tgtd *exits* ("FIXME: too many luns") when a
target's LUNs fill it: 511 LUNs with LUN 0 (the controller LUN tgt adds to every target)
kill the daemon at the first REPORT LUNS, so a target may hold at most 509 disk LUNs
besides LUN 0 and the one that would fill the page. LUN numbers are encoded in 10 bits
(0x3ff), so numbers stay below 1024 anyway.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from dataclasses import dataclass, field
from typing import Sequence

from host.command import CommandError, output

MAX_LUNS_PER_TARGET = 509  # disk LUNs 1..509 (see above); the default lunsPerTarget
MAX_LUN_NUMBER = 1023
MAX_CONTROL_PORT = 32767  # tgtd -C refuses more
SOCKET_DIR = "/var/run/tgtd"

# RFC 3720 3.2.6.3.1: iqn.YYYY-MM.reversed.domain[:anything], at most 223 bytes; we allow
# the characters tgt and libiscsi take without quoting (no spaces, commas, '=' or quotes).
IQN = re.compile(r"iqn\.[0-9]{4}-(0[1-9]|1[0-2])\.[a-z0-9]([a-z0-9.-]{0,62}[a-z0-9])?(:[a-z0-9][a-z0-9.:_-]{0,150})?")
CHAP_USER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
CHAP_SECRET = re.compile(r"[A-Za-z0-9!#%&()*+./:;<>?@\[\]^_{|}~-]{12,255}")  # RFC 3720 wants 12 at least
PORTAL = re.compile(r"(\d{1,3}(\.\d{1,3}){3}|\[[0-9a-fA-F:]+\]):\d{1,5}")
BSTYPES = {"rdwr", "aio"}
# Session parameters every target offers (RFC 3720 12): tgtd's defaults (InitialR2T=Yes, 8 KiB
# data segments) make a 1 MiB write wait for R2Ts and travel in 128 PDUs; unsolicited data and
# 256 KiB segments about double sequential writes through libiscsi (bench/bench_iscsi.py)
# without slowing reads. Each value is the most the target accepts; the initiator's proposal
# bounds what is negotiated.
TRANSFER_PARAMS = (("InitialR2T", "No"), ("ImmediateData", "Yes"), ("MaxRecvDataSegmentLength", "262144"),
                   ("MaxXmitDataSegmentLength", "262144"), ("FirstBurstLength", "262144"),
                   ("MaxBurstLength", "1048576"))


class TgtError(ValueError):
    """A name or value tgtadm must not be given."""


def check_iqn(iqn: str, what: str = "IQN") -> str:
    if not isinstance(iqn, str) or len(iqn) > 223 or not IQN.fullmatch(iqn):
        shown = repr(iqn[:60]) if isinstance(iqn, str) else type(iqn).__name__
        raise TgtError(f"{what} {shown} is not an iSCSI qualified name (iqn.YYYY-MM.domain:name, lowercase, "
                       "at most 223 characters)")
    return iqn


def check_chap(user: str, secret: str) -> None:
    """The CHAP user and secret; the message never shows the secret."""
    if not CHAP_USER.fullmatch(user or ""):
        raise TgtError("the CHAP user name must be 1-64 letters, digits, '.', '_', '@' or '-'")
    if not CHAP_SECRET.fullmatch(secret or ""):
        raise TgtError("the CHAP secret must be 12-255 printable characters without spaces, quotes, "
                       "commas, '=', '$' or backslashes")


def check_portal(portal: str) -> str:
    if not PORTAL.fullmatch(portal) or not 0 < int(portal.rsplit(":", 1)[1]) < 65536:
        raise TgtError(f"portal {portal[:60]!r} is not ADDRESS:PORT (an IP address and a port)")
    return portal


def _number(value: int, low: int, high: int, what: str) -> str:
    if type(value) is not int or not low <= value <= high:
        raise TgtError(f"{what} {value!r} is outside {low}..{high}")
    return str(value)


def _path(path: str) -> str:
    if not os.path.isabs(path) or any(c in path for c in ",=\n\0") or not path.isprintable():
        raise TgtError("a backing store must be an absolute path without ',', '=' or control characters")
    return path


@dataclass
class Lun:
    number: int
    size_bytes: int  # as tgtadm shows it (MB, rounded): for display, not arithmetic
    path: str
    bstype: str


@dataclass
class Target:
    tid: int
    iqn: str
    luns: dict[int, Lun] = field(default_factory=dict)  # disk LUNs, not LUN 0
    acl: list[str] = field(default_factory=list)
    accounts: list[str] = field(default_factory=list)
    sessions: int = 0


_TARGET = re.compile(r"^Target (\d+): (\S+)$")
_LUN = re.compile(r"^\s+LUN: (\d+)$")


def parse_show(text: str) -> dict[int, Target]:
    """`tgtadm --mode target --op show` as Target objects by tid."""
    targets: dict[int, Target] = {}
    target: Target | None = None
    lun: dict[str, str] = {}
    section = ""

    def flush() -> None:
        if target is not None and lun and lun.get("Type") == "disk":
            size = re.match(r"(\d+) MB", lun.get("Size", "0 MB"))
            n = int(lun["LUN"])
            target.luns[n] = Lun(n, int(size.group(1)) * 1000 * 1000 if size else 0,
                                 lun.get("Backing store path", ""), lun.get("Backing store type", ""))

    for line in text.splitlines():
        m = _TARGET.match(line)
        if m:
            flush()
            lun = {}
            target = Target(int(m.group(1)), m.group(2))
            targets[target.tid] = target
            section = ""
            continue
        if target is None:
            continue
        stripped = line.strip()
        if line.startswith("    ") and not line.startswith("     ") and stripped.endswith(":"):
            flush()
            lun = {}
            section = stripped[:-1]
            continue
        m = _LUN.match(line)
        if m and section == "LUN information":
            flush()
            lun = {"LUN": m.group(1)}
            continue
        if section == "LUN information" and lun and ":" in stripped:
            key, _, value = stripped.partition(":")
            lun[key.strip()] = value.strip()
        elif section == "ACL information" and stripped:
            target.acl.append(stripped)
        elif section == "Account information" and stripped:
            target.accounts.append(stripped.split()[0])
        elif section == "I_T nexus information" and stripped.startswith("I_T nexus:"):
            target.sessions += 1
    flush()
    return targets


class Tgtadm:
    """tgtadm against one tgtd (its control port). Methods raise CommandError with tgtadm's
    own words, or TgtError before anything runs when a value is not acceptable."""

    def __init__(self, control_port: int, timeout: float = 30):
        self.control_port = int(_number(control_port, 1, MAX_CONTROL_PORT, "control port"))
        self.timeout = timeout

    def _run(self, *args: str) -> str:
        return output(["tgtadm", "-C", str(self.control_port), "--lld", "iscsi", *args], timeout=self.timeout)

    def show(self) -> dict[int, Target]:
        return parse_show(self._run("--mode", "target", "--op", "show"))

    def new_target(self, tid: int, iqn: str) -> None:
        """A target offering TRANSFER_PARAMS to the sessions that log in to it."""
        t = _number(tid, 1, 1 << 30, "tid")
        self._run("--mode", "target", "--op", "new", "--tid", t, "--targetname", check_iqn(iqn, "target name"))
        for name, value in TRANSFER_PARAMS:
            self._run("--mode", "target", "--op", "update", "--tid", t, "--name", name, "--value", value)

    def target_params(self, tid: int) -> dict[str, str]:
        """The session parameters a target offers, as tgtd reports them."""
        text = self._run("--mode", "target", "--op", "show", "--tid", _number(tid, 1, 1 << 30, "tid"))
        return dict(line.strip().split("=", 1) for line in text.splitlines() if "=" in line)

    def delete_target(self, tid: int) -> None:
        self._run("--mode", "target", "--op", "delete", "--force", "--tid", _number(tid, 1, 1 << 30, "tid"))

    def add_lun(self, tid: int, lun: int, path: str, bstype: str = "rdwr") -> None:
        if bstype not in BSTYPES:
            raise TgtError(f"backing store type {bstype[:20]!r} is not one of {', '.join(sorted(BSTYPES))}")
        self._run("--mode", "logicalunit", "--op", "new", "--tid", _number(tid, 1, 1 << 30, "tid"),
                  "--lun", _number(lun, 1, MAX_LUN_NUMBER, "LUN"), "--backing-store", _path(path),
                  "--bstype", bstype)

    def delete_lun(self, tid: int, lun: int) -> None:
        self._run("--mode", "logicalunit", "--op", "delete", "--tid", _number(tid, 1, 1 << 30, "tid"),
                  "--lun", _number(lun, 1, MAX_LUN_NUMBER, "LUN"))

    def reopen_lun(self, tid: int, lun: int, path: str) -> None:
        """Make tgtd read the backing file's size again (after expansion): it takes the size
        when it opens the file, so the LUN goes offline, reopens its path and comes back;
        sessions stay and initiators see the new size at their next READ CAPACITY."""
        t, n = _number(tid, 1, 1 << 30, "tid"), _number(lun, 1, MAX_LUN_NUMBER, "LUN")
        base = ("--mode", "logicalunit", "--op", "update", "--tid", t, "--lun", n, "--params")
        self._run(*base, "online=0")
        try:
            self._run(*base, "path=" + _path(path))
        finally:
            self._run(*base, "online=1")

    def bind_initiator(self, tid: int, initiator: str) -> None:
        self._run("--mode", "target", "--op", "bind", "--tid", _number(tid, 1, 1 << 30, "tid"),
                  "--initiator-name", check_iqn(initiator, "initiator name"))

    def unbind_initiator(self, tid: int, initiator: str) -> None:
        self._run("--mode", "target", "--op", "unbind", "--tid", _number(tid, 1, 1 << 30, "tid"),
                  "--initiator-name", check_iqn(initiator, "initiator name"))

    def accounts(self) -> list[str]:
        text = self._run("--mode", "account", "--op", "show")
        return [line.strip() for line in text.splitlines()[1:] if line.strip()]

    def new_account(self, user: str, secret: str) -> None:
        """Create a CHAP account. tgtadm takes the secret only on its argv (visible in
        /proc to this host's root for the instant tgtadm runs); it is never logged: a
        failure's message is tgtadm's stderr, which does not repeat it."""
        check_chap(user, secret)
        self._run("--mode", "account", "--op", "new", "--user", user, "--password", secret)

    def delete_account(self, user: str) -> None:
        check_chap(user, "x" * 12)
        self._run("--mode", "account", "--op", "delete", "--user", user)

    def bind_account(self, tid: int, user: str) -> None:
        check_chap(user, "x" * 12)
        self._run("--mode", "account", "--op", "bind", "--tid", _number(tid, 1, 1 << 30, "tid"), "--user", user)

    def shutdown(self) -> None:
        """End tgtd (its targets and sessions with it)."""
        self._run("--mode", "system", "--op", "delete")

    def ready(self) -> bool:
        try:
            self._run("--mode", "target", "--op", "show")
            return True
        except CommandError:
            return False


def control_port_free(port: int) -> bool:
    """No tgtd holds this control port's lock (tgtd takes a lockf lock on socket.PORT.lock)."""
    import fcntl

    lock = os.path.join(SOCKET_DIR, f"socket.{port}.lock")
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        return True
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.lockf(fd, fcntl.LOCK_UN)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


class TgtDaemon:
    """One tgtd process of ours: started in the foreground (so it is our child and its death
    is seen at once), its output to a log file; `stop` ends only this process."""

    def __init__(self, portal: str, control_port: int, log_path: str, io_threads: int = 4,
                 prefix: Sequence[str] = ()):
        self.portal = check_portal(portal)
        self.prefix = list(prefix)  # e.g. a host's nsenter (host/netns.py): its control socket is a file all reach
        self.control_port = int(_number(control_port, 1, MAX_CONTROL_PORT, "control port"))
        self.log_path = log_path
        self.io_threads = int(_number(io_threads, 1, 128, "I/O threads"))
        self.proc: subprocess.Popen | None = None
        self.admin = Tgtadm(control_port)
        self.starts = 0

    def argv(self) -> list[str]:
        return [*self.prefix, "tgtd", "-f", "-C", str(self.control_port), "-t", str(self.io_threads),
                "--iscsi", f"portal={self.portal}"]

    def start(self, wait: float = 10.0) -> None:
        if not control_port_free(self.control_port):
            raise RuntimeError(f"another tgtd already uses control port {self.control_port} "
                               f"({SOCKET_DIR}/socket.{self.control_port}); choose another --iscsi-control-port")
        with open(self.log_path, "ab") as log:
            os.chmod(self.log_path, 0o600)
            offset = log.tell()
            self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         start_new_session=True)
        self.starts += 1
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tgtd exited at start ({self.proc.returncode}); {self.log_path} says why")
            if self.admin.ready():
                if self._said("failed to create/bind to portal", offset):  # it runs on, serving nobody
                    self.stop()
                    raise RuntimeError(f"tgtd cannot listen on {self.portal} (in use?); choose another --iscsi-portal")
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"tgtd did not answer on control port {self.control_port} within {wait:g} s")

    def _said(self, text: str, offset: int) -> bool:
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            return text in f.read(65536).decode(errors="replace")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def stop(self, grace: float = 3.0) -> None:
        """tgtd ignores SIGTERM; it ends when told so over its control port (`tgtadm --op
        delete --mode system`), else it is killed. Its socket files go with it."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            try:
                self.admin.shutdown()
                proc.wait(grace)
            except (CommandError, subprocess.TimeoutExpired):
                proc.kill()
                proc.wait(grace)
        for name in (f"socket.{self.control_port}", f"socket.{self.control_port}.lock"):
            try:
                os.unlink(os.path.join(SOCKET_DIR, name))
            except FileNotFoundError:
                pass

