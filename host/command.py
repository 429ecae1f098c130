"""The one way pvlun runs external tools (qemu-img, losetup, mkfs, tgtadm, ...).

An argv list, a timeout, captured output; a failure raises CommandError whose message
carries the tool's own stderr, so the caller can hand it on to a person unchanged.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from typing import Sequence


class CommandError(RuntimeError):
    """An external command failed or timed out; `stderr` holds what it said."""

    def __init__(self, argv: Sequence[str], returncode: int | None, stderr: str):
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr.strip()
        what = "timed out" if returncode is None else f"exited {returncode}"
        detail = f": {self.stderr}" if self.stderr else ""
        super().__init__(f"{self.argv[0]} {what}{detail}")


@dataclass(frozen=True)
class Limits:
    """Resource limits applied to the child (as CDI does for qemu-img info).

    Applied by util-linux `prlimit` in front of the command rather than by Python code in
    the forked child: the daemon has gRPC threads, and running Python between fork and
    exec there makes gRPC's fork handlers misbehave."""

    address_space: int | None = None  # bytes
    cpu_seconds: int | None = None

    def prefix(self) -> list[str]:
        argv = ["prlimit"]
        if self.address_space is not None:
            argv.append(f"--as={self.address_space}")
        if self.cpu_seconds is not None:
            argv.append(f"--cpu={self.cpu_seconds}")
        return argv + ["--"] if len(argv) > 1 else []


def run(
    argv: Sequence[str],
    *,
    timeout: float | None = 120,
    input: bytes | None = None,
    limits: Limits | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[bytes]:
    """Run argv, capture stdout and stderr, raise CommandError on failure or timeout."""
    full = (limits.prefix() if limits else []) + list(argv)
    try:
        proc = subprocess.run(
            full,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        raise CommandError(argv, None, (exc.stderr or b"").decode(errors="replace")) from None
    except FileNotFoundError:
        raise CommandError(argv, 127, f"{argv[0]}: command not found") from None
    if check and proc.returncode != 0:
        raise CommandError(argv, proc.returncode, proc.stderr.decode(errors="replace"))
    return proc


def output(argv: Sequence[str], **kwargs) -> str:
    """Run argv and return its stdout as text."""
    return run(argv, **kwargs).stdout.decode()
