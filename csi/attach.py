"""Host-level primitives of the CSI node side: loop devices and mounts.

The node service keeps no state of its own: everything it needs to know (what is staged
or published where, which LUN file a device reads) is derived here from the system —
/proc/self/mountinfo, sysfs and losetup. Every external tool runs through
`host.command.run`, so a failure carries the tool's own stderr. Making, probing and
growing filesystems lives in csi/filesystems.py.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import time
from dataclasses import dataclass

from csi.node_paths import pinned
from host.command import CommandError, output, run

# Options that apply to one mount point (and so to a bind mount) rather than to the
# filesystem: these are the ones a publish bind mount can honour.
PER_MOUNT_OPTIONS = frozenset(
    {"ro", "rw", "nosuid", "suid", "nodev", "dev", "noexec", "exec",
     "noatime", "atime", "nodiratime", "diratime", "relatime", "norelatime", "strictatime"}
)

# ---------------------------------------------------------------- mount table


@dataclass(frozen=True)
class Mount:
    """One line of /proc/self/mountinfo."""

    mount_id: int
    parent_id: int
    major: int
    minor: int
    root: str  # path inside the filesystem that is mounted here ("/loop0" for a device bind)
    mount_point: str
    options: frozenset[str]  # per-mount options (ro, nosuid, ...)
    fstype: str
    source: str
    super_options: tuple[str, ...] = ()  # filesystem-wide options (errors=..., data=...)

    @property
    def read_only(self) -> bool:
        return "ro" in self.options


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (\\040 ...)."""
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit() and len(field) >= i + 4:
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts() -> list[Mount]:
    """The mount table of this process's mount namespace, in mount order."""
    result = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-", 6)
            major, minor = fields[2].split(":")
            result.append(Mount(
                mount_id=int(fields[0]), parent_id=int(fields[1]),
                major=int(major), minor=int(minor),
                root=_unescape(fields[3]), mount_point=_unescape(fields[4]),
                options=frozenset(fields[5].split(",")),
                fstype=fields[sep + 1], source=_unescape(fields[sep + 2]),
                super_options=tuple(fields[sep + 3].split(",")) if len(fields) > sep + 3 else (),
            ))
    return result


def mount_at(path: str) -> Mount | None:
    """The topmost mount whose mount point is `path`, or None if it is no mount point."""
    real = os.path.realpath(path)
    found = None
    for m in mounts():
        if m.mount_point == real:
            found = m  # later lines are mounted on top of earlier ones
    return found


def _mount_onto(target: str, argv: list[str], timeout: float) -> None:
    """Run `mount --no-canonicalize ARGV... TARGET` with target reached without following
    links (csi/node_paths.py); its errors name target, not the descriptor's /proc path."""
    with pinned(target) as where:
        try:
            run(["mount", "--no-canonicalize", *argv, where], timeout=timeout)
        except CommandError as exc:
            raise CommandError(exc.argv, exc.returncode, exc.stderr.replace(where, target)) from None


def mount(device: str, target: str, fstype: str, options: list[str] | tuple[str, ...] = ()) -> None:
    _mount_onto(target, ["-t", fstype, *(["-o", ",".join(options)] if options else []), device], 120)


def bind_mount(source: str, target: str, read_only: bool = False,
               options: list[str] | tuple[str, ...] = ()) -> None:
    """Bind source onto target; then apply ro and per-mount options with a bind remount
    (a plain `mount --bind -o ro` silently ignores ro on older kernels). A bind remount
    sets every per-mount flag anew: flags it does not name (nosuid, nodev) are cleared,
    so callers pass all they want kept."""
    _mount_onto(target, ["--bind", source], 60)
    extra = [o for o in options if o in PER_MOUNT_OPTIONS and o not in ("ro", "rw")]
    if read_only or "ro" in options:
        extra.append("ro")
    if extra:
        try:
            _mount_onto(target, ["-o", ",".join(["remount", "bind", *extra])], 60)  # target: now the new mount
        except CommandError:
            unmount(target)
            raise


def unmount(path: str) -> None:
    run(["umount", path], timeout=120)


# ---------------------------------------------------------------- loop devices


DELETED = " (deleted)"  # what the kernel appends to a loop device's backing file once it is unlinked


