"""The work of `pvlun import`: one DataVolume source into one disk, as an importer pod runs it.

Nothing here knows a cluster. The pod (importer/pods.py) hands over the source as a JSON file,
the secretRef's credentials as environment variables, the certConfigMap and the
secretExtraHeaders as mounted directories, and the claim as /data/disk.img or a block device;
the same pipeline as the embedded mode's (importer/pipeline.py, sources/) fills the disk, under
a TransferWatch: a transfer that stalls ends the attempt (kubelet restarts the container, as
CDI's importer is restarted), SIGTERM (the pod deleted) cancels it. A failure leaves the disk
as it found it (disk.img gone, a block device zeroed).

A container restarted after a kill could not clean up, and the pipeline skips zero blocks on the
assumption that a fresh volume reads as zeros: so every attempt leaves a marker in the scratch
directory (an emptyDir outlives its container's restarts), and an attempt that finds one zeroes
a block device before writing.

The upload pod runs the same command with the upload server in place of a source: it takes one
upload into the disk (the token names the DataVolume) and ends with its outcome.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
import threading
from dataclasses import dataclass
from typing import Callable, Mapping

from csi.attach import device_size

from . import errors
from .errors import ImportFailed
from .pipeline import DEFAULT_FS_OVERHEAD, DISK_IMG, ImportResult, Target, import_into
from .pods import ACCESS_KEY_ENV, REGION_ENV, SECRET_KEY_ENV
from .qemu_convert import zero_target
from .transfer_watch import TransferWatch

log = logging.getLogger("pvlun.import")
INVALID_TARGET = "InvalidTarget"
ATTEMPT_MARKER = ".pvlun-import-attempt"
SOURCE_MAX = 1 << 20  # bytes of source JSON (a DataVolume's whole object is at most 1.5 MiB)
FILE_MAX = 1 << 20    # bytes of one mounted Secret or ConfigMap key (the API's limit for the whole object)
_REASON = re.compile(r"[A-Z][A-Za-z0-9]{0,62}")

Lookup = Callable[[str], dict[str, str]]


def read_source(path: str) -> dict:
    """The DataVolume `spec.source` in the JSON file at `path`: one kind and its fields."""
    try:
        with open(path, "rb") as f:
            text = f.read(SOURCE_MAX + 1)
    except OSError as exc:
        raise ImportFailed(errors.INVALID_SOURCE, f"cannot read the source file: {exc.strerror}") from None
    if len(text) > SOURCE_MAX:
        raise ImportFailed(errors.INVALID_SOURCE, f"the source file holds more than {SOURCE_MAX} bytes")
    try:
        source = json.loads(text)
    except (ValueError, RecursionError):
        raise ImportFailed(errors.INVALID_SOURCE, "the source file is not JSON") from None
    if not isinstance(source, dict) or len(source) != 1 or not isinstance(next(iter(source.values())) or {}, dict):
        raise ImportFailed(errors.INVALID_SOURCE, "the source must be one DataVolume source, e.g. "
                                                  '{"http": {"url": "https://..."}}')
    return source


def target_at(path: str, size: int | None = None, *, content_type: str = "kubevirt", preallocation: bool = False,
              filesystem_overhead: float = DEFAULT_FS_OVERHEAD) -> Target:
    """The disk `path` names: `DIR/disk.img` on a mounted Filesystem volume (made there, sized to
    `size` or the filesystem, less the overhead), else a block device or raw file of `size`
    bytes (default: all of it)."""
    if os.path.basename(path) == DISK_IMG and os.path.isdir(os.path.dirname(path) or "."):
        volume = os.path.dirname(path) or "."
        if size is None:
            st = os.statvfs(volume)
            size = st.f_blocks * st.f_frsize
        return Target(path=volume, size=size, mode="Filesystem", content_type=content_type,  # type: ignore[arg-type]
                      preallocation=preallocation, filesystem_overhead=filesystem_overhead)
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ImportFailed(INVALID_TARGET, f"the target {path}: {exc.strerror} (give a block device, a raw file, "
                                           f"or DIR/{DISK_IMG} on a Filesystem volume)") from None
    if not (stat.S_ISBLK(st.st_mode) or stat.S_ISREG(st.st_mode)):
        raise ImportFailed(INVALID_TARGET, f"the target {path} is no block device or file (a Filesystem volume's "
                                           f"disk is DIR/{DISK_IMG})")
    actual = device_size(path) if stat.S_ISBLK(st.st_mode) else st.st_size
    if size is not None and size > actual:
        raise ImportFailed(INVALID_TARGET, f"the target {path} holds {actual} bytes, less than --size {size}")
    return Target(path=path, size=size if size is not None else actual, mode="Block",
                  content_type=content_type, preallocation=preallocation)  # type: ignore[arg-type]


def pod_lookups(source: dict, *, cert_dir: str, headers_dir: str,
                environ: Mapping[str, str] = os.environ) -> tuple[Lookup, Lookup]:
    """(secret, configmap) lookups for `sources.from_spec`, from what the pod hands over: the
    secretRef's keys in the environment, the secretExtraHeaders' Secrets in `headers_dir/<n>`,
    the certConfigMap's keys in `cert_dir`. A name the source does not give is not found."""
    spec = next(iter(source.values())) or {}
    headers = spec.get("secretExtraHeaders") or []

    def secret(name: str) -> dict[str, str]:
        if isinstance(headers, list) and name in headers:
            return _read_dir(os.path.join(headers_dir, str(headers.index(name))), name)
        if name and name == spec.get("secretRef"):
            keys = (("accessKeyId", ACCESS_KEY_ENV), ("secretKey", SECRET_KEY_ENV), ("region", REGION_ENV))
            values = {key: environ[var] for key, var in keys if var in environ}
            if values:
                return values
        raise LookupError(name)

    def configmap(name: str) -> dict[str, str]:
        if name and name == spec.get("certConfigMap"):
            return _read_dir(cert_dir, name)
        raise LookupError(name)

    return secret, configmap


