"""Running a tool on untrusted data with nothing of the host in its reach.

`qemu-img` and `nbdkit` parse hostile images and talk to hostile servers; a parser bug or a
format trick (a VMDK extent naming `/etc/shadow`) must find nothing to open. So the tool runs:

- in its own mount namespace (bubblewrap) that holds `/usr` read-only, an empty `/tmp`, a
  minimal `/dev`, its own `/proc` — and only the paths it was handed, at their own paths;
- as an unprivileged user (`nobody`) with no capabilities and `no_new_privs` (util-linux
  `setpriv`), so even the paths it holds open only as their permissions allow;
- without a network unless it needs one (nbdkit's curl plugin), in its own pid/ipc/uts
  namespaces, in a new session (no terminal injection).

The files handed over must be accessible to that user: callers create their scratch files
and sockets with `prepare_dir`/`give`. A file a person names (a `file://` source) is opened
by that user in the host's own tree (`open_as_sandbox_user`: every directory's permissions
count) and handed over as that open file (`files`), so what was checked is what is read. Devices (block, or character such as /dev/kvm) are
handed over as private device nodes owned by the sandbox user (made in a root-only directory
and bound over the device's path), so the host's own device node keeps its permissions.
Everything is one argv (`wrap`), which the one command runner (or a Popen for long runs)
executes: no Python runs between fork and exec.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Sequence

from host.command import Limits

SANDBOX_USER = "nobody"
_SYSTEM_RO = ("/usr",)
# what a tool that only parses data needs of /usr: its binary and libraries, none of the
# public files under /usr/share (licenses, docs) an image's metadata could name
TOOLS_ONLY = ("/usr/bin", "/usr/lib", "/usr/lib64")
_LINKS = (("usr/bin", "/bin"), ("usr/sbin", "/sbin"), ("usr/lib", "/lib"), ("usr/lib64", "/lib64"))
# what a networked tool needs to resolve names and verify TLS (all public files)
_NETWORK_RO = ("/etc/resolv.conf", "/etc/hosts", "/etc/nsswitch.conf", "/etc/ssl", "/etc/ca-certificates",
               "/etc/host.conf", "/etc/gai.conf")


def sandbox_ids() -> tuple[int, int]:
    """The unprivileged uid and gid tools run as."""
    try:
        entry = pwd.getpwnam(SANDBOX_USER)
        return entry.pw_uid, entry.pw_gid
    except KeyError:
        return 65534, 65534


def give(path: str) -> None:
    """Hand a file or directory pvlun created to the sandbox user (private to it: 0600/0700)."""
    uid, gid = sandbox_ids()
    os.chown(path, uid, gid)
    os.chmod(path, 0o700 if os.path.isdir(path) else 0o600)


def take_back(path: str) -> None:
    """Return a file to root once the sandboxed tool is done with it."""
    os.chown(path, 0, 0)


@contextlib.contextmanager
def lent(path: str) -> Iterator[None]:
    """Lend a file root owns (a volume's LUN file, a disk.img) to the sandbox user for one run
    that writes it, then give it back with its owner and mode as they were. A symbolic link
    is refused, never followed: a link in a volume must not lend the file it names."""
    before = _restamp(path, *sandbox_ids())
    try:
        yield
    finally:
        _restamp(path, before.st_uid, before.st_gid, stat.S_IMODE(before.st_mode))


def _restamp(path: str, uid: int, gid: int, mode: int | None = None) -> os.stat_result:
    """Owner (and mode) of the file itself, through a descriptor opened without following a
    link (open_no_follow: a regular file only); returns what it was."""
    fd = open_no_follow(path)
    try:
        before = os.fstat(fd)
        os.fchown(fd, uid, gid)
        if mode is not None:
            os.fchmod(fd, mode)
        return before
    finally:
        os.close(fd)


class UnsafeFile(OSError):
    """A path root was to open inside a volume or a run directory is not the plain file it must
    be: a symbolic link (which would send root anywhere on the host), a FIFO (which would block
    it), a socket or a device."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


def open_no_follow(path: str, flags: int = os.O_RDONLY, *, mode: int = 0o600, devices: bool = False) -> int:
    """Open what `path` names itself, never through a symbolic link in its last component, and
    only if it is a regular file (or, with `devices`, a block device: pvlun's own published
    ones). For files inside a volume (a pod or a guest writes there) and in directories something
    unprivileged could have written: root then works on a descriptor, never on the path again.
    Returns a blocking, close-on-exec descriptor; UnsafeFile names what was found instead."""
    name = os.path.basename(path)
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeFile(errno.ELOOP, f"{name} is a symbolic link; only a regular file is used") from None
        raise
    try:
        st = os.fstat(fd)
        if not (stat.S_ISREG(st.st_mode) or (devices and stat.S_ISBLK(st.st_mode))):
            raise UnsafeFile(errno.EINVAL, f"{name} is {_kind(st.st_mode)}; only a regular file is used")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _kind(mode: int) -> str:
    for test, what in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISCHR, "a character device")):
        if test(mode):
            return what
    return "not a regular file"


