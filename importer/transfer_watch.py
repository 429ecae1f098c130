"""Stall and cancellation of one import, decided where the bytes are read.

An import that receives no byte for `stall` seconds, or whose owner cancels it (the
DataVolume was deleted, the daemon stops), must end now, not when a socket timeout or a
child process gets round to it. A `TransferWatch` runs one watchdog thread: whatever may
block registers how to interrupt it (HTTP sockets are shut down, qemu-img and nbdkit are
killed), readers say when they wait for bytes and when bytes came, and the watchdog fires
the interruption when a wait lasts too long or cancellation is asked. The interrupted
reader then raises `failure()`: TransferStalled or ImportCancelled.

The running import's watch is a ContextVar the job sets (as a Go context would be passed
down), because the readers that need it are made deep inside the sources.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import logging
import socket
import subprocess
import tempfile
import threading
import time
import weakref
from typing import IO, Callable, Iterator, Sequence

from . import errors
from .errors import ImportFailed

DEFAULT_STALL_SECONDS = 120.0  # no byte for this long: the transfer is stalled
TICK = 0.2

log = logging.getLogger("pvlun.importer")
_current: contextvars.ContextVar[TransferWatch | None] = contextvars.ContextVar("pvlun_transfer_watch", default=None)


def current() -> TransferWatch | None:
    """The watch of the import running in this thread, if any."""
    return _current.get()


def stall_seconds() -> float:
    watch = current()
    return watch.stall if watch else DEFAULT_STALL_SECONDS


@contextlib.contextmanager
def watched_process(argv: Sequence[str], **popen) -> Iterator[tuple[subprocess.Popen, IO[bytes]]]:
    """A long-running tool (qemu-img convert, tar) under the running import's watch: yields the
    process and the file its stderr goes to. A cancelled import kills it; so does an error in
    the caller's loop; a cancellation is what is reported when it ended one, also when the
    tool's own failure surfaced first."""
    watch = current()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(argv, stderr=err, **popen)
        unwatch = watch.on_abort(proc.kill) if watch is not None else (lambda: None)
        try:
            yield proc, err
        except BaseException:
            proc.kill()
            proc.wait()
            if watch is not None:
                watch.check()
            raise
        finally:
            unwatch()
        if watch is not None:
            watch.check()


class TransferWatch:
    """`with TransferWatch(stall, cancelled):` around an import; `cancelled()` is polled each tick."""

    def __init__(self, stall: float = DEFAULT_STALL_SECONDS, cancelled: Callable[[], bool] = lambda: False):
        self.stall = stall
        self._cancelled = cancelled
        self._lock = threading.Lock()
        self._sockets: weakref.WeakSet[socket.socket] = weakref.WeakSet()
        self._aborts: dict[int, Callable[[], None]] = {}
        self._keys = itertools.count()
        self._waiting = 0
        self._since = 0.0
        self.fired: str | None = None  # errors.TRANSFER_STALLED or errors.CANCELLED
        self._fired = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._token: contextvars.Token | None = None

    def __enter__(self) -> TransferWatch:
        self._token = _current.set(self)
        self._thread = threading.Thread(target=self._watch, name="transfer-watch", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._token is not None:
            _current.reset(self._token)

    # -- what readers call -------------------------------------------------------------
    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        """Around a read that waits for bytes: only time spent here counts towards a stall."""
        with self._lock:
            if self._waiting == 0:
                self._since = time.monotonic()
            self._waiting += 1
        try:
            yield
        finally:
            with self._lock:
                self._waiting -= 1

    def touch(self) -> None:
        """Bytes (or progress) came: the stall clock starts again."""
        with self._lock:
            self._since = time.monotonic()

    def add_socket(self, sock: socket.socket) -> None:
        """A socket the import reads from: shut down when the watch fires."""
        with self._lock:
            if self.fired is None:
                self._sockets.add(sock)
                return
        _shutdown(sock)

    def on_abort(self, action: Callable[[], None]) -> Callable[[], None]:
        """Run `action` (kill a child) when the watch fires; returns the function that unregisters it."""
        with self._lock:
            if self.fired is None:
                key = next(self._keys)
                self._aborts[key] = action
                return lambda: self._aborts.pop(key, None)
        action()
        return lambda: None

    def check(self, where: str = "the source") -> None:
        """Raise the failure if the watch fired (a reader interrupted by it calls this first)."""
        if self.fired is not None:
            raise self.failure(where)

    def failure(self, where: str = "the source") -> ImportFailed:
        if self.fired == errors.CANCELLED:
            return ImportFailed(errors.CANCELLED, "the import was cancelled")
        return ImportFailed(errors.TRANSFER_STALLED, f"no data arrived from {errors.scrub(where)} for {self.stall:g} s")

    # -- what the job calls between attempts -------------------------------------------
    def pause(self, seconds: float) -> None:
        """Back off before another attempt; a cancellation ends the wait with ImportFailed."""
        self.rearm()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self._fired.wait(min(TICK, max(0.0, deadline - time.monotonic()))) and self.fired == errors.CANCELLED:
                break
        self.check()

    def rearm(self) -> None:
        """After a stall, for the next attempt (a cancellation stays)."""
        with self._lock:
            if self.fired == errors.TRANSFER_STALLED:
                self.fired = None
                self._fired.clear()
            self._waiting = 0

    # -- the watchdog ------------------------------------------------------------------
    def _watch(self) -> None:
        while not self._stop.wait(TICK):
            if self.fired == errors.CANCELLED:
                continue
            try:
                cancelled = self._cancelled()
            except Exception:  # a store going away at shutdown: ask again next tick
                log.debug("cancellation check failed", exc_info=True)
                cancelled = False
            if cancelled:
                self._fire(errors.CANCELLED)
                continue
            with self._lock:
                stalled = self.fired is None and self._waiting > 0 and time.monotonic() - self._since > self.stall
            if stalled:
                self._fire(errors.TRANSFER_STALLED)

    def _fire(self, reason: str) -> None:
        with self._lock:
            self.fired = reason
            sockets, aborts = list(self._sockets), list(self._aborts.values())
            self._sockets = weakref.WeakSet()
            self._aborts.clear()
        self._fired.set()
        log.info("import %s: interrupting it", "cancelled" if reason == errors.CANCELLED else "stalled")
        for sock in sockets:
            _shutdown(sock)
        for action in aborts:
            try:
                action()
            except Exception:
                log.debug("abort action failed", exc_info=True)


def _shutdown(sock: socket.socket) -> None:
    """Wake a thread blocked on the socket (EOF at once); socket.socket's own shutdown, so a
    TLS socket is not torn down under the reader's feet."""
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass
