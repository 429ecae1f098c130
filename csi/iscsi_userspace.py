"""The userspace iSCSI initiator of a node whose kernel has none: one `qemu-storage-daemon`
per staged volume opens the LUN with QEMU's libiscsi driver and exports it as a FUSE file;
staging then puts a loop device on that file (csi/staging.py), as it does on a LUN file of
the `file` backend, so NodeStage/NodePublish hand out a real block device and filesystem.

Per volume, in the node's private state dir (0700), STATE/<volume_id>/:
  export    the FUSE mountpoint: the LUN as a file (the loop device's backing file)
  qmp       the daemon's QMP socket (block_resize after the target's LUN grew)
  pid       its pid file; lun.json: where the LUN is (no password); log: its stderr
  secret    the CHAP password while the daemon starts (0600), removed once it has read it
Nothing else is kept: what is attached is read back from the system (mounts, the pid file),
so a restarted node service finds its daemons (they run in their own session) and
`repair` cleans those no publication explains.

Session loss: the driver runs with no request timeout, so I/O waits while the target is away
(tgtd restarted, the network down) and libiscsi logs in again when it is back: nothing is
lost. `problem` tells NodeGetVolumeStats meanwhile (the portal refuses or does not answer).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Collection

import grpc

from csi import attach
from csi.errors import CsiError, shown
from csi.iscsi_context import Chap, IscsiLun
from csi.validation import VOLUME_ID

log = logging.getLogger(__name__)

DAEMON = "qemu-storage-daemon"
NODE_NAME = "lun"
START_SECONDS = 30
PROBE_SECONDS = 1.0
RELEASE_SETTLE_SECONDS = 5.0
# It needs the network and FUSE (mounting its export: CAP_SYS_ADMIN), nothing more of root's.
CONFINE = ["setpriv", "--no-new-privs", "--inh-caps=-all", "--bounding-set=-all,+sys_admin", "--"]


def _error(code: grpc.StatusCode, message: str) -> CsiError:
    return CsiError(code, message)


class UserspaceInitiator:
    """The qemu-storage-daemons of one node, under its private state dir."""

    def __init__(self, state_dir: str, initiator_name: str):
        if "," in state_dir or not os.path.isabs(state_dir):
            raise ValueError(f"the iSCSI state dir {state_dir!r} must be absolute and free of commas")
        longest = len(os.fsencode(os.path.join(state_dir, "vol-" + "0" * 32, "qmp")))
        if longest > 107:  # a storage daemon's QMP socket is <state dir>/<volume ID>/qmp
            raise ValueError(f"the iSCSI state dir {state_dir[:60]!r}... is too long: its sockets would have "
                             f"{longest} bytes, a Unix socket path at most 107")
        self.state_dir = state_dir
        self.initiator_name = initiator_name
        self._children: dict[int, subprocess.Popen] = {}  # daemons this process started, to reap
        # volumes this process is attaching or has attached: never a leftover for start-up repair,
        # which may run while the first NodeStageVolume after a start is under way
        self._ours: set[str] = set()
        self._ours_lock = threading.Lock()

    # ------------------------------------------------------------ paths

    def _dir(self, volume_id: str) -> str:
        if not VOLUME_ID.fullmatch(volume_id):
            raise ValueError(f"not a volume ID: {volume_id!r}")
        return os.path.join(self.state_dir, volume_id)

    def export_path(self, volume_id: str) -> str:
        """The FUSE file a staged volume's loop device reads (whether staged or not)."""
        return os.path.join(self._dir(volume_id), "export")

    def volumes(self) -> list[str]:
        """Volume IDs with a state dir here (staged, or left by a crash)."""
        try:
            names = os.listdir(self.state_dir)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if VOLUME_ID.fullmatch(n))

    def lun_of(self, volume_id: str) -> IscsiLun | None:
        try:
            with open(os.path.join(self._dir(volume_id), "lun.json"), encoding="utf-8") as f:
                d = json.load(f)
            return IscsiLun(d["portal"], d["target"], int(d["lun"]), d.get("chapUser", ""))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def pid(self, volume_id: str) -> int | None:
        """The daemon's pid while it runs (checked against its command line: a pid file
        outliving its process must not name someone else's)."""
        where = self._dir(volume_id)
        try:
            with open(os.path.join(where, "pid"), encoding="ascii") as f:
                pid = int(f.read().strip())
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except (OSError, ValueError):
            return None
        if os.path.basename(argv[0]) != DAEMON.encode():
            return None  # gone (a zombie has no command line), or the pid was reused
        return pid if any(where.encode() in a for a in argv) else None

    def attached(self, volume_id: str) -> bool:
        """Has this volume a state dir here (attached, or left by an attempt)?"""
        return os.path.isdir(self._dir(volume_id))

    def exported(self, volume_id: str) -> bool:
        m = attach.mount_at(self.export_path(volume_id))
        return m is not None and m.fstype.startswith("fuse")

    # ------------------------------------------------------------ attach / release

    def attach(self, volume_id: str, lun: IscsiLun, chap: Chap | None) -> str:
        """Log in to the LUN and export it as a FUSE file; returns the file. Idempotent: a
        daemon already serving this LUN is kept; one serving another LUN is ALREADY_EXISTS.
        Fails fast with PERMISSION_DENIED (CHAP, ACL), NOT_FOUND (no such target or LUN) or
        UNAVAILABLE (portal unreachable), naming what to fix; never a password."""
        export = self.export_path(volume_id)
        if self.pid(volume_id) and self.exported(volume_id):
            have = self.lun_of(volume_id)
            if have is not None and (have.portal, have.target, have.lun) != (lun.portal, lun.target, lun.lun):
                raise _error(grpc.StatusCode.ALREADY_EXISTS,
                             f"volume {volume_id} is attached here from {have.describe()}, not {lun.describe()}")
            with self._ours_lock:
                self._ours.add(volume_id)
            return export
        with self._ours_lock:
            self._ours.add(volume_id)
        self._stop(volume_id)  # leftovers of an attempt a crash cut off
        where = self._dir(volume_id)
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        os.makedirs(where, mode=0o700, exist_ok=True)
        os.chmod(where, 0o700)
        with open(os.path.join(where, "lun.json"), "w", encoding="utf-8") as f:
            json.dump({"portal": lun.portal, "target": lun.target, "lun": lun.lun, "chapUser": lun.chap_user}, f)
        with open(export, "a"):
            pass
        secret = os.path.join(where, "secret")
        try:
            if chap is not None:
                fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(chap.password)
            self._start(volume_id, lun, chap)
        except BaseException:
            self._stop(volume_id)
            with self._ours_lock:
                self._ours.discard(volume_id)
            raise
        finally:
            _unlink(secret)  # the daemon read it at start and logs in again from memory
        log.info("volume %s: %s exported by %s as %s", volume_id, lun.describe(), DAEMON, export)
        return export

    def argv(self, volume_id: str, lun: IscsiLun, chap: Chap | None) -> list[str]:
        """The daemon's command line: every value in it matched a strict pattern (csi/iscsi_context.py)."""
        where = self._dir(volume_id)
        blockdev = {"driver": "iscsi", "node-name": NODE_NAME, "transport": "tcp", "portal": lun.portal,
                    "target": lun.target, "lun": lun.lun, "initiator-name": self.initiator_name,
                    "timeout": 0}
        argv = [DAEMON]
        if chap is not None:
            argv += ["--object", json.dumps({"qom-type": "secret", "id": "chap", "file": os.path.join(where, "secret")})]
            blockdev.update({"user": chap.user, "password-secret": "chap"})
        export = {"type": "fuse", "id": "export", "node-name": NODE_NAME,
                  "mountpoint": os.path.join(where, "export"), "writable": True}
        argv += ["--blockdev", json.dumps(blockdev), "--export", json.dumps(export),
                 "--chardev", f"socket,id=qmp,path={os.path.join(where, 'qmp')},server=on,wait=off",
                 "--monitor", "chardev=qmp", "--pidfile", os.path.join(where, "pid")]
        return argv

    def _start(self, volume_id: str, lun: IscsiLun, chap: Chap | None) -> None:
        where = self._dir(volume_id)
        with open(os.path.join(where, "log"), "wb") as errors:
            # its own session: it outlives a restart of the node service, as the mounts do
            proc = subprocess.Popen(CONFINE + self.argv(volume_id, lun, chap), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=errors, start_new_session=True)
        self._children[proc.pid] = proc
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self._children.pop(proc.pid, None)
                raise self._start_failed(volume_id, lun)
            if self.exported(volume_id) and self.pid(volume_id) == proc.pid:
                return
            time.sleep(0.02)
        self._kill(proc.pid)
        raise _error(grpc.StatusCode.UNAVAILABLE,
                     f"no login to {lun.describe()} within {START_SECONDS}s: is the portal reachable from this node?")

    def _start_failed(self, volume_id: str, lun: IscsiLun) -> CsiError:
        """What a daemon that exited at start said, as the status the CO acts on."""
        text = _read(os.path.join(self._dir(volume_id), "log"))
        said = text.rsplit("iSCSI: ", 1)[-1].strip().splitlines()[-1:] or ["it exited"]
        reason = said[0]
        if "Authentication failure" in text:
            user = lun.chap_user or "the CHAP user"
            return _error(grpc.StatusCode.PERMISSION_DENIED,
                          f"CHAP login to {lun.describe()} as {user} was refused: check the password in the "
                          "node-stage secret (node.session.auth.password) against the target's")
        if "Authorization failure" in text:
            return _error(grpc.StatusCode.PERMISSION_DENIED,
                          f"{lun.describe()} does not admit initiator {self.initiator_name}: "
                          "ControllerPublishVolume adds it to the target's ACL")
        if "Target not found" in text or "LOGICAL_UNIT_NOT_SUPPORTED" in text:
            return _error(grpc.StatusCode.NOT_FOUND, f"{lun.describe()} does not exist ({reason})")
        if "reconnect" in text or "connect" in reason.lower():
            return _error(grpc.StatusCode.UNAVAILABLE, f"cannot reach the portal of {lun.describe()} ({reason})")
        return _error(grpc.StatusCode.INTERNAL, f"{DAEMON} could not open {lun.describe()}: {shown(reason, 300)}")

    def in_use(self, volume_id: str) -> bool:
        """Does a loop device still read this volume's export (a staging of it here)?"""
        export = self.export_path(volume_id)
        return any(d.backing_file == export for d in attach.all_loop_devices())

    def staged(self) -> set[str]:
        """Volumes a finished NodeStageVolume holds here: a loop device reads the export and is
        mounted (the staging mount, or the block device's bind at STAGING/lun). A stage a
        crash cut off has no such mount; NodeUnstageVolume undoes the finished ones."""
        exports = {self.export_path(v): v for v in self.volumes()}
        return {exports[d.backing_file] for d in attach.all_loop_devices()
                if d.backing_file in exports and attach.mounts_using(d.path)}

    def release(self, volume_id: str, settle: float = RELEASE_SETTLE_SECONDS) -> bool:
        """Log out (stop the daemon, unmount its export, remove its state) unless a loop
        device still reads the export; True when nothing of the volume is left here. The
        kernel defers a loop detach while someone (udev's probe) still holds the device, so
        an unmounted device's detach is waited for up to `settle` seconds: else the session
        would outlive the unstage that ended it. A mounted one is another staging's: kept."""
        if not self.attached(volume_id):
            return True
        export = self.export_path(volume_id)
        deadline = time.monotonic() + settle
        while True:
            devices = [d for d in attach.all_loop_devices() if d.backing_file == export]
            if not devices:
                break
            if time.monotonic() > deadline or any(attach.mounts_using(d.path) for d in devices):
                return False  # another staging here still reads it
            time.sleep(0.05)
        self._stop(volume_id)
        with self._ours_lock:
            self._ours.discard(volume_id)
        return True

    def _stop(self, volume_id: str) -> None:
        """Stop the daemon (it unmounts its export on SIGTERM), unmount a FUSE export a
        killed one left, and remove the volume's state dir."""
        where = self._dir(volume_id)
        pid = self.pid(volume_id)
        if pid is not None:
            self._kill(pid)
        if self.exported(volume_id):
            attach.unmount(self.export_path(volume_id))  # a dead daemon's export: ENOTCONN
        if os.path.isdir(where):
            shutil.rmtree(where)
        if pid is not None:
            log.info("volume %s: %s %d stopped", volume_id, DAEMON, pid)

    def _kill(self, pid: int, timeout: float = 10) -> None:
        """SIGTERM (the daemon flushes and unmounts its export), SIGKILL after `timeout`;
        our own child is reaped, an adopted one (started before a restart) polled."""
        proc = self._children.pop(pid, None)
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5)):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                if (proc.poll() is not None) if proc else _gone(pid):
                    return
                time.sleep(0.02)
        if proc:
            proc.wait(5)

    # ------------------------------------------------------------ health, growth, repair

    def problem(self, volume_id: str) -> str | None:
        """Why the volume's iSCSI path is abnormal now, None while it is healthy."""
        lun = self.lun_of(volume_id)
        if lun is None or self.pid(volume_id) is None:
            return f"the iSCSI session of volume {volume_id} is gone: its {DAEMON} is not running"
        if not self.exported(volume_id):
            return f"the iSCSI export of volume {volume_id} is not mounted"
        try:
            with socket.create_connection((lun.host, lun.port), timeout=PROBE_SECONDS):
                pass
        except OSError as exc:
            return (f"the portal {lun.portal} of {lun.target} is unreachable ({exc.strerror or exc}): "
                    "I/O waits for the target and resumes when it is back")
        return None

    def rescan(self, volume_id: str, timeout: float = 10) -> int:
        """Make the daemon read the LUN's capacity anew (the target grew it) and wait for the
        FUSE file to show it; returns the size. QEMU's iscsi driver cannot grow a LUN: its
        truncate re-reads the capacity and takes any size up to it, so a one-sector
        block_resize is the rescan."""
        reply = qmp(os.path.join(self._dir(volume_id), "qmp"), "block_resize", {"node-name": NODE_NAME, "size": 512})
        if "error" in reply:
            raise _error(grpc.StatusCode.INTERNAL,
                         f"rescanning the LUN of {volume_id} failed: {reply['error'].get('desc', '')}")
        size = _node_size(os.path.join(self._dir(volume_id), "qmp"))
        export = self.export_path(volume_id)
        deadline = time.monotonic() + timeout
        while os.stat(export).st_size != size and time.monotonic() < deadline:
            time.sleep(0.05)  # FUSE caches the file's attributes for a moment
        return os.stat(export).st_size

    def repair(self, published: Collection[str]) -> dict[str, int]:
        """Start-up repair: keep (re-adopt) the daemons of volumes published to this node;
        release everything of any other volume — the loop devices on its export and their
        mounts, newest first, then the daemon, its export and state. A daemon that died
        leaves an export that can never work again: released as well, even if published
        (the volume is abnormal until staged again)."""
        counts = {"kept": 0, "released": 0, "failed": 0}
        with self._ours_lock:
            ours = set(self._ours)
        for volume_id in self.volumes():
            if volume_id in ours:  # attached (or being attached) by this very process since it started
                counts["kept"] += 1
                continue
            alive = self.pid(volume_id) is not None and self.exported(volume_id)
            if alive and volume_id in published:
                counts["kept"] += 1
                continue
            export = self.export_path(volume_id)
            try:
                for device in attach.all_loop_devices():
                    if device.backing_file == export:
                        for mount in reversed(attach.mounts_using(device.path)):
                            attach.unmount(mount.mount_point)
                        attach.detach_loop(device.path)
                self._stop(volume_id)
            except (OSError, CsiError, Exception) as exc:  # noqa: BLE001 - the start goes on
                log.warning("cannot release the iSCSI attachment of volume %s: %s", volume_id, exc)
                counts["failed"] += 1
                continue
            log.warning("released the iSCSI attachment of volume %s: %s", volume_id,
                        "its daemon was gone" if not alive else "no publication explains it")
            counts["released"] += 1
        return counts


def qmp(socket_path: str, command: str, arguments: dict | None = None, timeout: float = 10) -> dict:
    """One QMP command on a daemon's monitor socket; its reply ({"return": ...} or {"error": ...})."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(socket_path)
        f = s.makefile("rwb")
        f.readline()  # the greeting
        for execute, args in (("qmp_capabilities", None), (command, arguments)):
            f.write(json.dumps({"execute": execute, **({"arguments": args} if args else {})}).encode() + b"\n")
            f.flush()
            while True:
                reply = json.loads(f.readline() or b"{}")
                if "event" not in reply:
                    break
        return reply


def _node_size(socket_path: str) -> int:
    reply = qmp(socket_path, "query-named-block-nodes", {"flat": True})
    for node in reply.get("return", []):
        if node.get("node-name") == NODE_NAME:
            return int(node["image"]["virtual-size"])
    raise _error(grpc.StatusCode.INTERNAL, f"{DAEMON} has no block node {NODE_NAME}")


def _gone(pid: int) -> bool:
    """Has a process that is not our child ended (gone, or a zombie its parent has not reaped)?"""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
