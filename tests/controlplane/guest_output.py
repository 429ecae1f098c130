"""What the VM tests read from a tick guest and its QEMU process."""

from __future__ import annotations

import re

MARKER = "PVLUN-BOOT"


def ticks(text: str) -> list[int]:
    """The tick counters the guest printed, in order."""
    return [int(n) for n in re.findall(r"tick (\d+)\r?\n", text)]


def alive(pid: int) -> bool:
    """A process that exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
