"""A client for the QEMU guest agent (qemu-ga) on the VM's agent channel (virt/qemu_args.py).

The protocol is QMP's shape as JSON lines: `{"execute": ..., "arguments": ...}` in,
`{"return": ...}` or `{"error": {"class", "desc"}}` out, one reply per command and no ids. A
reply that came too late for its command would answer the next one, so every command here is
preceded by `guest-sync-delimited` with a fresh random id: the agent answers it with a 0xFF
byte (never part of UTF-8 JSON) and then `{"return": id}`, and everything read before that is
stale and dropped. We send 0xFF first too, which resets the agent's parser after a partial line.

The guest is untrusted: the agent is a program of the guest's, and what it writes reaches us
through QEMU unchanged. Every call has a deadline; a line is at most MAX_LINE bytes and one
call reads at most MAX_READ; JSON is parsed strictly (no NaN, no duplicate keys, bounded
nesting by the line limit, errors caught); a reply of the wrong shape is no reply. Nothing the
guest writes can make a call hang past its deadline or raise anything but AgentUnavailable or
AgentRefused, whose texts quote at most 120 printable characters of the guest's words.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from typing import Any

MAX_LINE = 64 << 10  # a reply line: guest-info (the agent's command list) is ~10 KiB
MAX_READ = 1 << 20  # bytes one call reads, stale replies and garbage included
_DELIMITER = b"\xff"
_QUOTE = 120


class AgentUnavailable(RuntimeError):
    """No agent answered in time (none runs, the channel is closed, or it only wrote garbage).
    `sent`: the command itself went out (the agent answered the sync before it), so the agent
    may still carry it out."""

    def __init__(self, message: str, sent: bool = False):
        self.sent = sent
        super().__init__(message)


class AgentBusy(AgentUnavailable):
    """Another command of ours held the channel for the whole timeout."""


class AgentRefused(RuntimeError):
    """The agent answered the command with an error; the message quotes it (bounded)."""


def _quote(text: Any) -> str:
    """The guest's words, made safe to show: printable ASCII, at most _QUOTE characters."""
    text = "".join(c if " " <= c <= "~" else "?" for c in str(text))
    return text if len(text) <= _QUOTE else text[:_QUOTE] + "…"


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate key")
    return out