def fd_path(fd: int) -> str:
    """A path naming the file open as `fd` in this process, for a tool root runs outside a
    sandbox (it opens that very file again, whatever has been renamed or linked since)."""
    return f"/proc/{os.getpid()}/fd/{fd}"


_OPENER = """import os, socket, sys
channel = socket.socket(fileno=0)
try:
    fd = os.open(sys.argv[1], os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK)
except OSError as exc:
    channel.sendall(str(exc.errno).encode())
else:
    socket.send_fds(channel, [b"0"], [fd])
"""


def open_as_sandbox_user(path: str, timeout: float = 30) -> int:
    """Open `path` read-only with the sandbox user's rights, in the host's own tree: the kernel
    checks every directory on the way and the file itself, as it would for that user. Returns
    the descriptor (the file as it was resolved, once); raises OSError as the open would.

    The open happens in a small Python child that `subprocess` starts as that user (its C code
    switches ids: no Python runs between fork and exec in the daemon); the descriptor comes
    back over a socket. The child runs an interpreter that user may execute: the daemon's own,
    else Debian's /usr/bin/python3 (python3-minimal)."""
    uid, gid = sandbox_ids()
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.settimeout(timeout)
        proc = None
        for exe in dict.fromkeys((os.path.realpath(sys.executable), "/usr/bin/python3")):
            try:
                proc = subprocess.Popen([exe, "-I", "-S", "-c", _OPENER, path], stdin=theirs, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, cwd="/", env={"LC_ALL": "C"}, user=uid, group=gid,
                                        extra_groups=[], umask=0o077)
                break
            except (PermissionError, FileNotFoundError):
                continue
        if proc is None:
            raise OSError(errno.EACCES, "no Python interpreter the sandbox user may run", path)
        theirs.close()
        try:
            msg, fds, _, _ = socket.recv_fds(ours, 32, 1)
        except OSError:
            msg, fds = b"", []
        finally:
            proc.kill()
            proc.wait()
    if fds:
        return fds[0]
    code = int(msg) if msg.isdigit() else errno.EIO
    raise OSError(code, os.strerror(code), path)


def prepare_dir(parent: str | None, prefix: str) -> str:
    """A fresh private directory owned by the sandbox user (for scratch files and sockets)."""
    path = tempfile.mkdtemp(prefix=prefix, dir=parent)
    give(path)
    return path


