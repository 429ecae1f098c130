"""HTTP plumbing shared by the http, registry and s3 sources.

One place decides: TLS verification (system CAs plus the certConfigMap's), bounded
redirects, no proxy or netrc from the environment, and the mapping of every failure
(404, refused connection, untrusted certificate, too many redirects) to an ImportFailed
whose message names the URL without credentials.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from typing import BinaryIO, Iterator
from urllib.parse import urlsplit, urlunsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection

from .. import errors, transfer_watch
from ..errors import ImportFailed

MAX_REDIRECTS = 10
TIMEOUT = (15, 60)  # connect, read (seconds)
CHUNK = 4 << 20
MAX_DOCUMENT = 4 << 20  # a manifest, an image config, a token: far more than any real one
MAX_ERROR_BODY = 64 << 10  # of an error response, kept for its message
HEADER_NUMBER = re.compile(r"[0-9]{1,20}")  # ASCII digits only: str.isdigit() takes '²', int() then fails


def strip_userinfo(url: str) -> tuple[str, tuple[str, str] | None]:
    """Split `scheme://user:pass@host/...` into a clean URL and the credentials."""
    parts = urlsplit(url)
    if parts.username is None:
        return url, None
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    creds = (requests.utils.unquote(parts.username), requests.utils.unquote(parts.password or ""))
    for value in creds:
        errors.register_secret(value)
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment)), creds


class CABundle:
    """A temporary PEM file with the system CAs plus the certConfigMap's certificates.

    World-readable (certificates are public; only root may write it): nbdkit reads it as the
    unprivileged sandbox user."""

    def __init__(self, pems: list[str]):
        self.custom = bool(pems)
        self.path: str | None = None
        if pems:
            fd, self.path = tempfile.mkstemp(prefix="pvlun-ca-", suffix=".pem")
            os.fchmod(fd, 0o644)
            system = requests.utils.DEFAULT_CA_BUNDLE_PATH
            with os.fdopen(fd, "w") as out:
                if system and os.path.exists(system):
                    with open(system) as f:
                        out.write(f.read())
                for pem in pems:
                    out.write("\n" + pem.strip() + "\n")

    @property
    def verify(self) -> str | bool:
        return self.path or True

    def close(self) -> None:
        if self.path:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            self.path = None


class _Watched:
    """A connection whose socket the running import's watch can shut down (stall, cancel)."""

    def _new_conn(self):
        sock = super()._new_conn()  # type: ignore[misc]
        _watch_socket(sock)  # from here on the TLS handshake and the header wait are interruptible
        return sock

    def connect(self) -> None:
        super().connect()  # type: ignore[misc]
        _watch_socket(self.sock)  # type: ignore[attr-defined]  # HTTPS: the TLS socket that wraps the raw one


class _WatchedHTTPConnection(_Watched, HTTPConnection):
    pass


class _WatchedHTTPSConnection(_Watched, HTTPSConnection):
    pass


class _HTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _HTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


def _watch_socket(sock) -> None:
    watch = transfer_watch.current()
    if watch is not None and sock is not None:
        watch.add_socket(sock)


# Verification is off only where a DataVolume says `insecureSkipVerify: true`: asked for, so
# urllib3's warning on every request would say nothing the user does not know.
urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)


def origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) of a URL, the port spelled out: what credentials are given for."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:
        port = None
    return scheme, (parts.hostname or "").lower(), port or {"http": 80, "https": 443}.get(scheme)


class _OriginSession(requests.Session):
    """Credentials go only to the origin they were given for: a redirect to another scheme,
    host or port drops the Authorization header and the secret headers (requests alone keeps
    them on an http->https redirect, and keeps every header but Authorization)."""

    secret_headers: tuple[str, ...] = ()

    def rebuild_auth(self, prepared_request, response) -> None:
        super().rebuild_auth(prepared_request, response)
        if origin(prepared_request.url) != origin(response.request.url):
            for name in ("Authorization", *self.secret_headers):
                prepared_request.headers.pop(name, None)


def make_session(*, ca: CABundle, auth: tuple[str, str] | None = None, headers: dict[str, str] | None = None,
                 secret_headers: tuple[str, ...] = (), insecure: bool = False) -> requests.Session:
    """A session for one source; `insecure` (the source's insecureSkipVerify) accepts any
    server certificate, as CDI's importer does then. `secret_headers` (names among `headers`)
    are credentials: never sent past a redirect to another origin."""
    session = _OriginSession()
    session.secret_headers = secret_headers
    for prefix in ("http://", "https://"):
        adapter = HTTPAdapter()
        adapter.poolmanager.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}
        session.mount(prefix, adapter)
    session.trust_env = False  # no proxies, no ~/.netrc, no REQUESTS_CA_BUNDLE from the environment
    session.max_redirects = MAX_REDIRECTS
    session.verify = False if insecure else ca.verify
    session.auth = auth
    session.headers.update({"Accept-Encoding": "identity", "User-Agent": "pvlun-importer"})
    session.headers.update(headers or {})
    return session