def deleted_backing(backing: str) -> tuple[str, bool]:
    """(the backing file's path, whether it was deleted) from what the kernel shows."""
    if backing.endswith(DELETED):
        return backing[: -len(DELETED)], True
    return backing, False


@dataclass(frozen=True)
class LoopDevice:
    path: str  # /dev/loopN
    backing_file: str  # as the kernel shows it: may end with " (deleted)"
    read_only: bool
    autoclear: bool
    direct_io: bool


def loop_devices_for(lun_file: str) -> list[LoopDevice]:
    """Loop devices whose backing file is lun_file (losetup matches by inode, too)."""
    return _loop_devices(["--associated", lun_file])


def all_loop_devices() -> list[LoopDevice]:
    """Every attached loop device of the host (whole-file ones: partial views are never ours)."""
    return _loop_devices([])


def _loop_devices(select: list[str]) -> list[LoopDevice]:
    text = output(["losetup", "--list", "--json", *select,
                   "--output", "NAME,BACK-FILE,RO,AUTOCLEAR,DIO,OFFSET,SIZELIMIT"])
    if not text.strip():
        return []
    result = []
    for d in json.loads(text).get("loopdevices", []):
        if int(d.get("offset") or 0) or int(d.get("sizelimit") or 0):
            continue  # someone else's partial view of the file: never ours
        result.append(LoopDevice(d["name"], d["back-file"], _flag(d["ro"]),
                                 _flag(d["autoclear"]), _flag(d["dio"])))
    return result


def _flag(value: object) -> bool:
    return value in (True, 1, "1", "true")


def attach_loop(lun_file: str, read_only: bool = False) -> str:
    """A new loop device on lun_file with direct I/O (no double caching of the LUN), except
    on a FUSE file (an iSCSI LUN a qemu-storage-daemon exports), which is not cached twice
    and whose O_DIRECT support is the FUSE server's to give."""
    fuse = (m := mount_at(lun_file)) is not None and m.fstype.startswith("fuse")
    argv = ["losetup", "--find", "--show", f"--direct-io={'off' if fuse else 'on'}"]
    if read_only:
        argv.append("--read-only")
    for attempt in range(5):
        try:
            return output(argv + [lun_file]).strip()
        except CommandError as exc:
            # another process took the free device between --find and the attach
            if "busy" not in exc.stderr.lower() or attempt == 4:
                raise
            time.sleep(0.05 * (attempt + 1))
    raise AssertionError("unreachable")


def find_or_attach_loop(lun_file: str, read_only: bool = False) -> str:
    """Reuse a loop device already on lun_file (another staging of the same LUN, as in a
    live migration between two nodes of one host), else attach a new one."""
    for dev in loop_devices_for(lun_file):
        if dev.read_only == read_only and not dev.autoclear:
            refresh_loop(dev.path)  # the file may have grown since it was attached
            return dev.path
    return attach_loop(lun_file, read_only)


DETACH_WAIT_SECONDS = 2.0  # a prober (udev's blkid after an unmount) holds a device open for moments


def detach_loop(device: str) -> None:
    """Detach. The kernel defers it while someone still holds the device open: wait a moment
    for that to end, so that whoever unstaged a volume finds its LUN file free when this
    returns (a holder that stays is left to the kernel's deferred detach)."""
    backing = loop_backing_file(device)
    run(["losetup", "--detach", device])
    deadline = time.monotonic() + DETACH_WAIT_SECONDS
    while backing is not None and loop_backing_file(device) == backing and time.monotonic() < deadline:
        time.sleep(0.01)


def refresh_loop(device: str) -> None:
    """Make the loop device pick up the new size of its (grown) backing file."""
    run(["losetup", "--set-capacity", device])


def _sys_block(device: str) -> str:
    return os.path.join("/sys/class/block", os.path.basename(device))


def is_loop(device: str) -> bool:
    """A loop device node, attached or not (sysfs has loop/ only while attached)."""
    name = os.path.basename(device)
    return name.startswith("loop") and name[4:].isdigit()


def loop_backing_file(device: str) -> str | None:
    """The backing file as the kernel shows it, None if the device is not an attached loop."""
    try:
        with open(os.path.join(_sys_block(device), "loop", "backing_file"), encoding="utf-8",
                  errors="surrogateescape") as f:
            return f.read().rstrip("\n")
    except OSError:
        return None


