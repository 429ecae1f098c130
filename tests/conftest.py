"""What every test folder shares: the disk is shared with other work on this machine, and a
pool image holds real host blocks for what was provisioned in it, so the images of stopped
daemons go as soon as their test module ends."""

from __future__ import annotations

import os
import subprocess

import pytest


def _remove_pool_images(root: str, *, unmount: bool) -> None:
    """Delete the pool images under `root`. One still mounted belongs to a daemon that still
    runs (kept) — or, at the end of the session, to one a failed test left behind (unmounted
    lazily, then deleted)."""
    for parent, _dirs, files in os.walk(root):
        if "pool.img" not in files:
            continue
        pool = os.path.join(parent, "pool")
        if os.path.ismount(pool):
            if not unmount:
                continue
            subprocess.run(["umount", "-l", pool], check=False, capture_output=True)
        os.unlink(os.path.join(parent, "pool.img"))


@pytest.fixture(scope="module", autouse=True)
def remove_pool_images_of_the_module(tmp_path_factory):
    yield
    _remove_pool_images(str(tmp_path_factory.getbasetemp()), unmount=False)


@pytest.fixture(scope="session", autouse=True)
def remove_pool_images_of_the_session(tmp_path_factory):
    yield
    _remove_pool_images(str(tmp_path_factory.getbasetemp()), unmount=True)


# The Kubernetes API server test double and KubeStores on it (cluster mode's tests).
from kube_fixtures import kube_api_double, kube_kubeconfig, kube_store, make_kube_store  # noqa: E402,F401
