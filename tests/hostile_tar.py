"""Hostile tar archives, built at test time (shared by the importer's and the control plane's
tests: this directory is on every test module's import path)."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path


def tar_entries(path: Path, entries: list[tuple]) -> Path:
    """A tar of (name, type, content or link target[, mode]) entries, in order, exactly as given
    (no normalisation of names: the archive is hostile). Types: tarfile's REGTYPE, DIRTYPE,
    SYMTYPE, LNKTYPE, CHRTYPE, FIFOTYPE."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, payload, *mode in entries:
            info = tarfile.TarInfo(name)
            info.type, info.mode = kind, mode[0] if mode else 0o755
            if kind == tarfile.REGTYPE:
                data = payload.encode() if isinstance(payload, str) else payload
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
                continue
            if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
                info.linkname = payload
            if kind == tarfile.CHRTYPE:
                info.devmajor, info.devminor = 1, 3  # /dev/null's numbers
            tar.addfile(info)
    return path


def link_chain_escape(levels: int = 16) -> tuple[list[tuple], str]:
    """CVE-2025-4517's trick: `levels` nested 247-character directories, each reached through a
    one-letter link, and a link at the bottom climbing back up: `escape` then names
    `<letters>/<bottom>` followed by `levels + 1` times `..`, which stays inside the destination
    as text but, resolved, climbs `levels + 1` directories above it. The path Python's realpath
    would have to follow is longer than PATH_MAX, so it stops resolving and checks the text.
    Returns the entries and the name (`escape`) that leads above the destination."""
    component = "d" * 247
    steps = [chr(ord("a") + i) for i in range(levels)]
    entries: list[tuple] = []
    path = ""
    for step in steps:
        entries.append((os.path.join(path, component), tarfile.DIRTYPE, ""))
        entries.append((os.path.join(path, step), tarfile.SYMTYPE, component))
        path = os.path.join(path, component)
    bottom = os.path.join(*steps, "l" * 254)
    entries.append((bottom, tarfile.SYMTYPE, "../" * levels))
    entries.append(("escape", tarfile.SYMTYPE, bottom + "/.." * (levels + 1)))
    return entries, "escape"
