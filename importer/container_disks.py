"""containerDisk images (KubeVirt's `containerDisk` volumes and `kernelBoot` containers), kept
on the node once per image digest.

A container runtime would pull the image and the VM would read its disk out of the container's
root filesystem; here the importer's registry source (importer/sources/registry.py: manifests,
token and basic auth, CA bundles, digests checked as blobs stream) reads the one file wanted
straight out of its layer into the cache. Every file is kept under the manifest digest the
reference named when it was pulled, so a second VM of the same image pulls nothing and a tag
that moved pulls its new digest. `imagePullPolicy` decides when the registry is asked, as the
kubelet does: Never (only what the node has), IfNotPresent (the registry only for a reference
the node never resolved), Always (the reference is resolved again every time; the blobs only
if that digest is new).

Images are hostile: a disk must be qcow2 or raw by content, name nothing besides itself
(no backing file, no external data file — importer/references.py), pass `qemu-img check`
and declare a bounded size; every file is bounded as it streams. What is cached is never
written again: VMs boot through an overlay of their own (virt/container_volumes.py).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import os
import re
import tempfile
import threading
from dataclasses import dataclass
from typing import BinaryIO, Iterator

from host.sandbox import lent

from . import errors, formats
from .errors import ImportFailed
from .sources.registry import RegistrySource

PULL_POLICIES = ("Always", "IfNotPresent", "Never")
DISK_FORMATS = ("qcow2", "raw")  # what KubeVirt's containerDisk holds
MAX_DISK_FILE = 64 << 30  # bytes of a disk file in an image
MAX_VIRTUAL_SIZE = 1 << 40  # the size a disk may declare (its overlay grows up to it)
MAX_BOOT_FILE = 512 << 20  # a kernel or an initrd
CHUNK = 1 << 20
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


@dataclass(frozen=True)
class Pull:
    """An image as a volume names it, with how and as whom to pull it."""

    image: str  # REGISTRY/REPO[:TAG] or REGISTRY/REPO@sha256:...
    policy: str = "IfNotPresent"
    auth: tuple[str, str] | None = None


@dataclass(frozen=True)
class CachedDisk:
    """A validated disk file in the cache (read-only from here on)."""

    path: str
    format: str  # qcow2 or raw
    virtual_size: int
    digest: str  # the image's manifest digest


def default_policy(image: str) -> str:
    """Kubernetes' default imagePullPolicy: Always for `:latest` or no tag, else IfNotPresent."""
    last = image.rsplit("/", 1)[-1]
    if "@" in last:
        return "IfNotPresent"
    return "IfNotPresent" if ":" in last and not last.endswith(":latest") else "Always"


def docker_config_auth(data: dict[str, str], host: str) -> tuple[str, str] | None:
    """The credentials a `kubernetes.io/dockerconfigjson` Secret (its `.dockerconfigjson`, or
    a `.dockercfg`) holds for `host`; None when it has none for that registry."""
    text = data.get(".dockerconfigjson") or data.get(".dockercfg")
    try:
        config = json.loads(text) if text else None
    except ValueError:
        config = None
    if not isinstance(config, dict):
        raise ImportFailed(errors.INVALID_SOURCE, "the imagePullSecret holds no .dockerconfigjson")
    auths = config.get("auths", config)
    entry = auths.get(host) if isinstance(auths, dict) else None
    if not isinstance(entry, dict):
        entry = next((v for k, v in (auths or {}).items() if isinstance(k, str) and isinstance(v, dict)
                      and re.sub(r"^https?://", "", k).split("/")[0] == host), None)
    if entry is None:
        return None
    user, password = entry.get("username"), entry.get("password")
    if entry.get("auth"):
        try:
            user, _, password = base64.b64decode(entry["auth"], validate=True).decode().partition(":")
        except ValueError:
            raise ImportFailed(errors.INVALID_SOURCE, "the imagePullSecret's auth is not base64 of "
                                                      "user:password") from None
    if not isinstance(user, str) or not isinstance(password, str) or not user:
        return None
    errors.register_secret(password)
    return user, password