@contextlib.contextmanager
def request_errors(url: str) -> Iterator[None]:
    """Turn requests' exceptions into ImportFailed with an actionable reason."""
    where = errors.scrub(url)
    try:
        yield
    except ImportFailed:
        raise
    except requests.exceptions.SSLError as exc:
        text = str(exc)
        if "CERTIFICATE_VERIFY_FAILED" in text or "certificate" in text.lower():
            raise ImportFailed(
                errors.UNTRUSTED_CERTIFICATE,
                f"the certificate of {where} is not trusted (add its CA to certConfigMap)",
            ) from None
        raise ImportFailed(errors.UNREACHABLE, f"TLS handshake with {where} failed") from None
    except requests.exceptions.TooManyRedirects:
        raise ImportFailed(errors.TOO_MANY_REDIRECTS, f"{where} redirected more than {MAX_REDIRECTS} times") from None
    except (requests.exceptions.InvalidSchema, requests.exceptions.MissingSchema, requests.exceptions.InvalidURL) as exc:
        raise ImportFailed(errors.INVALID_SOURCE, f"{where} led to an unsupported URL: {errors.scrub(str(exc))}") from None
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
        if isinstance(exc.__context__, urllib3.exceptions.ProtocolError) or "IncompleteRead" in str(exc):
            raise ImportFailed(errors.TRANSFER_FAILED, f"the connection to {where} broke off during the transfer") from None
        raise ImportFailed(errors.UNREACHABLE, f"cannot reach {where}: connection failed or timed out") from None
    except (urllib3.exceptions.HTTPError, requests.exceptions.RequestException, OSError) as exc:
        raise ImportFailed(errors.TRANSFER_FAILED, f"transfer from {where} failed: {type(exc).__name__}") from None


def check_status(resp: requests.Response, what: str) -> None:
    """Raise ImportFailed for an HTTP error status."""
    if resp.status_code < 400:
        return
    where = errors.scrub(what)
    if resp.status_code in (404, 410):
        raise ImportFailed(errors.NOT_FOUND, f"{where} was not found (HTTP {resp.status_code})")
    if resp.status_code in (401, 403):
        raise ImportFailed(errors.UNAUTHORIZED, f"{where} refused access (HTTP {resp.status_code}); check secretRef")
    raise ImportFailed(errors.TRANSFER_FAILED, f"{where} answered HTTP {resp.status_code} {resp.reason}")


class ResponseStream:
    """Body of a streamed response as a plain reader; failures mid-way become ImportFailed.

    Under a transfer watch (an import job), every wait for bytes is watched: a source that
    sends nothing for the stall timeout, or a cancelled import, ends the read at once.
    """

    def __init__(self, resp: requests.Response, url: str):
        self._resp = resp
        self._url = url
        self._watch = transfer_watch.current()
        conn = resp.raw.connection if self._watch is not None else None
        if conn is not None and conn.sock is not None:
            conn.sock.settimeout(None)  # the watch decides when waiting is too long, not a socket timeout

    def read(self, n: int = -1) -> bytes:
        try:
            data = self._read(CHUNK if n is None or n < 0 else n)
        except ImportFailed:
            self._check()  # a read the watch broke off says why
            raise
        self._check()  # a socket shut down by the watch can look like the body's end
        return data

    def _check(self) -> None:
        if self._watch is not None:
            self._watch.check(self._url)

    def _read(self, want: int) -> bytes:
        """What has arrived, up to `want` bytes, as a raw socket read would (short reads keep
        the watch's view of progress exact and spare a copy)."""
        with request_errors(self._url):
            try:
                with self._watch.waiting() if self._watch is not None else contextlib.nullcontext():
                    return self._resp.raw.read1(want, decode_content=False)
            except (urllib3.exceptions.ProtocolError, urllib3.exceptions.ReadTimeoutError):
                raise ImportFailed(errors.TRANSFER_FAILED,
                                   f"the connection to {errors.scrub(self._url)} broke off during the transfer") from None

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._resp.close()


def read_body(resp: requests.Response, limit: int, what: str, *, cut: bool = False) -> bytes:
    """The body of a streamed response, at most `limit` bytes: a hostile server cannot fill the
    daemon's memory. More is refused (INVALID_SOURCE, naming `what`), or with `cut` dropped
    (an error body kept only for its message)."""
    stream = ResponseStream(resp, resp.url or what)
    data = bytearray()
    try:
        while len(data) <= limit:
            chunk = stream.read(min(CHUNK, limit + 1 - len(data)))
            if not chunk:
                return bytes(data)
            data += chunk
    finally:
        resp.close()
    if cut:
        return bytes(data[:limit])
    raise ImportFailed(errors.INVALID_SOURCE, f"{errors.scrub(what)} sent more than {limit >> 10} KiB "
                                              f"where a small document belongs")


def header_number(value: str | None) -> int | None:
    """A header's number (Content-Length and the like) if it is one: ASCII digits only."""
    return int(value) if value and HEADER_NUMBER.fullmatch(value) else None


def content_length(resp: requests.Response) -> int | None:
    return None if resp.headers.get("Content-Encoding") else header_number(resp.headers.get("Content-Length"))


def total_from_content_range(resp: requests.Response) -> int | None:
    return header_number(resp.headers.get("Content-Range", "").rpartition("/")[2])


BinaryStream = BinaryIO
