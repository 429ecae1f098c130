"""The registry source: a containerDisk (the disk file under `disk/` in an OCI or Docker image).

Pulled with the registry v2 API: manifest (an index or manifest list picks linux/amd64),
then the layers from the top down until one holds `disk/<file>`. Token auth (the
`WWW-Authenticate: Bearer realm=...` dance) and basic auth both use the secretRef's
credentials. Every blob is checked against its digest as it streams; the disk file's bytes
go straight on into the pipeline, never unpacked to disk first.
"""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
from typing import BinaryIO

import zstandard

from .. import errors
from ..errors import ImportFailed
from ..formats import HEAD_SIZE
from ..streams import TAR_ERRORS, open_tar_stream
from .base import PeekStream, SourceInfo, read_head
from .httpclient import MAX_DOCUMENT, CABundle, ResponseStream, check_status, make_session, read_body, request_errors

MANIFEST_TYPES = ", ".join([
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
])
_INDEX_TYPES = ("application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.list.v2+json")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_LAYER_ERRORS = (*TAR_ERRORS, zstandard.ZstdError)


def parse_reference(url: str) -> tuple[str, str, str]:
    """`docker://host[:port]/repo[:tag|@digest]` → (registry host, repository, reference)."""
    rest = url[len("docker://"):]
    first, _, path = rest.partition("/")
    if not path or not ("." in first or ":" in first or first == "localhost"):
        first, path = "registry-1.docker.io", rest if "/" in rest else f"library/{rest}"
    if "@" in path:
        repo, ref = path.split("@", 1)
    else:
        name, _, tag = path.rpartition(":")
        repo, ref = (name, tag) if name and "/" not in tag else (path, "latest")
    if not re.fullmatch(r"[a-z0-9]+(?:[._/-][a-z0-9]+)*", repo) or not re.fullmatch(r"[\w][\w.:-]{0,127}|sha256:[0-9a-f]{64}", ref):
        raise ImportFailed(errors.INVALID_SOURCE, f"not a valid image reference: {errors.scrub(url)}")
    return first, repo, ref


class _BlobReader:
    """Reads a blob, hashing it, up to the size its manifest declares; at that end the digest
    must match the manifest's, and the blob must end (a server sending more is not read on)."""

    def __init__(self, stream: ResponseStream, digest: str, size: int):
        self._stream = stream
        self._digest = digest
        self._left = size
        self._hash = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        want = self._left if n is None or n < 0 else min(n, self._left)
        data = self._stream.read(want) if want else b""
        if data:
            self._left -= len(data)
            self._hash.update(data)
        elif self._left or "sha256:" + self._hash.hexdigest() != self._digest or self._stream.read(1):
            raise ImportFailed(errors.CHECKSUM_MISMATCH, f"layer {self._digest[:19]}… does not match the digest "
                                                         f"and size its manifest declares")
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass

    def close(self) -> None:
        self._stream.close()


class _DiskMemberStream:
    """The disk file inside a layer; at its end the rest of the layer is read for the digest."""

    def __init__(self, member: BinaryIO, tar: tarfile.TarFile, blob: _BlobReader):
        self._member, self._tar, self._blob = member, tar, blob
        self._done = False

    def read(self, n: int = -1) -> bytes:
        try:
            data = self._member.read(n)
        except _LAYER_ERRORS as exc:
            raise ImportFailed(errors.INVALID_IMAGE, f"the layer holding the disk is not a valid tar: {exc}") from None
        if not data and not self._done:
            self._done = True
            self._blob.drain()
        return data

    def close(self) -> None:
        self._tar.close()
        self._blob.close()


