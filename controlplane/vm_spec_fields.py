"""The checks every field of a VM spec passes, in one place.

A spec is hostile input, and many of its strings end up in QEMU's command line (machine
type, names, serials, MACs, models), in QMP commands (node names) or in files QEMU or the
guest reads (cloud-init). QEMU parses its options itself (`key=value,key=value`, `json:`
filenames, `help`), so no escaping is trusted alone: each string must match a strict pattern
or an allow-list here, and the SpecError names the field, so `pvlun apply` refuses the
object before anything runs.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

# Kubernetes names: a DNS-1123 label (63) or subdomain (253)
NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")
# interface and network names: KubeVirt's examples have capitals (`testSlirp`); QEMU sees them in ids only
NETWORK_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?")
# what `qemu-system-x86_64 -machine help` offers (aliases and versioned types)
MACHINE = re.compile(r"pc|q35|microvm|isapc|pc-(q35|i440fx)-[0-9]{1,2}\.[0-9]{1,2}(\.[0-9]{1,2})?")
DEFAULT_MACHINE = "q35"
MAC = re.compile(r"([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}")
DISK_SERIAL = re.compile(r"[A-Za-z0-9_.+-]{1,20}")  # virtio-blk holds 20 bytes
UUID = re.compile(r"[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")
FIRMWARE_SERIAL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")
# KubeVirt's own limits (virt-api's webhook): list lengths and inline cloud-init data
MAX_ITEMS = 256
CLOUD_INIT_MAX_BYTES = 2048


class SpecError(ValueError):
    """A spec field is missing, malformed or unsupported; `path` names it."""

    def __init__(self, path: str, message: str):
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}")


def shown(value: Any, limit: int = 40) -> str:
    """A value as an error shows it: repr, cut short (an error never echoes a whole input)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...'"


def mapping(value: Any, path: str, *, required: bool = False) -> dict:
    if value is None:
        if required:
            raise SpecError(path, "required")
        return {}
    if not isinstance(value, dict):
        raise SpecError(path, f"must be an object, not {type(value).__name__}")
    return value


def items(value: Any, path: str) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise SpecError(path, f"must be a list, not {type(value).__name__}")
    if len(value) > MAX_ITEMS:
        raise SpecError(path, f"at most {MAX_ITEMS} entries")
    return value


def integer(value: Any, path: str, default: int, *, minimum: int = 1, maximum: int = 1 << 31) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise SpecError(path, f"must be an integer within {minimum}..{maximum}, not {shown(value)}")
    return value


def boolean(value: Any, path: str, default: bool) -> bool:
    if value is None:
        return default
    if not isinstance(value, bool):
        raise SpecError(path, f"must be true or false, not {shown(value)}")
    return value


def name(value: Any, path: str, pattern: re.Pattern = NAME, limit: int = 63) -> str:
    if value is None or value == "":
        raise SpecError(path, "required")
    if not isinstance(value, str) or len(value) > limit or not pattern.fullmatch(value):
        chars = "digits, '-' and '.'" if pattern is SUBDOMAIN else "digits and '-'"
        case = "" if pattern is NETWORK_NAME else "lowercase "
        raise SpecError(path, f"{shown(value)} is not a valid name (at most {limit} {case}letters, {chars})")
    return value


def matching(value: Any, path: str, pattern: re.Pattern, what: str) -> str:
    """A string that matches `pattern` exactly (no newline, comma or '=' sneaks past `$`)."""
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise SpecError(path, f"{shown(value)} is not {what}")
    return value


def one_of(value: Any, path: str, allowed: tuple[str, ...], what: str) -> str:
    if not isinstance(value, str) or value not in allowed:
        label = f'"{shown(value)[1:-1]}"' if isinstance(value, str) else shown(value)
        raise SpecError(path, f'unsupported {what} {label} ({", ".join(allowed)})')
    return value


def machine_type(value: Any, path: str) -> str:
    """KubeVirt's `machine.type`; empty or missing means the default (its examples have `type: ""`)."""
    if value is None or value == "":
        return DEFAULT_MACHINE
    return matching(value, path, MACHINE, "a machine type this QEMU offers (q35, pc, pc-q35-X.Y, pc-i440fx-X.Y, "
                                          "microvm, isapc)")


def mac_address(value: Any, path: str) -> str:
    matching(value, path, MAC, "a MAC address (six hex pairs separated by ':')")
    if int(value[:2], 16) & 1:
        raise SpecError(path, f"{value!r} is a multicast address; a NIC needs a unicast one")
    return value


def text(value: Any, path: str, limit: int | None = None) -> str:
    if not isinstance(value, str):
        raise SpecError(path, "must be a string")
    if limit is not None and len(value.encode()) > limit:
        raise SpecError(path, f"exceeds the {limit} byte limit")
    return value


def base64_text(value: Any, path: str, limit: int | None = None) -> str:
    try:
        decoded = base64.b64decode(text(value, path), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise SpecError(path, "is not valid base64 of UTF-8 text") from None
    return text(decoded, path, limit)
