"""One daemon per role: a second `pvlun serve` on a running instance is refused before it
touches anything. Start-up repair assumes that nothing it finds is in use — it undoes
attachments, stops QEMUs, deletes volumes left `creating` and LUNs the catalog does not
know — so it must never run beside a live daemon of the same data dir or pool.

Each role holds an exclusive flock for the daemon's whole life (the kernel drops it when the
process dies, kill -9 included, so a crash never leaves a stale lock):
- `DATA_DIR/locks/controller.lock`: the controller role (modes all and controller), which
  owns the catalog's volumes and the pool;
- `DATA_DIR/locks/node-NODE_ID.lock`: one per node ID served (modes all and node), so a
  split controller and any number of node plugins of other node IDs share a data dir;
- the pool directory itself, for the controller role: data dirs that name one `--pool`
  exclude each other, and an image pool is locked both before it is mounted and, once
  mounted, at its root (so no `--pool` can name another daemon's mounted pool either).
The lock files hold the holder's pid, which the refusal names.
"""

from __future__ import annotations

import fcntl
import os

from csi.validation import NODE_ID

LOCK_DIR = "locks"


class InstanceBusy(OSError):
    """Another daemon holds a role this one needs; nothing was touched."""


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        return ""
    return f" (pid {text})" if text.isdigit() else ""


class InstanceLocks:
    """The flocks of one daemon; `release` (or the process's end) lets them go."""

    def __init__(self) -> None:
        self._held: list[tuple[int, tuple[int, int], bool]] = []  # (fd, (st_dev, st_ino), is a pool)

    def _take(self, fd: int, refusal: str, pool: bool = False) -> None:
        st = os.fstat(fd)
        if any(key == (st.st_dev, st.st_ino) for _, key, _ in self._held):
            os.close(fd)  # already ours (a pool directory that is no mount point)
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise InstanceBusy(refusal.format(holder=holder)) from None
        except BaseException:
            os.close(fd)
            raise
        self._held.append((fd, (st.st_dev, st.st_ino), pool))

    def role(self, data_dir: str, role: str) -> None:
        """Lock one role of data_dir: "controller" or "node-<NODE_ID>"."""
        if role != "controller" and not (role.startswith("node-") and NODE_ID.fullmatch(role[5:])):
            raise ValueError(f"not a daemon role: {role!r}")
        directory = os.path.join(data_dir, LOCK_DIR)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        fd = os.open(os.path.join(directory, role + ".lock"),
                     os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        what = "the controller" if role == "controller" else f"node {role[5:]}"
        self._take(fd, f"another pvlun serve{{holder}} already serves {what} of data dir {data_dir}; "
                       "stop it first (or give this one another --data-dir or --node-id)")
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)

    def pool(self, path: str) -> None:
        """Lock a pool directory (no pid can be written into it: the refusal names none)."""
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._take(fd, f"another pvlun serve already uses the pool {path}; two daemons must never share a pool",
                   pool=True)

    def release(self, pools_only: bool = False) -> None:
        """Drop the locks (only the pools': an open directory keeps a mounted pool busy, so
        they go before it is unmounted, the roles after)."""
        for fd, _, pool in reversed(self._held):
            if pool or not pools_only:
                os.close(fd)  # closing the only descriptor drops its flock
        self._held = [entry for entry in self._held if pools_only and not entry[2]]
