"""What a caller may see of its own input and of the host: bounded, quoted, paths hidden.

No gRPC here: the CLI and the control plane format messages without loading it."""

from __future__ import annotations

import os
import re

# The one place for bounding and hiding: the driver's status messages use it, and so does
# the control plane's user_text (controlplane/user_text.py) for everything a person reads.

SHOWN_CHARS = 64  # a value from a request appears in a message at most this long
MAX_MESSAGE = 1024  # no status message is longer (gRPC carries it in a header of ~8 KiB)

# A LUN file in the pool, wherever the pool is (temporaries and deleted ones too): callers
# see its name, never the daemon's directories.
_LUN_PATH = re.compile(r"/[^\s'\"]*?/((?:\.tmp-)?(?:vol|snap)-[0-9a-f]{32}\.img)(?: \(deleted\))?")
_PRIVATE_ROOTS: set[str] = set()  # the daemon's own directories (its data dir, its pool)
_PATH_REST = r"(?=[/\s'\"`:;,()<>\[\]]|$)(?:/[^\s'\"`:;,()<>\[\]]*)?"  # the root itself or a path below it


def cut(text: str, limit: int) -> str:
    """Text of at most `limit` characters: cut, saying how long it was, when it is longer."""
    if len(text) <= limit:
        return text
    tail = f"… ({len(text)} characters)"
    return text[: max(0, limit - len(tail))].rstrip() + tail


def shown(value: object, limit: int = SHOWN_CHARS) -> str:
    """A value as a message may show it: quoted (its repr: control characters escaped), at
    most `limit` characters of it, with its length when it was cut. An ID of 100 KB must never
    come back whole (it would not even fit in the status header)."""
    if not isinstance(value, str):
        return cut(repr(value), limit)
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"


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


def public_message(message: str) -> str:
    """The last word on any status message sent to a caller: pool paths become LUN names,
    no path inside the daemon's own directories shows, and nothing longer than MAX_MESSAGE
    goes out."""
    return cut(hide_paths(_LUN_PATH.sub(r"\1", message)), MAX_MESSAGE)