def parse_reply(line: bytes) -> dict | None:
    """One line as a strict JSON object, or None when it is not one (any way it fails)."""
    try:
        value = json.loads(line.decode("utf-8"), parse_constant=_no_constant, object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return None
    return value if isinstance(value, dict) else None


class GuestAgent:
    """One persistent connection to the agent channel's unix socket; thread-safe (one command at
    a time). QEMU accepts a single client on the channel, so a VM has one GuestAgent."""

    def __init__(self, path: str):
        self.path = path
        self._sock: socket.socket | None = None
        self._buf = bytearray()
        self._skipping = False  # inside a line longer than MAX_LINE
        self._lock = threading.Lock()

    # ------------------------------------------------------------ commands

    def execute(self, command: str, arguments: dict | None = None, timeout: float = 5.0) -> Any:
        """Run one agent command and return its `return` value. AgentUnavailable when no valid
        reply arrives within `timeout` seconds (sync included); AgentRefused for an error reply."""
        deadline = time.monotonic() + timeout
        if not self._lock.acquire(timeout=max(0.0, timeout)):
            raise AgentBusy(f"{command}: the agent channel stayed busy for {timeout:g}s")
        sent = False
        try:
            budget = [MAX_READ]
            self._connect(deadline)
            self._sync(deadline, budget)
            message = {"execute": command, **({"arguments": arguments} if arguments is not None else {})}
            sent = True  # from here on the agent may carry it out, even if its reply never comes
            self._send(json.dumps(message).encode() + b"\n", deadline)
            reply = self._read_reply(deadline, budget)
        except (OSError, AgentUnavailable) as exc:
            self._disconnect_if_broken(exc)
            raise AgentUnavailable(f"{command}: {exc}", sent=sent) from None
        finally:
            self._lock.release()
        if "error" in reply:
            error = reply["error"] if isinstance(reply["error"], dict) else {}
            raise AgentRefused(f"{command}: {_quote(error.get('desc') or error.get('class') or 'error')}")
        return reply["return"]

    def ping(self, timeout: float = 1.0, busy: bool | None = False) -> bool | None:
        """True when the agent answers guest-ping within `timeout` seconds (a refusal is an
        answer too: an agent that blocks the command is there); `busy` when another command of
        ours held the channel all that time."""
        try:
            self.execute("guest-ping", timeout=timeout)
        except AgentRefused:
            pass
        except AgentBusy:
            return busy
        except AgentUnavailable:
            return False
        return True

    def close(self) -> None:
        with self._lock:
            self._drop()

    # ------------------------------------------------------------ the wire

    def _connect(self, deadline: float) -> None:
        if self._sock is not None:
            return
        wait = min(1.0, self._remaining(deadline))
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(wait)
            sock.connect(self.path)
        except OSError as exc:
            sock.close()
            raise AgentUnavailable(f"no agent channel ({os.strerror(exc.errno) if exc.errno else exc})") from None
        self._sock, self._buf, self._skipping = sock, bytearray(), False

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock, self._buf, self._skipping = None, bytearray(), False

    def _disconnect_if_broken(self, exc: BaseException) -> None:
        """A closed or failed connection is made again next time; a mere timeout keeps it (the
        next sync skips whatever arrives late)."""
        if isinstance(exc, OSError) and not isinstance(exc, TimeoutError):
            self._drop()

    def _send(self, data: bytes, deadline: float) -> None:
        assert self._sock is not None
        view = memoryview(data)
        while view:
            self._sock.settimeout(self._remaining(deadline))
            try:
                view = view[self._sock.send(view):]
            except TimeoutError:
                raise AgentUnavailable("no agent reads the channel") from None

    def _receive(self, deadline: float, budget: list[int]) -> None:
        """Append what the guest wrote next to the buffer, within the deadline and read budget."""
        assert self._sock is not None
        if budget[0] <= 0:
            raise AgentUnavailable(f"no reply in the first {MAX_READ} bytes the guest wrote")
        self._sock.settimeout(self._remaining(deadline))
        try:
            data = self._sock.recv(min(65536, budget[0]))
        except TimeoutError:
            raise AgentUnavailable("no reply in time") from None
        if not data:
            self._drop()
            raise AgentUnavailable("the agent channel closed")
        budget[0] -= len(data)
        self._buf += data

    @staticmethod
    def _remaining(deadline: float) -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AgentUnavailable("no reply in time")
        return left

    def _read_line(self, deadline: float, budget: list[int]) -> bytes | None:
        """The next line (without its newline), or None for one longer than MAX_LINE: that one
        is dropped as it arrives, so the buffer never holds more than MAX_LINE bytes of it."""
        while True:
            end = self._buf.find(b"\n")
            if end >= 0:
                line = bytes(self._buf[:end])
                del self._buf[:end + 1]
                skipped, self._skipping = self._skipping, False
                return None if skipped or len(line) > MAX_LINE else line
            if len(self._buf) > MAX_LINE:
                self._buf.clear()
                self._skipping = True
            self._receive(deadline, budget)

    def _sync(self, deadline: float, budget: list[int]) -> None:
        """Send guest-sync-delimited and drop everything up to its answer."""
        token = secrets.randbelow(1 << 31)
        self._send(_DELIMITER + json.dumps({"execute": "guest-sync-delimited",
                                            "arguments": {"id": token}}).encode() + b"\n", deadline)
        while True:
            start = self._buf.find(_DELIMITER)
            if start < 0:
                self._buf.clear()
                self._receive(deadline, budget)
                continue
            del self._buf[:start + 1]
            self._skipping = False  # a line starts after the delimiter
            line = self._read_line(deadline, budget)
            reply = parse_reply(line.lstrip(_DELIMITER)) if line is not None else None
            if reply is not None and reply.get("return") == token and type(reply["return"]) is int:
                return

    def _read_reply(self, deadline: float, budget: list[int]) -> dict:
        """The command's reply: the next non-empty line, which must be a QGA reply."""
        while True:
            line = self._read_line(deadline, budget)
            if line is not None and not line.strip():
                continue
            reply = parse_reply(line) if line is not None else None
            if reply is None or not (("return" in reply) ^ ("error" in reply)):
                raise AgentUnavailable("the agent's reply is not a guest agent reply")
            return reply