@dataclass
class Sandbox:
    """The paths one sandboxed run may touch. Use as a context manager around the run:
    device nodes made for it are removed on exit."""

    read_only: Sequence[str] = ()
    writable: Sequence[str] = ()  # files or directories (a socket's directory)
    devices: Sequence[str] = ()  # block (or character, e.g. /dev/kvm) devices the tool opens
    # open files (descriptors the caller passes to the child) bound read-only at a path
    files: Mapping[str, int] = field(default_factory=dict)
    network: bool = False
    limits: Limits | None = None
    system: Sequence[str] = _SYSTEM_RO  # what of /usr it sees (TOOLS_ONLY: no /usr/share)
    env: Mapping[str, str] = field(default_factory=dict)
    # killed with the thread that started it; off for a process that outlives its starter (QEMU)
    die_with_parent: bool = True
    _node_dir: str | None = field(default=None, init=False, repr=False)

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wrap(self, argv: Sequence[str]) -> list[str]:
        """The argv that runs `argv` inside this sandbox."""
        uid, gid = sandbox_ids()
        out = ["bwrap"] + (["--die-with-parent"] if self.die_with_parent else [])
        out += ["--new-session", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
                "--cap-add", "CAP_SETUID,CAP_SETGID"]
        if not self.network:
            out.append("--unshare-net")
        made = {"/", "/tmp", "/dev", "/proc"}
        for path in self.system:
            out += _parents(path, made) + ["--ro-bind-try", path, path]
            made.add(path)
        for target, link in _LINKS:
            out += ["--symlink", target, link]
        out += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]
        if self.network:
            for path in _NETWORK_RO:
                out += ["--ro-bind-try", path, path]
        for flag, paths in (("--ro-bind", self.read_only), ("--bind", self.writable), ("--dev-bind", self.devices)):
            for path in paths:
                dest = os.path.abspath(path)
                out += _parents(dest, made)
                source = self._private_node(path) if flag == "--dev-bind" else _real(path)
                out += [flag, source, dest]
        for dest, fd in self.files.items():
            out += _parents(dest, made) + ["--ro-bind-fd", str(fd), dest]
        out += ["--chdir", "/", "--clearenv", "--setenv", "PATH", "/usr/bin:/usr/sbin", "--setenv", "LC_ALL", "C"]
        for key, value in self.env.items():
            out += ["--setenv", key, value]
        out += ["--", "setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
                "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--"]
        if self.limits is not None:
            out += self.limits.prefix()
        return out + list(argv)

    def _private_node(self, path: str) -> str:
        """A node for the same device, owned by the sandbox user, in a root-only directory on a
        filesystem that allows devices (the host's node keeps its owner and mode)."""
        st = os.stat(path)
        if not (stat.S_ISBLK(st.st_mode) or stat.S_ISCHR(st.st_mode)):
            raise ValueError(f"{path} is not a device")
        if self._node_dir is None:
            os.makedirs("/dev/.pvlun-sandbox", mode=0o700, exist_ok=True)
            self._node_dir = tempfile.mkdtemp(dir="/dev/.pvlun-sandbox")
        kind = "c" if stat.S_ISCHR(st.st_mode) else "b"
        node = os.path.join(self._node_dir, f"{kind}{os.major(st.st_rdev)}-{os.minor(st.st_rdev)}")
        if not os.path.exists(node):
            os.mknod(node, stat.S_IFMT(st.st_mode) | 0o600, st.st_rdev)
            uid, gid = sandbox_ids()
            os.chown(node, uid, gid)
        return node

    def close(self) -> None:
        if self._node_dir is not None:
            shutil.rmtree(self._node_dir, ignore_errors=True)
            self._node_dir = None


def _parents(dest: str, made: set[str]) -> list[str]:
    """Directories leading to `dest`, traversable by the sandbox user (bwrap would otherwise
    copy the host's modes, and a 0700 data dir would hide what it was handed)."""
    out: list[str] = []
    parent = os.path.dirname(dest)
    chain = []
    while parent not in made and parent != os.path.dirname(parent):
        chain.append(parent)
        parent = os.path.dirname(parent)
    for path in reversed(chain):
        out += ["--perms", "0755", "--dir", path]
        made.add(path)
    return out


def _real(path: str) -> str:
    """Bind what the path names now: a symlink swapped in later must not redirect the bind."""
    return os.path.realpath(path)


def processes_below(pid: int) -> list[int]:
    """Every process below `pid`, nearest first: what a sandbox (bwrap, its init, the tool)
    runs, for finding or ending the tool itself."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, queue = [], list(children.get(pid, []))
    while queue:
        out.append(queue.pop(0))
        queue += children.get(out[-1], [])
    return out
