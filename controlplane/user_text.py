"""What a person reads when something failed: one bounded line, never a traceback, a gRPC
object's repr, a path inside the daemon's data directory, or a whole echoed input.

Every status, condition and event the control plane writes from an exception, and the
CLI's last-resort error line, go through `user_text`.
"""

from __future__ import annotations

import re
import sys

from csi.text import cut, hide_paths
from csi.text import shown as quoted
from host.command import CommandError

LIMIT = 400  # characters of one message
_INTERNAL = (AttributeError, TypeError, KeyError, IndexError, NameError, AssertionError, RecursionError)


def one_line(text: str, limit: int = LIMIT) -> str:
    """Whitespace and control characters folded to single spaces, cut at `limit`."""
    return cut(" ".join(re.sub(r"[\x00-\x1f\x7f]", " ", text).split()), limit)


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
    grpc = sys.modules.get("grpc")  # not loaded: no gRPC error can exist (a CLI starts faster without it)
    if grpc is not None and isinstance(exc, grpc.RpcError) and callable(getattr(exc, "code", None)):
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
