"""Kubernetes resource quantities ("256Mi", "1G", "512M", "1.5Gi") as whole bytes."""

from __future__ import annotations

import re
from decimal import Decimal, DecimalException

from controlplane.user_text import quoted

_SUFFIXES = {
    "": 1,
    "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
}
MAX_BYTES = 2**63 - 1  # Kubernetes quantities are 64-bit
_PATTERN = re.compile(r"^([+]?[0-9]+(?:\.[0-9]*)?|[+]?\.[0-9]+)(?:[eE]([+-]?[0-9]+))?([a-zA-Z]*)$")


def parse_quantity(value: object) -> int:
    """Bytes for a quantity; ValueError names what is wrong. Fractions round up, as Kubernetes does."""
    if isinstance(value, bool):
        raise ValueError(f"{quoted(value)} is not a quantity")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{quoted(value)} is negative")
        if value > MAX_BYTES:
            raise ValueError(f"{quoted(value)} is out of range (at most 2^63-1 bytes)")
        return value
    if not isinstance(value, str) or len(value) > 64:
        raise ValueError(f"{quoted(value)} is not a quantity")
    match = _PATTERN.match(value.strip())
    if not match or match.group(3) not in _SUFFIXES or (match.group(2) and match.group(3)):
        raise ValueError(f"{quoted(value)} is not a quantity (e.g. 256Mi, 1Gi, 512M)")
    try:
        number = Decimal(match.group(1))
        if match.group(2):
            if abs(int(match.group(2))) > 30:
                raise ValueError(f"{quoted(value)} is out of range")
            number *= Decimal(10) ** int(match.group(2))
        total = int((number * _SUFFIXES[match.group(3)]).to_integral_value(rounding="ROUND_CEILING"))
    except DecimalException:
        raise ValueError(f"{quoted(value)} is not a quantity") from None
    if total > MAX_BYTES:
        raise ValueError(f"{quoted(value)} is out of range (at most 2^63-1 bytes)")
    return total