class ImageCache:
    """The node's cache of files out of container images: DIR/sha256-<hex>/<file key>, with a
    `.json` beside each disk saying what it was found to be, and DIR/refs/<key> the digest a
    reference last resolved to. Thread-safe; a file being pulled is not pulled twice."""

    def __init__(self, root: str, *, certs_dir: str | None = None):
        self.root = root
        self.certs_dir = certs_dir  # containerd's certs.d: certs_dir/<host[:port]>/ca.crt
        self._lock = threading.Lock()
        self._busy: dict[str, threading.Lock] = {}
        os.makedirs(os.path.join(root, "refs"), mode=0o700, exist_ok=True)
        os.makedirs(os.path.join(root, "tmp"), mode=0o700, exist_ok=True)
        os.chmod(root, 0o700)

    # -- public: what the virt layer calls (ctx.services["container_images"]) -----------------
    def disk(self, image: str, path: str | None = None, *, policy: str | None = None,
             pull_secret: dict[str, str] | None = None) -> CachedDisk:
        """The containerDisk's disk (`path`, or the one file under disk/), validated and cached.
        `pull_secret` is the data of the imagePullSecret (a dockerconfigjson Secret), if any."""
        pull = self._pull_of(image, policy, pull_secret)
        with _refusal(), self._file(pull, path, MAX_DISK_FILE, disk=True) as (file, digest):
            with open(file + ".json") as f:
                meta = json.load(f)
            return CachedDisk(file, meta["format"], int(meta["virtual_size"]), digest)

    def file(self, image: str, path: str, *, policy: str | None = None,
             pull_secret: dict[str, str] | None = None) -> str:
        """A file of the image (a kernel, an initrd), cached; its host path (0644 in a 0700 directory)."""
        pull = self._pull_of(image, policy, pull_secret)
        with _refusal(), self._file(pull, path, MAX_BOOT_FILE, disk=False) as (file, _digest):
            return file

    @staticmethod
    def _pull_of(image: str, policy: str | None, pull_secret: dict[str, str] | None) -> Pull:
        with _refusal():
            auth = docker_config_auth(pull_secret, source_host(image)) if pull_secret is not None else None
            return Pull(image, policy or default_policy(image), auth)

    def digest_of(self, image: str) -> str | None:
        """The digest the reference last resolved to on this node, if it was ever pulled."""
        ref = _repo_digest(image)
        if ref:
            return ref
        try:
            with open(self._ref_file(image)) as f:
                text = f.read().strip()
        except FileNotFoundError:
            return None
        return text if _DIGEST.fullmatch(text) else None

    # -- the work --------------------------------------------------------------------------
    @contextlib.contextmanager
    def _file(self, pull: Pull, path: str | None, limit: int, *, disk: bool) -> Iterator[tuple[str, str]]:
        if pull.policy not in PULL_POLICIES:
            raise ImportFailed(errors.INVALID_SOURCE, f"imagePullPolicy must be one of {', '.join(PULL_POLICIES)}")
        key = hashlib.sha256((path or "disk/").encode()).hexdigest()[:32]
        with self._serialized(pull.image + "\0" + key):
            known = self.digest_of(pull.image)
            if known and pull.policy != "Always" and os.path.exists(self._path(known, key, disk)):
                yield self._entry(known, key), known
                return
            if pull.policy == "Never":
                raise ImportFailed(errors.NOT_FOUND, f"image {pull.image} is not present on the node and its "
                                                     f"imagePullPolicy is Never")
            source = self._source(pull)
            try:
                digest = source.pin()
                if not os.path.exists(self._path(digest, key, disk)):
                    self._pull(source, digest, key, path, limit, disk)
            finally:
                source.close()
            if not _repo_digest(pull.image):
                self._write_ref(pull.image, digest)
            yield self._entry(digest, key), digest

    def _source(self, pull: Pull) -> RegistrySource:
        url = "docker://" + pull.image
        source = RegistrySource(url, auth=pull.auth, ca_pems=self._ca_pems(source_host(pull.image)))
        return source

    def _ca_pems(self, host: str) -> list[str]:
        if not self.certs_dir or not re.fullmatch(r"[A-Za-z0-9.-]+(:\d+)?", host):
            return []
        try:
            with open(os.path.join(self.certs_dir, host, "ca.crt")) as f:
                return [f.read()]
        except FileNotFoundError:
            return []

    def _pull(self, source: RegistrySource, digest: str, key: str, path: str | None, limit: int, disk: bool) -> None:
        """Stream the file into a temporary one, check it, then move it into place whole."""
        directory = os.path.join(self.root, "sha256-" + digest.removeprefix("sha256:"))
        os.makedirs(directory, mode=0o700, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.join(self.root, "tmp"), prefix="pull-")
        try:
            name, stream = source.open_file(path, limit)
            try:
                with os.fdopen(fd, "wb") as out:
                    fd = -1
                    _copy(stream, out, limit, name)
                    out.flush()
                    os.fsync(out.fileno())
            finally:
                stream.close()
            final = os.path.join(directory, key)
            if disk:
                meta = _check_disk(tmp)
                with open(final + ".json.tmp", "w") as f:
                    json.dump({**meta, "path": name}, f)
                os.chmod(tmp, 0o600)
                os.rename(tmp, final)
                os.rename(final + ".json.tmp", final + ".json")  # last: the disk counts as cached from here
            else:
                os.chmod(tmp, 0o644)  # QEMU, unprivileged, opens it through /proc/self/fd
                os.rename(tmp, final)
        finally:
            if fd >= 0:
                os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    # -- paths -------------------------------------------------------------------------------
    def _entry(self, digest: str, key: str) -> str:
        return os.path.join(self.root, "sha256-" + digest.removeprefix("sha256:"), key)

    def _path(self, digest: str, key: str, disk: bool) -> str:
        """The file whose presence says the entry is complete (a disk's `.json` comes last)."""
        return self._entry(digest, key) + (".json" if disk else "")

    def _ref_file(self, image: str) -> str:
        return os.path.join(self.root, "refs", hashlib.sha256(image.encode()).hexdigest())

    def _write_ref(self, image: str, digest: str) -> None:
        tmp = self._ref_file(image) + ".tmp"
        with open(tmp, "w") as f:
            f.write(digest + "\n")
        os.rename(tmp, self._ref_file(image))

    @contextlib.contextmanager
    def _serialized(self, what: str) -> Iterator[None]:
        """One pull of a given file at a time: in this process (a lock) and across processes (flock)."""
        with self._lock:
            lock = self._busy.setdefault(what, threading.Lock())
        name = os.path.join(self.root, "tmp", "lock-" + hashlib.sha256(what.encode()).hexdigest()[:32])
        with lock, open(name, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield


class ImageUnavailable(ValueError):
    """The image's file cannot be had (not found, refused, unreachable): `reason` is the
    importer's reason code, the message one line for the VMI's status."""

    def __init__(self, reason: str, message: str):
        self.reason = reason
        super().__init__(message)


@contextlib.contextmanager
def _refusal() -> Iterator[None]:
    try:
        yield
    except ImportFailed as exc:
        raise ImageUnavailable(exc.reason, exc.message) from None


def source_host(image: str) -> str:
    """The registry host[:port] of an image reference, as the registry source reads it."""
    first = image.split("/", 1)[0]
    return first if "/" in image and ("." in first or ":" in first or first == "localhost") else "registry-1.docker.io"


def _repo_digest(image: str) -> str | None:
    """The digest an `@sha256:` reference pins, else None."""
    _, at, digest = image.rpartition("@")
    return digest if at and _DIGEST.fullmatch(digest) else None


def _copy(stream: BinaryIO, out: BinaryIO, limit: int, name: str) -> None:
    total = 0
    while data := stream.read(CHUNK):
        total += len(data)
        if total > limit:
            raise ImportFailed(errors.IMAGE_TOO_LARGE, f"/{name} in the image is larger than the {limit} bytes allowed")
        out.write(data)


def _check_disk(path: str) -> dict:
    """What a pulled disk is; refused unless a self-contained, sound qcow2 or raw of bounded size."""
    with open(path, "rb") as f:
        head = f.read(formats.HEAD_SIZE)
    fmt = formats.detect(head)
    if fmt not in DISK_FORMATS:
        raise ImportFailed(errors.INVALID_IMAGE, f"a containerDisk holds a qcow2 or raw disk, not {fmt}")
    formats.precheck_header(fmt, head)
    node = formats.local_image(path, fmt)
    with lent(path):
        info = formats.inspect(node)
        if info.virtual_size > MAX_VIRTUAL_SIZE:
            raise ImportFailed(errors.IMAGE_TOO_LARGE, f"the {fmt} disk declares {info.virtual_size} bytes, more "
                                                       f"than the {MAX_VIRTUAL_SIZE} a containerDisk may have")
        formats.verify_integrity(node, file_size=os.path.getsize(path))
    return {"format": fmt, "virtual_size": info.virtual_size}
