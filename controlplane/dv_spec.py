"""A DataVolume's spec as CDI defines it: checked (naming the field) and turned into the
claim it needs. Pure functions, so `pvlun apply` can check manifests without the daemon's parts."""

from __future__ import annotations

import math
import re
from urllib.parse import urlsplit

from controlplane.quantity import parse_quantity
from controlplane.store import Obj

FILESYSTEM_OVERHEAD = 0.055  # CDI's default share of a filesystem volume kept for the filesystem
SMALL_FS_SLACK_MIB = 16  # ext4's journal and tables take more than 5.5% of a small volume
SOURCES = ("http", "registry", "s3", "upload", "blank", "pvc", "snapshot")
IMPORT_SOURCES = ("http", "registry", "s3")
# CDI sources pvlun leaves out, and what to use instead
LEFT_OUT = {"vddk": "VMware VDDK imports are not supported: export the VM's disk (VMDK) and import it with "
                    "spec.source.http (qcow2, vmdk, vhd(x) and raw are converted)",
            "imageio": "oVirt imageio imports are not supported: export the disk and import it with spec.source.http",
            "gcs": "Google Cloud Storage sources are not supported: import a signed object URL with spec.source.http"}


# the URL schemes each source takes (http's file:// only where the embedded daemon allows it)
URL_SCHEMES = {"http": ("http", "https", "file"), "registry": ("docker",), "s3": ("s3", "http", "https")}
CHECKSUM_HEX = {"md5": 32, "sha1": 40, "sha256": 64, "sha512": 128}  # CDI's `algorithm:hex` checksums
HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP token (RFC 9110)
CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # a CR or LF would end the header line: another header follows


def header_error(line: object) -> str | None:
    """What is wrong with an extraHeaders line (None: nothing), checked as the importer reads
    it: `Name: value` with an HTTP token for a name, no control character in the value."""
    if not isinstance(line, str):
        return "must be strings 'Name: value'"
    name, sep, value = line.strip().partition(":")
    if not sep or not HEADER_NAME.fullmatch(name):
        return "must look like 'Name: value' (the name an HTTP token)"
    if CONTROL.search(value):
        return "must not hold control characters (a line break would start another header)"
    return None


def checksum_error(value: object) -> str | None:
    """What is wrong with a source's `checksum` (None: nothing; absent or "" means no checksum)."""
    if value is None or value == "":
        return None
    algo, _, digest = value.partition(":") if isinstance(value, str) else ("", "", "")
    hex_len = CHECKSUM_HEX.get(algo.lower())
    if hex_len is None or len(digest) != hex_len or digest.strip("0123456789abcdefABCDEF"):
        return ("must be <algorithm>:<hex digest> with md5, sha1, sha256 or sha512 (e.g. sha256:<64 hex digits>), "
                "or empty for none")
    return None


def validate(dv: Obj) -> tuple[str, dict, int, str, list[str], str | None]:
    """(source kind, source spec, requested size, volume mode, access modes, class); ValueError names the field."""
    spec = dv.get("spec") or {}
    source = spec.get("source")
    if spec.get("sourceRef") is not None:
        source = _source_ref(spec)
    if not isinstance(source, dict) or len(source) != 1:
        raise ValueError("spec.source must name exactly one of " + ", ".join(SOURCES) + " (or spec.sourceRef a DataSource)")
    kind = next(iter(source))
    if kind in LEFT_OUT:
        raise ValueError(f"spec.source.{kind}: {LEFT_OUT[kind]}")
    if kind not in SOURCES and kind != "sourceRef":  # a sourceRef is resolved before the claim is made (data_source_ref)
        raise ValueError(f"spec.source.{kind}: unknown source (one of {', '.join(SOURCES)})")
    if source[kind] is not None and not isinstance(source[kind], dict):  # `registry: "docker://..."`
        raise ValueError(f"spec.source.{kind}: must be an object (e.g. {kind}: {{url: ...}}), not "
                         f"{type(source[kind]).__name__}")
    bad = checksum_error((source[kind] or {}).get("checksum"))
    if bad:
        raise ValueError(f"spec.source.{kind}.checksum: {bad}")
    _check_url(kind, (source[kind] or {}).get("url"))
    _check_headers(kind, source[kind] or {})
    field = "spec.storage" if spec.get("storage") is not None else "spec.pvc"
    storage = spec.get("storage") if spec.get("storage") is not None else spec.get("pvc")  # `storage: {}` is given
    if not isinstance(storage, dict):
        raise ValueError("spec.storage (or spec.pvc) is required")
    request = (storage.get("resources") or {}).get("requests", {}).get("storage")
    if request is None and kind not in ("pvc", "snapshot", "sourceRef"):
        raise ValueError(f"{field}.resources.requests.storage is required")
    try:
        size = parse_quantity(request) if request is not None else 0
    except ValueError as exc:
        raise ValueError(f"{field}.resources.requests.storage: {exc}") from None
    mode = storage.get("volumeMode") or "Filesystem"
    if mode not in ("Filesystem", "Block"):
        raise ValueError(f"{field}.volumeMode: {mode!r} is not Filesystem or Block")
    content = spec.get("contentType", "kubevirt")
    if content not in ("kubevirt", "archive"):
        raise ValueError(f"spec.contentType: {content!r} is not kubevirt or archive")
    if content == "archive" and mode == "Block":
        raise ValueError("spec.contentType archive needs a Filesystem volume")
    return kind, source[kind] or {}, size, mode, storage.get("accessModes") or ["ReadWriteOnce"], storage.get("storageClassName")


