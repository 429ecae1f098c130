"""Send a disk image to the upload endpoint (what `pvlun image-upload` does, like virtctl)."""

from __future__ import annotations

import os
from typing import Callable, Iterator

import requests

from . import errors
from .errors import ImportFailed

CHUNK = 1 << 20


class _FileBody:
    """An iterable body of known length (so requests sends Content-Length, 1 MiB at a time)."""

    def __init__(self, path: str, progress: Callable[[float], None] | None):
        self.path, self.size, self.progress = path, os.path.getsize(path), progress

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[bytes]:
        sent = 0
        with open(self.path, "rb") as f:
            while chunk := f.read(CHUNK):
                sent += len(chunk)
                if self.progress:
                    self.progress(100.0 * sent / self.size if self.size else 100.0)
                yield chunk


def upload_image(url: str, token: str, path: str, *, ca_file: str | None = None,
                 progress: Callable[[float], None] | None = None, timeout: float = 3600) -> str:
    """POST `path` to the upload endpoint; return the server's message or raise ImportFailed."""
    if not url.rstrip("/").endswith("/upload"):
        url = url.rstrip("/") + "/v1beta1/upload"
    body = _FileBody(path, progress)
    headers = {"Authorization": f"Bearer {token}"}
    try:
        # Pre-flight: a refused token or a DataVolume not waiting is reported before any byte is sent.
        check = requests.get(url, headers=headers, timeout=(15, 60), verify=ca_file or True)
        if check.status_code >= 400:
            resp = check
        else:
            resp = requests.post(
                url, data=body, timeout=(15, timeout), verify=ca_file or True,
                headers={**headers, "Content-Type": "application/octet-stream"},
            )
    except requests.exceptions.SSLError as exc:
        if "CERTIFICATE_VERIFY_FAILED" in str(exc):
            raise ImportFailed(errors.UNTRUSTED_CERTIFICATE, f"the upload endpoint {url} is not trusted (pass its CA)") from None
        # the server refused the upload and closed the connection while the body was still being sent
        raise ImportFailed(errors.TRANSFER_FAILED, f"the upload endpoint {url} closed the connection") from None
    except requests.exceptions.RequestException as exc:
        raise ImportFailed(errors.UNREACHABLE, f"upload to {url} failed: {type(exc).__name__}") from None
    text = resp.text.strip()
    if resp.status_code == 401:
        raise ImportFailed(errors.UNAUTHORIZED, f"the upload endpoint refused the token: {text}")
    if resp.status_code >= 400:
        reason, _, message = text.partition(": ")
        if reason.isalpha():
            raise ImportFailed(reason, message)
        raise ImportFailed(errors.TRANSFER_FAILED, f"upload failed (HTTP {resp.status_code}): {text}")
    return text