class RegistrySource:
    """A containerDisk image in an OCI/Docker registry."""

    def __init__(self, url: str, *, auth: tuple[str, str] | None = None, ca_pems: list[str] | None = None,
                 checksum: str | None = None, insecure_http: bool = False, insecure_skip_verify: bool = False):
        self.url = url
        self.checksum = checksum
        self.host, self.repo, self.ref = parse_reference(url)
        self._base = f"{'http' if insecure_http else 'https'}://{self.host}/v2/{self.repo}"
        self._auth = auth
        self._ca = CABundle(ca_pems or [])
        self._session = make_session(ca=self._ca, insecure=insecure_skip_verify)
        self._token: str | None = None
        self._basic = False
        self._pending: PeekStream | None = None

    # -- registry API ------------------------------------------------------------------
    def _get(self, url: str, *, accept: str | None = None):
        """A streamed GET (bodies are read bounded or as a stream, never whole)."""
        headers = {"Accept": accept} if accept else {}
        for _ in range(2):
            if self._token:
                headers["Authorization"] = f"Bearer {self._token}"
            with request_errors(url):
                resp = self._session.get(url, headers=headers, stream=True, timeout=(15, 60),
                                         auth=self._auth if self._token is None and self._basic else None)
            if resp.status_code != 401 or self._token is not None:
                break
            challenge = resp.headers.get("WWW-Authenticate", "")
            resp.close()
            if challenge.lower().startswith("bearer "):
                self._token = self._fetch_token(challenge)
            elif challenge.lower().startswith("basic") and self._auth and not self._basic:
                self._basic = True
            else:
                break
        check_status(resp, url)
        return resp

    def _fetch_token(self, challenge: str) -> str:
        params = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
        realm = params.pop("realm", "")
        if not realm.startswith(("https://", "http://")):
            raise ImportFailed(errors.UNAUTHORIZED, "the registry asked for token auth without a usable realm")
        params.setdefault("scope", f"repository:{self.repo}:pull")
        with request_errors(realm):
            resp = self._session.get(realm, params=params, auth=self._auth, stream=True, timeout=(15, 60))
        check_status(resp, f"token service {realm}")
        try:
            body = json.loads(read_body(resp, MAX_DOCUMENT, f"the token service {realm}"))
        except ValueError:
            body = None
        token = (body.get("token") or body.get("access_token")) if isinstance(body, dict) else None
        if not token or not isinstance(token, str):
            raise ImportFailed(errors.UNAUTHORIZED, "the registry's token service returned no token")
        errors.register_secret(token)
        return token

    def _fetch_manifest(self, ref: str) -> tuple[bytes, dict, str]:
        """(the manifest's bytes as served, at most MAX_DOCUMENT, parsed, its Content-Type)."""
        resp = self._get(f"{self._base}/manifests/{ref}", accept=MANIFEST_TYPES)
        body = read_body(resp, MAX_DOCUMENT, f"{self.url}'s manifest")
        try:
            manifest = json.loads(body)
        except ValueError:
            manifest = None
        if not isinstance(manifest, dict):
            raise ImportFailed(errors.INVALID_SOURCE, f"{errors.scrub(self.url)}: the registry's manifest is not JSON")
        return body, manifest, resp.headers.get("Content-Type", "")

    def _manifest(self) -> list[tuple[str, int]]:
        """The (digest, size) of the image's layers, bottom first (every field checked: the registry is hostile)."""
        _, manifest, ctype = self._fetch_manifest(self.ref)
        mtype = manifest.get("mediaType") or ctype
        if mtype in _INDEX_TYPES or "manifests" in manifest:
            entries = [m for m in self._list(manifest, "manifests") if isinstance(m, dict)]
            chosen = next((m for m in entries if _platform(m) == ("linux", "amd64")), entries[0] if entries else None)
            if chosen is None:
                raise ImportFailed(errors.INVALID_SOURCE, f"{errors.scrub(self.url)}: the image index lists no manifests")
            _, manifest, _ = self._fetch_manifest(self._digest(chosen))
        layers = [(self._digest(layer), self._size(layer)) for layer in self._list(manifest, "layers")]
        if not layers:
            raise ImportFailed(errors.INVALID_SOURCE, f"{errors.scrub(self.url)}: the manifest has no layers")
        return layers

    def _list(self, manifest: dict, key: str) -> list:
        value = manifest.get(key) or []
        if not isinstance(value, list):
            raise ImportFailed(errors.INVALID_SOURCE, f"{errors.scrub(self.url)}: the manifest's {key} is not a list")
        return value

    def _digest(self, entry: object) -> str:
        digest = entry.get("digest") if isinstance(entry, dict) else None
        if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
            raise ImportFailed(errors.INVALID_SOURCE, f"{errors.scrub(self.url)}: the manifest names no sha256 digest "
                                                      f"where it must")
        return digest

    def _size(self, entry: dict) -> int:
        size = entry.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ImportFailed(errors.INVALID_SOURCE, f"{errors.scrub(self.url)}: the manifest declares no size "
                                                      f"for a layer")
        return size

    def _open_layer(self, digest: str, size: int) -> tuple[tarfile.TarFile, _BlobReader]:
        resp = self._get(f"{self._base}/blobs/{digest}")
        blob = _BlobReader(ResponseStream(resp, self.url), digest, size)
        magic = read_head(blob, 4)  # type: ignore[arg-type]
        raw = PeekStream(magic, blob)  # type: ignore[arg-type]
        if magic == b"\x28\xb5\x2f\xfd":
            stream: BinaryIO = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)  # type: ignore[assignment]
        else:
            stream = raw  # type: ignore[assignment]
        try:
            return open_tar_stream(stream, "r|*"), blob
        except _LAYER_ERRORS:
            raise ImportFailed(errors.INVALID_IMAGE, f"layer {digest[:19]}… is not a tar archive") from None

    def image_digest(self) -> str:
        """The digest of what the reference names now: of its manifest (its index, for a
        multi-platform image), hashed here, so a registry cannot claim one it did not send.
        A DataImportCron compares it to see a new image; `url@digest` pulls exactly that one."""
        body, _, _ = self._fetch_manifest(self.ref)  # a manifest, not an error page
        return "sha256:" + hashlib.sha256(body).hexdigest()

    # -- Source interface --------------------------------------------------------------
    def info(self) -> SourceInfo:
        for digest, size in reversed(self._manifest()):
            tar, blob = self._open_layer(digest, size)
            try:
                for member in tar:
                    name = member.name.lstrip("./").lstrip("/")
                    if member.isfile() and name.startswith("disk/") and "/" not in name[5:]:
                        fileobj = tar.extractfile(member)
                        stream = _DiskMemberStream(fileobj, tar, blob)  # type: ignore[arg-type]
                        head = read_head(stream, HEAD_SIZE)  # type: ignore[arg-type]
                        self._pending = PeekStream(head, stream)  # type: ignore[arg-type]
                        return SourceInfo(head, member.size, None, errors.scrub(self.url))
                blob.drain()
            except _LAYER_ERRORS as exc:
                raise ImportFailed(errors.INVALID_IMAGE, f"layer {digest[:19]}… is not a valid tar: {exc}") from None
            finally:
                if self._pending is None:
                    tar.close()
                    blob.close()
        raise ImportFailed(errors.INVALID_SOURCE, f"{errors.scrub(self.url)} holds no disk file under disk/ (not a containerDisk)")

    # -- one image, read as a whole (containerDisk volumes, kernelBoot: importer/container_disks.py)
    def pin(self) -> str:
        """The digest the reference names now: sha256 of the manifest (or index) as served. Later
        reads use it, so a tag moved meanwhile cannot mix two images; a digest reference that the
        registry answers with other bytes is refused."""
        body, _, _ = self._fetch_manifest(self.ref)
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if self.ref.startswith("sha256:") and digest != self.ref:
            raise ImportFailed(errors.CHECKSUM_MISMATCH, f"{errors.scrub(self.url)}: the registry served a manifest "
                                                         f"that does not match the digest asked for")
        self.ref = digest
        return digest

    def open_file(self, path: str | None, limit: int) -> tuple[str, BinaryIO]:
        """The regular file at `path` in the image (None: the one file under disk/, a
        containerDisk's), from the topmost layer holding it, as (its path, a stream); at the
        stream's end the rest of its layer is read and checked against the layer's digest. A link
        or another kind of entry there, or a file declaring more than `limit` bytes, is refused."""
        want = path.strip("/") if path is not None else None
        for digest, size in reversed(self._manifest()):
            tar, blob = self._open_layer(digest, size)
            found = None
            try:
                for member in tar:
                    name = member.name.lstrip("./").lstrip("/").rstrip("/")
                    if name != want and not (want is None and name.startswith("disk/") and "/" not in name[5:]):
                        continue
                    if not member.isfile():
                        kind = "link" if member.issym() or member.islnk() else "directory or special file"
                        raise ImportFailed(errors.INVALID_IMAGE, f"/{name} in the image is a {kind}, "
                                                                 "not a regular file")
                    if member.size > limit:
                        raise ImportFailed(errors.IMAGE_TOO_LARGE, f"/{name} in the image declares {member.size} "
                                                                   f"bytes, more than the {limit} allowed")
                    found = _DiskMemberStream(tar.extractfile(member), tar, blob)  # type: ignore[arg-type]
                    return name, found  # type: ignore[return-value]
                blob.drain()
            except _LAYER_ERRORS as exc:
                raise ImportFailed(errors.INVALID_IMAGE, f"layer {digest[:19]}… is not a valid tar: {exc}") from None
            finally:
                if found is None:
                    tar.close()
                    blob.close()
        what = f"no file /{want}" if want is not None else "no disk file under disk/ (not a containerDisk)"
        raise ImportFailed(errors.INVALID_SOURCE, f"{errors.scrub(self.url)} holds {what}")

    def transfer(self) -> BinaryIO:
        if self._pending is None:
            self.info()
        stream, self._pending = self._pending, None
        return stream  # type: ignore[return-value]

    def close(self) -> None:
        if self._pending is not None:
            self._pending.close()
            self._pending = None
        self._session.close()
        self._ca.close()


def _platform(entry: dict) -> tuple[object, object]:
    """(os, architecture) of an image index entry (os defaults to linux)."""
    platform = entry.get("platform")
    platform = platform if isinstance(platform, dict) else {}
    return platform.get("os", "linux"), platform.get("architecture")
