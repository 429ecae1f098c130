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
and sockets with `prepare_dir`/`give`. Devices (block, or character such as /dev/kvm) are
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
import stat
import tempfile
from dataclasses import dataclass, field
from typing import Iterator, Sequence

from pvlun.command import Limits

SANDBOX_USER = "nobody"
_SYSTEM_RO = ("/usr",)
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
    that writes it, then give it back with its owner and mode as they were."""
    before = os.stat(path)
    uid, gid = sandbox_ids()
    os.chown(path, uid, gid)
    try:
        yield
    finally:
        os.chown(path, before.st_uid, before.st_gid)
        os.chmod(path, stat.S_IMODE(before.st_mode))


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


def readable_by_sandbox(st: os.stat_result) -> bool:
    """Would the sandbox user (no supplementary groups) be allowed to read this file?"""
    uid, gid = sandbox_ids()
    if st.st_uid == uid:
        return bool(st.st_mode & stat.S_IRUSR)
    if st.st_gid == gid:
        return bool(st.st_mode & stat.S_IRGRP)
    return bool(st.st_mode & stat.S_IROTH)


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
    network: bool = False
    limits: Limits | None = None
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
        for path in _SYSTEM_RO:
            out += ["--ro-bind", path, path]
        for target, link in _LINKS:
            out += ["--symlink", target, link]
        out += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]
        if self.network:
            for path in _NETWORK_RO:
                out += ["--ro-bind-try", path, path]
        made = {"/", "/tmp", "/dev", "/proc", *_SYSTEM_RO}
        for flag, paths in (("--ro-bind", self.read_only), ("--bind", self.writable), ("--dev-bind", self.devices)):
            for path in paths:
                dest = os.path.abspath(path)
                out += _parents(dest, made)
                source = self._private_node(path) if flag == "--dev-bind" else _real(path)
                out += [flag, source, dest]
        out += ["--chdir", "/", "--clearenv", "--setenv", "PATH", "/usr/bin:/usr/sbin", "--setenv", "LC_ALL", "C",
                "--", "setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
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
