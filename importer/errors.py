"""Import failures a person can act on, and the scrubbing that keeps credentials out of them.

Every failure of the data plane is an `ImportFailed(reason, message)`: `reason` is a short
CamelCase word the control plane copies into the DataVolume's condition (as CDI does), and
`message` is a sentence for a person. Messages pass through `scrub` so that URLs with
userinfo, signed query strings and bearer tokens never reach a status or a log.
"""

from __future__ import annotations

import re
from typing import Iterable

from controlplane.user_text import one_line, tool_lines

# Reasons (CDI-like). Callers may switch on these.
INVALID_SOURCE = "InvalidSource"          # malformed spec, unsupported scheme or source kind
NOT_SUPPORTED = "NotSupported"            # pvc/snapshot until the cloner lands
NOT_FOUND = "NotFound"                    # HTTP 404, missing object, missing registry tag
UNAUTHORIZED = "Unauthorized"             # 401/403 from the server
UNREACHABLE = "Unreachable"               # connection refused, DNS failure, timeout
UNTRUSTED_CERTIFICATE = "UntrustedCertificate"
TOO_MANY_REDIRECTS = "TooManyRedirects"
TRANSFER_FAILED = "TransferFailed"        # server error or connection dropped mid-transfer
TRANSFER_STALLED = "TransferStalled"      # no byte arrived for the stall timeout
CANCELLED = "ImportCancelled"             # the DataVolume was deleted (or the daemon stops) mid-import
CHECKSUM_MISMATCH = "ChecksumMismatch"
IMAGE_TOO_LARGE = "ImageTooLarge"         # virtual size (or decompressed stream) exceeds the target
BACKING_FILE = "BackingFileRefused"       # qcow2 backing file / vmdk external extents
DATA_FILE = "ExternalDataFileRefused"     # qcow2 data-file
INVALID_IMAGE = "InvalidImage"            # truncated, corrupt, unreadable image
UPLOAD_INTERRUPTED = "UploadInterrupted"  # the client went away before the body was complete
INTERNAL = "InternalError"


class ImportFailed(Exception):
    """The import cannot succeed as asked; nothing of it is left in the target."""

    def __init__(self, reason: str, message: str):
        self.reason = reason
        self.message = scrub(message)
        super().__init__(f"{reason}: {self.message}")


class DeclaredTooLarge(ImportFailed):
    """The source declares more bytes than the target can hold: refused before a byte past its
    head was read or anything written (an upload may be sent again, smaller)."""

    def __init__(self, message: str):
        super().__init__(IMAGE_TOO_LARGE, message)


_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s@]*@")
_SECRET_QUERY = re.compile(
    r"(?i)(?P<key>[?&](?:x-amz-[a-z-]*|signature|sig|token|access_token|password|awsaccesskeyid|"
    r"x-goog-[a-z-]*|key|x-kubevirt-export-token)=)[^&\s\"']*"
)
_BEARER = re.compile(r"(?i)(bearer|basic)\s+[A-Za-z0-9._~+/=-]+")

_known_secrets: set[str] = set()


def register_secret(value: str) -> None:
    """Remember a credential value so that `scrub` removes it wherever it shows up."""
    if value and len(value) >= 4:
        _known_secrets.add(value)


def scrub(text: str, secrets: Iterable[str] = ()) -> str:
    """Remove userinfo from URLs, signed query parameters, auth headers and known secrets."""
    text = _USERINFO.sub(lambda m: m.group("scheme") + "***@", text)
    text = _SECRET_QUERY.sub(lambda m: m.group("key") + "***", text)
    text = _BEARER.sub(lambda m: m.group(1) + " ***", text)
    for value in sorted({*_known_secrets, *secrets}, key=len, reverse=True):
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


def tool_text(stderr: str, limit: int = 600) -> str:
    """A tool's error output as controlplane.user_text shortens it, on one line, without credentials."""
    return scrub(one_line(tool_lines(stderr), limit))
