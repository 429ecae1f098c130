"""One exception type for every CSI failure: a gRPC status code and a message a person can act on."""

from __future__ import annotations

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


def unavailable(message: str) -> CsiError:
    return CsiError(grpc.StatusCode.UNAVAILABLE, message)


# the text helpers live apart (csi/text.py), so a CLI can use them without loading gRPC
from csi.text import MAX_MESSAGE, SHOWN_CHARS, cut, hide_paths, private_root, public_message, shown  # noqa: E402,F401
