"""Import sources, one small class each, built from a DataVolume's `spec.source` by `from_spec`.

Every class has the same three methods (`info`, `transfer`, `close`; see `base.Source`).
`pvc` and `snapshot` belong to the cloner; `upload` sources are made by the upload server
from a request body.
"""

from __future__ import annotations

from typing import Callable
from urllib.parse import unquote, urlsplit

from controlplane.dv_spec import URL_SCHEMES, checksum_error, header_error

from .. import errors
from ..errors import ImportFailed
from .base import DirectRead, PeekStream, Source, SourceInfo
from .blank import BlankSource
from .http import FileSource, HttpSource
from .registry import RegistrySource
from .s3 import S3Source
from .upload import UploadSource

__all__ = [
    "from_spec", "Source", "SourceInfo", "DirectRead", "PeekStream",
    "parse_checksum", "HttpSource", "FileSource", "RegistrySource", "S3Source", "UploadSource", "BlankSource",
]

Lookup = Callable[[str], dict[str, str]]


def parse_checksum(value: object) -> str | None:
    """CDI's `checksum`: `md5|sha1|sha256|sha512:<hex>` (normalized to lower case); absent or
    an empty string means none. Anything else raises ImportFailed naming the accepted forms."""
    bad = checksum_error(value)
    if bad:
        raise ImportFailed(errors.INVALID_SOURCE, f"checksum {bad}")
    if not value:
        return None
    algo, _, digest = str(value).partition(":")
    return f"{algo.lower()}:{digest.lower()}"


def _checksum(spec: dict) -> str | None:
    return parse_checksum(spec.get("checksum"))


def _insecure(spec: dict) -> bool:
    """`insecureSkipVerify: true`: the server's certificate is not checked (a self-signed one)."""
    value = spec.get("insecureSkipVerify", False)
    if not isinstance(value, bool):
        raise ImportFailed(errors.INVALID_SOURCE, "insecureSkipVerify must be true or false")
    return value


def _lookup(fn: Lookup, name: str, what: str) -> dict[str, str]:
    try:
        data = fn(name)
    except LookupError:  # KeyError, or the control plane's "not found"
        data = None
    if data is None:
        raise ImportFailed(errors.INVALID_SOURCE, f"{what} {name!r} not found")
    return data


def _credentials(spec: dict, secret: Lookup) -> tuple[str, str] | None:
    name = spec.get("secretRef")
    if not name:
        return None
    data = _lookup(secret, name, "secret")
    user, password = data.get("accessKeyId"), data.get("secretKey")
    if not user and not password:  # CDI's endpoint-secret example: both keys left empty means no credentials
        return None
    if not user or password is None:
        raise ImportFailed(errors.INVALID_SOURCE, f"secret {name!r} needs the keys accessKeyId and secretKey")
    errors.register_secret(password)
    return user, password


def _ca_pems(spec: dict, configmap: Lookup) -> list[str]:
    name = spec.get("certConfigMap")
    if not name:
        return []
    data = _lookup(configmap, name, "configmap")
    if "ca.pem" in data:
        return [data["ca.pem"]]
    pems = [v for v in data.values() if "BEGIN CERTIFICATE" in v]
    if not pems:
        raise ImportFailed(errors.INVALID_SOURCE, f"configmap {name!r} holds no PEM certificate")
    return pems


def _headers(lines: list[str]) -> dict[str, str]:
    headers = {}
    for line in lines:
        bad = header_error(line)
        if bad:
            raise ImportFailed(errors.INVALID_SOURCE, f"extraHeaders entries {bad}")
        name, _, value = line.strip().partition(":")
        headers[name] = value.strip()
    return headers


def _secret_headers(spec: dict, secret: Lookup) -> dict[str, str]:
    """secretExtraHeaders: credentials like basic auth (kept out of messages, never sent to another origin)."""
    lines = []
    for name in spec.get("secretExtraHeaders") or []:
        values = [v for v in _lookup(secret, name, "secret").values() if isinstance(v, str)]
        for v in values:
            errors.register_secret(v.partition(":")[2].strip())
        lines += values
    return _headers(lines)


def from_spec(source: dict, *, secret: Lookup, configmap: Lookup, allow_file: bool = False) -> Source:
    """Build the source a DataVolume's `spec.source` describes (CDI's YAML, unchanged). A URL
    Python cannot parse (admission refuses it first; an object stored before may hold one) is an
    invalid source, never an internal error."""
    try:
        return _build(source, secret=secret, configmap=configmap, allow_file=allow_file)
    except ValueError as exc:
        raise ImportFailed(errors.INVALID_SOURCE, f"spec.source: not a valid URL: {exc}") from None


def _build(source: dict, *, secret: Lookup, configmap: Lookup, allow_file: bool) -> Source:
    if not isinstance(source, dict) or len(source) != 1:
        raise ImportFailed(errors.INVALID_SOURCE, "spec.source must name exactly one source kind")
    kind, spec = next(iter(source.items()))
    spec = spec or {}
    if kind in ("pvc", "snapshot"):
        raise ImportFailed(errors.NOT_SUPPORTED, f"{kind} sources (cloning) are not supported yet")
    if kind == "blank":
        return BlankSource()
    if kind == "upload":
        raise ImportFailed(errors.INVALID_SOURCE, "upload sources are filled through the upload server, not imported")
    if kind not in ("http", "registry", "s3"):
        raise ImportFailed(errors.INVALID_SOURCE, f"unknown source kind {kind!r}")
    url = spec.get("url")
    if not isinstance(url, str) or not url:
        raise ImportFailed(errors.INVALID_SOURCE, f"{kind} source needs a url")
    checksum = _checksum(spec)
    scheme = urlsplit(url).scheme.lower()
    if kind == "http":
        if scheme == "file":
            if not allow_file:
                raise ImportFailed(errors.INVALID_SOURCE, "file:// URLs are not allowed (only with the embedded mode's flag)")
            return FileSource(unquote(urlsplit(url).path), checksum=checksum)
        if scheme not in URL_SCHEMES["http"]:
            raise ImportFailed(errors.INVALID_SOURCE, f"unsupported URL scheme {scheme!r}: use http or https")
        from .httpclient import strip_userinfo

        clean, userinfo = strip_userinfo(url)
        return HttpSource(clean, auth=_credentials(spec, secret) or userinfo, ca_pems=_ca_pems(spec, configmap),
                          headers=_headers(list(spec.get("extraHeaders") or [])),
                          secret_headers=_secret_headers(spec, secret), checksum=checksum, insecure=_insecure(spec))
    if kind == "registry":
        if scheme not in URL_SCHEMES["registry"]:
            raise ImportFailed(errors.INVALID_SOURCE, f"unsupported registry URL scheme {scheme!r}: use docker://")
        return RegistrySource(url, auth=_credentials(spec, secret), ca_pems=_ca_pems(spec, configmap), checksum=checksum,
                              insecure_skip_verify=_insecure(spec))
    if scheme not in URL_SCHEMES["s3"]:
        raise ImportFailed(errors.INVALID_SOURCE, f"unsupported S3 URL scheme {scheme!r}: use https://endpoint/bucket/key or s3://")
    creds = _credentials(spec, secret)
    region = _lookup(secret, spec["secretRef"], "secret").get("region") if spec.get("secretRef") else None
    return S3Source(url, access_key=creds[0] if creds else None, secret_key=creds[1] if creds else None,
                    region=region, ca_pems=_ca_pems(spec, configmap), checksum=checksum)
