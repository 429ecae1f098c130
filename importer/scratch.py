"""Scratch space: `DATA_DIR/scratch`, where images that cannot be read in place are downloaded
(`pvlun-scratch-*`) and nbdkit's sockets and caches live (`pvlun-nbd-*`).

A finished import removes its own; one cut off by a crash (kill -9 mid-upload) cannot, so
the daemon's start-up repair removes what is left, and only pvlun's own entries.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat

log = logging.getLogger("pvlun.import")
IMAGE_PREFIX = "pvlun-scratch-"  # a downloaded image, converted from there
NBD_PREFIX = "pvlun-nbd-"        # an nbdkit's socket and cache


def scratch_dir(data_dir: str) -> str:
    """The scratch directory of a data dir, made if missing."""
    path = os.path.join(data_dir, "scratch")
    os.makedirs(path, exist_ok=True)
    return path


def clean_scratch(data_dir: str) -> int:
    """Remove the scratch entries imports cut off by a crash left behind (never anything else
    in the directory, never following a link); return how many. Only while no import runs."""
    root = os.path.join(data_dir, "scratch")
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return 0
    removed = 0
    for name in names:
        if not name.startswith((IMAGE_PREFIX, NBD_PREFIX)):
            continue
        path = os.path.join(root, name)
        try:
            if stat.S_ISDIR(os.lstat(path).st_mode):
                shutil.rmtree(path)
            else:
                os.unlink(path)
            removed += 1
        except OSError as exc:
            log.warning("cannot remove the scratch left-over %s: %s", name, exc.strerror)
    return removed