def _read_dir(path: str, name: str) -> dict[str, str]:
    """A mounted Secret's or ConfigMap's keys: the files of the directory (kubelet's own
    `..data` links and dirs left out)."""
    try:
        entries = sorted(os.listdir(path))
    except OSError:
        raise LookupError(name) from None
    out = {}
    for entry in entries:
        full = os.path.join(path, entry)
        if entry.startswith(".") or not os.path.isfile(full):
            continue
        with open(full, "rb") as f:
            data = f.read(FILE_MAX + 1)
        if len(data) > FILE_MAX:
            raise ImportFailed(errors.INVALID_SOURCE, f"key {entry!r} of {name!r} holds more than {FILE_MAX} bytes")
        out[entry] = data.decode(errors="replace")
    return out


def begin_attempt(target: Target, scratch_dir: str) -> None:
    """Mark an attempt in the scratch directory; after an earlier one (a restarted container),
    make a block device read as zeros first (its writes may still be there)."""
    marker = os.path.join(scratch_dir, ATTEMPT_MARKER)
    if os.path.lexists(marker) and target.mode == "Block":
        try:
            zero_target(target.path, target.size, check=True)
        except Exception as exc:  # noqa: BLE001 - the tool's words, as the reason's message
            from controlplane.user_text import user_text

            raise ImportFailed(INVALID_TARGET, f"an earlier attempt's data could not be cleared: {user_text(exc)}") from None
    with open(marker, "w"):
        pass


def import_once(source: dict, target: Target, *, scratch_dir: str, progress: Callable[[float], None],
                lookups: tuple[Lookup, Lookup], stall: float, cancelled: Callable[[], bool]) -> ImportResult:
    """One attempt: the source into the target, or ImportFailed with the target as it was."""
    from .sources import from_spec

    begin_attempt(target, scratch_dir)
    with TransferWatch(stall, cancelled):
        src = from_spec(source, secret=lookups[0], configmap=lookups[1], allow_file=False)
        return import_into(src, target, progress=progress, scratch_dir=scratch_dir)


@dataclass
class _Upload:
    ok: bool
    message: str


def serve_upload(dv_key: str, target: Target, *, secret_dir: str, address: tuple[str, int], scratch_dir: str,
                 progress: Callable[[float], None], cancelled: Callable[[], bool],
                 listening: Callable[[str], None]) -> None:
    """Serve uploads into `target` for DataVolume `dv_key` ("namespace/name") until one ends
    (an interrupted one may be sent again); return when it succeeded, else ImportFailed.
    `secret_dir` holds token.key (the signing key) and tls.crt/tls.key (made there if missing)."""
    from .upload_server import KEY_BYTES, UploadServer

    try:
        with open(os.path.join(secret_dir, "token.key"), "rb") as f:
            key = f.read(4096)
    except OSError as exc:
        raise ImportFailed(errors.INVALID_SOURCE, f"no upload token key in the secret directory: {exc.strerror}") from None
    if len(key) < KEY_BYTES:
        raise ImportFailed(errors.INVALID_SOURCE, f"the upload token key holds {len(key)} bytes, fewer than {KEY_BYTES}")
    begin_attempt(target, scratch_dir)
    ended = threading.Event()
    outcome: list[_Upload] = []

    def ours(key: str) -> None:
        if key != dv_key:
            raise LookupError(f"this server takes uploads into {dv_key} only")

    def resolve(key: str) -> Target:
        ours(key)
        return target

    def release(key: str) -> None:  # after the answer went out: the upload's request is over
        if outcome:
            ended.set()

    server = UploadServer(cert_dir=secret_dir, secret_key=key, resolve=resolve, check=ours, release=release,
                          on_done=lambda k, ok, message: outcome.append(_Upload(ok, message)),
                          on_interrupted=lambda k, message: log.warning("upload interrupted: %s", message),
                          progress=lambda k, percent: progress(percent), scratch_dir=scratch_dir, address=address)
    server.start()
    try:
        listening(server.url)
        while not ended.wait(0.2):
            if cancelled():
                raise ImportFailed(errors.CANCELLED, "the upload was cancelled")
    finally:
        server.stop()
    if not outcome[0].ok:  # the server's message is "Reason: what happened"
        reason, _, message = outcome[0].message.partition(": ")
        if not _REASON.fullmatch(reason):
            reason, message = errors.INVALID_IMAGE, outcome[0].message
        raise ImportFailed(reason, message)
