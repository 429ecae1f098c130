"""Tar archives: the disk inside one (an OVA, a tarred image), or a whole archive unpacked
into a Filesystem volume (`contentType: archive`).

Unpacking is the dangerous one: member names, symbolic and hard links decide where bytes
land, and Python's own guard (`tarfile`'s "data" filter) has been bypassed (CVE-2025-4517: a
chain of links longer than PATH_MAX that its realpath check cannot follow). So no code of
ours extracts anything as root. GNU tar does, as the sandbox user, in a mount namespace that
holds only the directory it unpacks into: whatever a member names, there is nothing else to
reach, and the user could not write it anyway. Device nodes cannot be made there, hard links
cannot leave the directory (nothing else is mounted). What tar leaves is then checked without
following a link: a symbolic link that would lead out of the volume (absolute, or through
`..` above its root, however many links deep) or a special file (a FIFO, a socket) fails the
import, so nothing that later opens a path in the volume as root can be led elsewhere. Then
the files are given to root (`lchown`, which also clears set-id bits).
"""

from __future__ import annotations

import codecs
import contextlib
import os
import re
import stat
import subprocess
from typing import BinaryIO, Iterator

from host.sandbox import TOOLS_ONLY, Sandbox, give

from . import errors, formats, transfer_watch
from .errors import ImportFailed
from .sources.base import PeekStream, read_head
from .streams import CHUNK, TAR_ERRORS, open_tar_stream

MAX_LINK_HOPS = 40  # the kernel's own limit on links followed in one path


# -- the disk inside a tar -----------------------------------------------------------------
def first_disk(stream: BinaryIO, opened: list) -> BinaryIO:
    """The disk inside a tar: the first member whose content is a disk image. Text files
    beside it (an OVA's .ovf descriptor and .mf manifest, certificates) are passed over;
    in an archive of several disks (a multi-disk OVA) the first one is taken. The tar is
    added to `opened` (closed by the caller)."""
    skipped = []
    try:
        tar = open_tar_stream(stream, "r|")
        opened.append(tar)
        for member in tar:
            if not member.isfile() or member.size == 0:
                continue
            f = _TarMember(tar.extractfile(member))  # type: ignore[arg-type]
            head = read_head(f, formats.HEAD_SIZE)  # type: ignore[arg-type]
            if formats.detect(head) == "raw" and _is_text(head):
                skipped.append(member.name)
                continue
            return PeekStream(head, f)  # type: ignore[arg-type, return-value]
    except TAR_ERRORS as exc:
        raise ImportFailed(errors.INVALID_IMAGE, f"the tar archive is corrupt: {exc}") from None
    found = f" (only text files: {', '.join(_short(name) for name in skipped[:5])})" if skipped else ""
    raise ImportFailed(errors.INVALID_IMAGE, f"the tar archive holds no disk image{found}")


class _TarMember:
    """The disk file inside a tar; tar errors become ImportFailed."""

    def __init__(self, fileobj: BinaryIO):
        self._f = fileobj

    def read(self, n: int = -1) -> bytes:
        try:
            return self._f.read(n)
        except TAR_ERRORS as exc:
            raise ImportFailed(errors.INVALID_IMAGE, f"the tar archive is corrupt: {exc}") from None

    def close(self) -> None:
        self._f.close()


def _is_text(head: bytes) -> bool:
    """A descriptor or manifest, not a disk: no NUL byte and valid UTF-8 (a disk's first
    sectors always hold NULs; an OVF or a .mf never does)."""
    if b"\0" in head:
        return False
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)  # the head may cut a character
    except UnicodeDecodeError:
        return False
    return True


# -- a whole archive into a volume ---------------------------------------------------------
def unpack(stream: BinaryIO, directory: str, limit: int) -> None:
    """Unpack the tar `stream` into `directory` (a fresh directory inside the volume, made by
    the caller), at most `limit` bytes of it; raise ImportFailed if it cannot be done safely.
    On failure the directory holds what was unpacked so far, for the caller to remove."""
    give(directory)  # the sandbox user writes it
    argv = ["tar", "--extract", "--file=-", f"--directory={directory}", "--no-same-owner", "--no-same-permissions"]
    with Sandbox(writable=[directory], system=TOOLS_ONLY) as box, \
            transfer_watch.watched_process(box.wrap(argv), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL) as (proc, err):
        _feed(stream, proc, limit)
        if proc.wait() != 0:
            err.seek(0)
            raise ImportFailed(errors.INVALID_IMAGE, _tar_problem(err.read().decode(errors="replace")))
    root = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        for rel, name, st, dir_fd in _entries(root):
            _refuse_unsafe(root, rel, name, st, dir_fd)
        for _rel, name, _st, dir_fd in _entries(root):
            os.chown(name, 0, 0, dir_fd=dir_fd, follow_symlinks=False)
        os.fchown(root, 0, 0)
    finally:
        os.close(root)


