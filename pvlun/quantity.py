"""Kubernetes resource quantities (10Gi, 512Mi, 1G, 1.5Gi, 100k) as integers."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_SUFFIXES = {
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
    "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18, "": 1,
}
_PATTERN = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|k|K|M|G|T|P|E)?$")


def parse_quantity(value: str | int) -> int:
    """Bytes for a quantity; ValueError naming the bad text otherwise."""
    if isinstance(value, int) and value >= 0:
        return value
    match = _PATTERN.match(str(value).strip())
    if not match:
        raise ValueError(f"{value!r} is not a quantity (like 10Gi, 512Mi or 1G)")
    try:
        number = Decimal(match.group(1))
    except InvalidOperation:
        raise ValueError(f"{value!r} is not a quantity") from None
    return int(-(-number * _SUFFIXES[match.group(2) or ""] // 1))
