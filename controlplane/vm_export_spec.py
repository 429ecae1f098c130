"""A VirtualMachineExport's spec (export.kubevirt.io/v1beta1) as KubeVirt's admission checks
it: the source (a claim, a VirtualMachine or a VirtualMachineSnapshot, in its API group) and
ttlDuration, a metav1.Duration written the Go way ("2h", "1h30m", "90s")."""

from __future__ import annotations

import re
from datetime import timedelta

SNAPSHOT_GROUP = "snapshot.kubevirt.io"
SOURCE_KINDS = {"PersistentVolumeClaim": ("",), "VirtualMachine": ("kubevirt.io",),
                "VirtualMachineSnapshot": (SNAPSHOT_GROUP,)}
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}
# Go's time.Duration is an int64 of nanoseconds: ParseDuration refuses anything longer
LONGEST = "2562047h47m16.854775807s"
_LONGEST_SECONDS = (1 << 63) / 1e9


def check_source(spec: dict) -> str:
    """The source's kind; ValueError names what is wrong."""
    source = spec.get("source")
    if not isinstance(source, dict) or not source.get("kind") or not source.get("name"):
        raise ValueError("spec.source: kind and name are required")
    kind, group = source["kind"], source.get("apiGroup") or ""
    if kind not in SOURCE_KINDS:
        raise ValueError(f"spec.source.kind: {str(kind)[:64]!r} cannot be exported (one of {', '.join(SOURCE_KINDS)})")
    if group not in SOURCE_KINDS[kind]:
        want = SOURCE_KINDS[kind][0] or "empty (the core group)"
        raise ValueError(f"spec.source.apiGroup: a {kind} is in the API group {want}, not {str(group)[:64]!r}")
    return kind


def parse_duration(text: object) -> timedelta:
    """A metav1.Duration as Go writes it ("2h", "1h30m", "90s", "1.5h"); ValueError otherwise,
    and for one longer than Go's longest (an int64 of nanoseconds), as Go's ParseDuration."""
    if not isinstance(text, str) or not text:
        raise ValueError(f"{str(text)[:40]!r} is not a duration like 2h or 90m")
    sign, body = (-1, text[1:]) if text[0] == "-" else (1, text.lstrip("+"))
    pos, seconds = 0, 0.0
    for match in _DURATION.finditer(body):
        if match.start() != pos:
            break
        seconds += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if pos != len(body) or not body:
        raise ValueError(f"{text[:40]!r} is not a duration like 2h or 90m")
    if not seconds <= _LONGEST_SECONDS:  # also inf, from a number of hundreds of digits
        raise ValueError(f"{text[:40]!r} is longer than the longest duration, {LONGEST}")
    return timedelta(seconds=sign * seconds)
