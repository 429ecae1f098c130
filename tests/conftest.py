"""What every test folder shares: the disk is shared with other work on this machine, so the
pool images the daemons made (sparse, but gigabytes once written) go when the session ends."""

from __future__ import annotations

import os
import subprocess

import pytest


@pytest.fixture(scope="session", autouse=True)
def remove_pool_images(tmp_path_factory):
    """After the session, delete every pool image under this worker's temporary root. A pool
    still mounted (a test that failed before it stopped its daemon) is unmounted lazily first."""
    yield
    root = str(tmp_path_factory.getbasetemp())
    for parent, _dirs, files in os.walk(root):
        for name in files:
            if name == "pool.img":
                pool = os.path.join(parent, "pool")
                if os.path.ismount(pool):
                    subprocess.run(["umount", "-l", pool], check=False, capture_output=True)
                os.unlink(os.path.join(parent, name))
