"""What a person reads when something failed: one bounded line, never a traceback, a gRPC
object's repr, a path inside the daemon's data directory, or a whole echoed input.

Every status, condition and event the control plane writes from an exception, and the
CLI's last-resort error line, go through `user_text`.
"""

from __future__ import annotations

import os
import re

import grpc

from pvlun.command import CommandError

LIMIT = 400  # characters of one message
_PRIVATE_ROOTS: set[str] = set()  # the daemon's own directories (its data dir, its pool)
_PATH_REST = r"(?=[/\s'\"`:;,()<>\[\]]|$)(?:/[^\s'\"`:;,()<>\[\]]*)?"  # the root itself or a path below it
_INTERNAL = (AttributeError, TypeError, KeyError, IndexError, NameError, AssertionError, RecursionError)


def one_line(text: str, limit: int = LIMIT) -> str:
    """Whitespace and control characters folded to single spaces, cut at `limit`."""
    text = " ".join(re.sub(r"[\x00-\x1f\x7f]", " ", text).split())
    return text if len(text) <= limit else text[:limit - 1].rstrip() + "…"


def quoted(value: object, limit: int = 60) -> str:
    """A value as a message may quote it: its repr, one line, never a whole input."""
    return one_line(repr(value), limit)


def private_root(path: str) -> None:
    """A directory of the daemon's: no message shows a path inside it (the daemon registers
    its data dir and pool at start; a person's own paths, `/dev/vda` in a mount flag, stay)."""
    for p in (path, os.path.realpath(path)):
        if p.rstrip("/"):
            _PRIVATE_ROOTS.add(p.rstrip("/"))


def hide_paths(text: str) -> str:
    """`/var/lib/pvlun/nodes/n1/staging/vol-1` → `…/vol-1`, for the registered roots."""
    for root in sorted(_PRIVATE_ROOTS, key=len, reverse=True):
        if root in text:
            text = re.sub(re.escape(root) + _PATH_REST,
                          lambda m: "…/" + os.path.basename(m.group(0).rstrip("/")), text)
    return text


def shown_text(text: str, limit: int = LIMIT) -> str:
    """Text from elsewhere (a tool, QEMU) as a status may show it: one line, no host paths."""
    return one_line(hide_paths(text), limit)


def tool_lines(stderr: str) -> str:
    """A tool's error output, shortened to what a person needs: its first lines and its last."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    if len(lines) > 4:
        lines = lines[:2] + [f"({len(lines) - 3} more lines)"] + lines[-1:]
    return "; ".join(lines)


def user_text(exc: BaseException, limit: int = LIMIT) -> str:
    """One line for a person: `CODE: details` for a gRPC error, the tool's own words for a
    failed command, the message alone (no type, no traceback) for anything else."""
    if isinstance(exc, grpc.RpcError) and callable(getattr(exc, "code", None)):
        code = exc.code()
        details = exc.details() if callable(getattr(exc, "details", None)) else ""
        text = f"{getattr(code, 'name', code)}: {details or 'no details'}"
    elif isinstance(exc, CommandError):
        tool = exc.argv[0].rsplit("/", 1)[-1] if exc.argv else "command"
        what = "timed out" if exc.returncode is None else f"exited {exc.returncode}"
        text = f"{tool} {what}" + (f": {tool_lines(exc.stderr)}" if exc.stderr else "")
    else:
        text = str(exc) if not isinstance(exc, KeyError) or not exc.args else f"missing {exc.args[0]!r}"
        if isinstance(exc, _INTERNAL):
            text = f"internal error: {text or type(exc).__name__}"
        text = text or "unexpected error (see the daemon's log)"
    return shown_text(text, limit)