def _check_url(kind: str, url: object) -> None:
    """A source URL of a scheme its source does not read is refused at apply, naming the field."""
    if kind not in URL_SCHEMES or not isinstance(url, str) or not url:
        return
    if CONTROL.search(url) or "\t" in url:
        raise ValueError(f"spec.source.{kind}.url: must not hold control characters (a tab or line break)")
    try:
        urlsplit(url).port  # noqa: B018  (a port out of range or an unclosed [IPv6 bracket raise here)
    except ValueError as exc:
        raise ValueError(f"spec.source.{kind}.url: not a valid URL: {exc}") from None
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme in URL_SCHEMES[kind]:
        return
    hint = ""
    if kind == "http" and scheme in URL_SCHEMES["registry"]:
        hint = "; a docker:// URL names a registry image: use spec.source.registry.url"
    elif kind == "registry" and scheme in ("http", "https"):
        hint = "; a registry image is docker://HOST/REPO:TAG (an http URL of a file: spec.source.http.url)"
    shown_scheme = repr(scheme[:20]) if scheme else "none"
    raise ValueError(f"spec.source.{kind}.url: scheme {shown_scheme} is not one of "
                     f"{', '.join(s + '://' for s in URL_SCHEMES[kind])}{hint}")


def _check_headers(kind: str, source: dict) -> None:
    """extraHeaders lines as the importer will send them, refused at apply naming the entry."""
    lines = source.get("extraHeaders") or []
    if not isinstance(lines, list):
        raise ValueError(f"spec.source.{kind}.extraHeaders: must be a list of 'Name: value' strings")
    for i, line in enumerate(lines):
        bad = header_error(line)
        if bad:
            raise ValueError(f"spec.source.{kind}.extraHeaders[{i}]: {bad}")


def _source_ref(spec: dict) -> dict:
    """CDI's spec.sourceRef: a DataSource (in the DataVolume's namespace unless it names one),
    given instead of spec.source, never beside it."""
    ref = spec["sourceRef"]
    if spec.get("source") is not None:
        raise ValueError("spec.source and spec.sourceRef: give one of them, not both")
    if not isinstance(ref, dict) or ref.get("kind") != "DataSource":
        raise ValueError("spec.sourceRef.kind: must be DataSource")
    if not ref.get("name"):
        raise ValueError("spec.sourceRef.name is required")
    return {"sourceRef": ref}


def disk_size(dv: Obj, claim_bytes: int, block: bool) -> tuple[int, float]:
    """(bytes, filesystem overhead) of the disk a DataVolume's claim of `claim_bytes` holds. A
    Block claim is the disk. With spec.storage a Filesystem claim was made larger for the
    overhead (claim_spec), so its disk.img gets the size asked for; with spec.pvc, CDI's
    overhead comes off the claim's size."""
    spec = dv.get("spec") or {}
    if block:
        return claim_bytes, FILESYSTEM_OVERHEAD
    requested = ((spec.get("storage") or {}).get("resources") or {}).get("requests", {}).get("storage")
    if spec.get("storage") is not None and requested:
        return parse_quantity(requested), 0.0
    return claim_bytes, FILESYSTEM_OVERHEAD


def claim_spec(kind: str, source: dict, size: int, mode: str, access: list[str], sc: str | None,
               use_storage_api: bool, dv_ns: str, attributes_class: str | None = None) -> dict:
    """The claim a DataVolume needs. With spec.storage, a Filesystem claim is made larger
    so the disk image itself gets the requested size (CDI's filesystem overhead)."""
    if use_storage_api and mode == "Filesystem" and size:
        size = (int(math.ceil(size / (1 - FILESYSTEM_OVERHEAD) / (1 << 20))) + SMALL_FS_SLACK_MIB) << 20
    spec: dict = {"accessModes": access, "volumeMode": mode}
    if size:
        spec["resources"] = {"requests": {"storage": str(size)}}
    if sc:
        spec["storageClassName"] = sc
    if attributes_class:  # volume QoS (maxIOPS, maxMBps) from the first byte
        spec["volumeAttributesClassName"] = attributes_class
    if kind == "pvc":
        spec["dataSource"] = {"kind": "PersistentVolumeClaim", "name": source.get("name", ""),
                              "namespace": source.get("namespace") or dv_ns}
    elif kind == "snapshot":
        spec["dataSource"] = {"kind": "VolumeSnapshot", "name": source.get("name", ""),
                              "namespace": source.get("namespace") or dv_ns, "apiGroup": "snapshot.storage.k8s.io"}
    return spec