def _feed(stream: BinaryIO, proc: subprocess.Popen, limit: int) -> None:
    """Our (counted, checksummed, decompressed) stream into tar's stdin, at most `limit` bytes."""
    assert proc.stdin is not None
    total = 0
    try:
        while data := stream.read(CHUNK):
            total += len(data)
            if total > limit:
                raise ImportFailed(errors.IMAGE_TOO_LARGE, f"the archive unpacks to more than the volume's "
                                                           f"{limit} bytes")
            proc.stdin.write(data)
    except BrokenPipeError:
        pass  # tar stopped reading: its exit status says why (the rest is read for the checksum)
    finally:
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.close()


_LONG_NAME = re.compile(r"[^\s:]{61,}")


def _short(name: str) -> str:
    """A member name short enough for a status line."""
    return _LONG_NAME.sub(lambda m: m.group(0)[:28] + "…" + m.group(0)[-28:], name)


def _tar_problem(stderr: str) -> str:
    """What tar said, as a sentence for a person (member names shortened)."""
    lines = [_short(ln.removeprefix("tar: ")) for ln in stderr.splitlines()
             if ln.strip() and "Exiting with failure status" not in ln]
    text = errors.tool_text("\n".join(lines))
    if "File name too long" in stderr:
        return f"a path in the archive is too long to unpack: {text}"
    if "contains '..'" in stderr:
        return f"the archive names a path above its own root: {text}"
    return f"the archive cannot be unpacked: {text}"


def _entries(root: int) -> Iterator[tuple[list[str], str, os.stat_result, int]]:
    """Every entry below `root` as (its directory's components, name, lstat, directory fd),
    following no link; iterative, for trees deeper than Python's recursion."""
    pending: list[list[str]] = [[]]
    while pending:
        rel = pending.pop()
        fd = os.open("/".join(rel) or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=root)
        try:
            with os.scandir(fd) as found:
                names = [entry.name for entry in found]
            for name in names:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                yield rel, name, st, fd
                if stat.S_ISDIR(st.st_mode):
                    pending.append(rel + [name])
        finally:
            os.close(fd)


def _refuse_unsafe(root: int, rel: list[str], name: str, st: os.stat_result, dir_fd: int) -> None:
    shown = _short("/".join(rel + [name]))
    if stat.S_ISLNK(st.st_mode):
        target = os.readlink(name, dir_fd=dir_fd)
        if _leads_out(root, rel, target):
            raise ImportFailed(errors.INVALID_IMAGE, f"the archive holds a link that leads outside the volume: "
                                                     f"{shown!r} -> {_short(target)!r}")
    elif not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        raise ImportFailed(errors.INVALID_IMAGE, f"the archive holds a special file (a device, FIFO or socket): {shown!r}")


def _leads_out(root: int, where: list[str], target: str) -> bool:
    """Would the kernel, resolving `target` from the directory `where` (below `root`), leave
    `root`? Followed component by component, through every link in the tree (a `..` after a
    link climbs from where the link led, as the kernel does), up to MAX_LINK_HOPS links. A path
    too long to check, or a loop, counts as leading out."""
    if target.startswith("/"):
        return True
    resolved = list(where)
    todo = target.split("/")[::-1]
    hops = 0
    while todo:
        part = todo.pop()
        if part in ("", "."):
            continue
        if part == "..":
            if not resolved:
                return True
            resolved.pop()
            continue
        try:
            st = os.stat("/".join(resolved + [part]), dir_fd=root, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            resolved.append(part)  # leads nowhere: what follows is resolved as written
            continue
        except OSError:
            return True
        if stat.S_ISLNK(st.st_mode):
            hops += 1
            link = os.readlink("/".join(resolved + [part]), dir_fd=root)
            if hops > MAX_LINK_HOPS or link.startswith("/"):
                return True
            todo.extend(link.split("/")[::-1])
        else:
            resolved.append(part)
    return False
