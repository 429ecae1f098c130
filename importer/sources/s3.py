"""The s3 source: an object in an S3-compatible store, fetched with SigV4-signed GETs.

URLs as CDI takes them: `https://<endpoint>/<bucket>/<key>` (path style), or
`s3://<bucket>/<key>` for AWS itself. Credentials come from the secretRef
(`accessKeyId`, `secretKey`). The small SigV4 signer below avoids a boto dependency; the
signature never leaves the request headers, so no credential reaches a URL, a log or qemu.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re
from typing import BinaryIO
from urllib.parse import quote, urlsplit

import requests

from .. import errors
from ..errors import ImportFailed
from ..formats import HEAD_SIZE
from .base import SourceInfo, read_head
from .httpclient import (MAX_ERROR_BODY, CABundle, ResponseStream, content_length, make_session, read_body,
                         request_errors, total_from_content_range)

UNSIGNED = "UNSIGNED-PAYLOAD"


def sigv4_headers(method: str, url: str, headers: dict[str, str], *, access_key: str, secret_key: str,
                  region: str, now: dt.datetime | None = None) -> dict[str, str]:
    """Headers (x-amz-date, x-amz-content-sha256, Authorization) for an AWS SigV4 request."""
    now = now or dt.datetime.now(dt.timezone.utc)
    amz_date, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
    parts = urlsplit(url)
    host = parts.netloc
    signed = {k.lower(): v.strip() for k, v in headers.items()}
    signed.update({"host": host, "x-amz-date": amz_date, "x-amz-content-sha256": UNSIGNED})
    names = sorted(signed)
    canonical = "\n".join([
        method,
        quote(parts.path or "/", safe="/-_.~"),
        parts.query,
        "".join(f"{k}:{signed[k]}\n" for k in names),
        ";".join(names),
        UNSIGNED,
    ])
    scope = f"{day}/{region}/s3/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = ("AWS4" + secret_key).encode()
    for part in (day, region, "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    auth = f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, SignedHeaders={';'.join(names)}, Signature={signature}"
    return {"x-amz-date": amz_date, "x-amz-content-sha256": UNSIGNED, "Authorization": auth}


def parse_s3_url(url: str) -> tuple[str, str]:
    """→ (object URL for path-style GETs, region)."""
    if url.startswith("s3://"):
        bucket, _, key = url[5:].partition("/")
        url = f"https://s3.amazonaws.com/{bucket}/{key}"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or parts.path.count("/") < 2 or parts.path.endswith("/"):
        raise ImportFailed(errors.INVALID_SOURCE, f"not an S3 object URL (want https://endpoint/bucket/key): {errors.scrub(url)}")
    m = re.match(r"s3[.-]([a-z0-9-]+)\.amazonaws\.com$", parts.hostname or "")
    return url, (m.group(1) if m else "us-east-1")


class S3Source:
    """One object in an S3 bucket."""

    def __init__(self, url: str, *, access_key: str | None, secret_key: str | None, region: str | None = None,
                 ca_pems: list[str] | None = None, checksum: str | None = None):
        self.url, default_region = parse_s3_url(url)
        self.region = region or default_region
        self.checksum = checksum
        self._keys = (access_key, secret_key) if access_key and secret_key else None
        if secret_key:
            errors.register_secret(secret_key)
        self._ca = CABundle(ca_pems or [])
        self._session = make_session(ca=self._ca)

    def _get(self, extra: dict[str, str]) -> requests.Response:
        headers = dict(extra)
        if self._keys:
            headers.update(sigv4_headers("GET", self.url, extra, access_key=self._keys[0],
                                         secret_key=self._keys[1], region=self.region))
        with request_errors(self.url):
            resp = self._session.get(self.url, headers=headers, stream=True, allow_redirects=False, timeout=(15, 60))
        if resp.status_code >= 300:
            body = read_body(resp, MAX_ERROR_BODY, self.url, cut=True).decode(errors="replace")
            code = re.search(r"<Code>([^<]{1,100})</Code>", body)
            code_text = code.group(1) if code else f"HTTP {resp.status_code}"
            where = errors.scrub(self.url)
            if resp.status_code == 404:
                raise ImportFailed(errors.NOT_FOUND, f"{where} was not found ({code_text})")
            if resp.status_code in (401, 403):
                raise ImportFailed(errors.UNAUTHORIZED, f"{where} refused access ({code_text}); check secretRef")
            raise ImportFailed(errors.TRANSFER_FAILED, f"{where} answered {code_text}")
        return resp

    def info(self) -> SourceInfo:
        resp = self._get({"Range": f"bytes=0-{HEAD_SIZE - 1}"})
        head = read_head(ResponseStream(resp, self.url), HEAD_SIZE)  # type: ignore[arg-type]
        size = total_from_content_range(resp) if resp.status_code == 206 else content_length(resp)
        resp.close()
        return SourceInfo(head, size, None, errors.scrub(self.url))

    def transfer(self) -> BinaryIO:
        return ResponseStream(self._get({}), self.url)  # type: ignore[return-value]

    def close(self) -> None:
        self._session.close()
        self._ca.close()
