"""One exception type for every CSI failure: a gRPC status code and a message a person can act on."""

from __future__ import annotations

import re

import grpc


class CsiError(Exception):
    """Raised anywhere in the driver; the server turns it into the gRPC status."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> CsiError:
    return CsiError(grpc.StatusCode.INVALID_ARGUMENT, message)


def not_found(message: str) -> CsiError:
    return CsiError(grpc.StatusCode.NOT_FOUND, message)


def already_exists(message: str) -> CsiError:
    return CsiError(grpc.StatusCode.ALREADY_EXISTS, message)


def precondition(message: str) -> CsiError:
    return CsiError(grpc.StatusCode.FAILED_PRECONDITION, message)


def out_of_range(message: str) -> CsiError:
    return CsiError(grpc.StatusCode.OUT_OF_RANGE, message)


def exhausted(message: str) -> CsiError:
    return CsiError(grpc.StatusCode.RESOURCE_EXHAUSTED, message)


def aborted(message: str) -> CsiError:
    return CsiError(grpc.StatusCode.ABORTED, message)


# ---- what a caller may see of its own input and of the host ---------------------------

SHOWN_CHARS = 64  # a value from a request appears in a message at most this long
MAX_MESSAGE = 1024  # no status message is longer (gRPC carries it in a header of ~8 KiB)

# A LUN file in the pool, wherever the pool is (temporaries and deleted ones too): callers
# see its name, never the daemon's directories.
_LUN_PATH = re.compile(r"/[^\s'\"]*?/((?:\.tmp-)?(?:vol|snap)-[0-9a-f]{32}\.img)(?: \(deleted\))?")


def shown(value: object, limit: int = SHOWN_CHARS) -> str:
    """A request value as a message may show it: quoted with control characters escaped,
    cut to `limit` characters, with its length when it was cut. An ID of 100 KB must never
    come back whole (it would not even fit in the status header)."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def public_message(message: str) -> str:
    """The last word on any status message sent to a caller: pool paths become LUN names,
    and nothing longer than MAX_MESSAGE goes out."""
    message = _LUN_PATH.sub(r"\1", message)
    if len(message) > MAX_MESSAGE:
        tail = f"... ({len(message)} characters)"
        message = message[: MAX_MESSAGE - len(tail)] + tail
    return message