def lun_gone(device: str) -> str | None:
    """Why the LUN behind a loop device is gone, or None while it is healthy."""
    if not os.path.exists(device):
        return f"LUN is gone: its device {device} no longer exists"
    if not is_loop(device):
        return None  # not a loop device: nothing here tells us more
    backing = loop_backing_file(device)
    if backing is None:
        return f"LUN is gone: {device} is no longer attached to its file"
    # the file's name only: callers never see the daemon's pool directories
    path, deleted = deleted_backing(backing)
    if deleted:
        return f"LUN is gone: its file {os.path.basename(path)} was deleted"
    if not os.path.exists(backing):
        return f"LUN is gone: its file {os.path.basename(backing)} is missing"
    return None


def backing_file_is(device: str, lun_file: str) -> bool:
    """Does this loop device read exactly lun_file (same inode)?"""
    backing = loop_backing_file(device)
    if backing is None or deleted_backing(backing)[1]:
        return False
    try:
        a, b = os.stat(backing), os.stat(lun_file)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


# ---------------------------------------------------------------- devices behind paths


def _device_by_number(major: int, minor: int) -> str | None:
    try:
        with open(f"/sys/dev/block/{major}:{minor}/uevent", encoding="utf-8") as f:
            for line in f:
                if line.startswith("DEVNAME="):
                    return "/dev/" + line.strip().split("=", 1)[1]
    except OSError:
        return None
    return None


def device_of(path: str) -> str | None:
    """The block device at a staged or published path: a device node bound onto a file
    (block access) or the device of the filesystem mounted there (mount access)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if stat.S_ISBLK(st.st_mode):
        return _device_by_number(os.major(st.st_rdev), os.minor(st.st_rdev))
    m = mount_at(path)
    if m is None:
        return None
    dev = _device_by_number(m.major, m.minor)
    if dev is None and m.source.startswith("/dev/"):  # btrfs reports an anonymous st_dev
        dev = m.source
    return dev


def _node_location(device: str, table: list[Mount]) -> tuple[int, int, str] | None:
    """(major, minor, path inside that fs) of the filesystem that holds a device node,
    which is what mountinfo shows for a bind mount of that node."""
    try:
        st_dev = os.stat(device).st_dev
    except OSError:
        return None
    major, minor = os.major(st_dev), os.minor(st_dev)
    best = None
    for m in table:
        if (m.major, m.minor) != (major, minor):
            continue
        prefix = m.mount_point.rstrip("/") + "/"
        if device.startswith(prefix) and (best is None or len(m.mount_point) > len(best.mount_point)):
            best = m
    if best is None:
        return None
    rel = device[len(best.mount_point.rstrip("/")):]
    return major, minor, best.root.rstrip("/") + rel


def mounts_using(device: str) -> list[Mount]:
    """Every mount of the device, as a filesystem (and binds of it) or as a bind of its
    node (a block volume's staging and publish paths), in mount order."""
    table = mounts()
    try:
        rdev = os.stat(device).st_rdev
    except OSError:
        return []
    number = (os.major(rdev), os.minor(rdev))
    node = _node_location(device, table)
    return [m for m in table if (m.major, m.minor) == number or m.source == device
            or (node and (m.major, m.minor, m.root) == node)]


def device_in_use(device: str) -> bool:
    """Is the device mounted anywhere, as a filesystem or as a bind of its node?"""
    return bool(mounts_using(device))


def device_busy(device: str) -> bool:
    """Is the device claimed by a mounted filesystem, in any mount namespace? The kernel
    refuses an exclusive open then, which mountinfo of our namespace cannot tell."""
    try:
        fd = os.open(device, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            return True
        raise
    os.close(fd)
    return False


def mounts_of(device: str) -> list[Mount]:
    """Filesystem mounts of the device (not binds of its node), in mount order."""
    rdev = os.stat(device).st_rdev
    number = (os.major(rdev), os.minor(rdev))
    return [m for m in mounts() if (m.major, m.minor) == number]


def device_read_only(device: str) -> bool:
    try:
        with open(os.path.join(_sys_block(device), "ro"), encoding="utf-8") as f:
            return f.read().strip() == "1"
    except OSError:
        return False


def device_size(device: str) -> int:
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)
