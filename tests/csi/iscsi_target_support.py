"""A real tgtd for tests: on 127.0.0.1, a free portal port and a free control port of its own
(never a system tgtd's), started and stopped by the fixture; and the iscsi backend on it."""

from __future__ import annotations

import os
import random
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from csi.backends.file import FileBackend
from csi.backends.iscsi import IscsiBackend
from csi.catalog import Catalog
from csi.lun_service import LunService
from csi.validation import Capability
from host.tgt import SOCKET_DIR, TgtDaemon, control_port_free

BLOCK = Capability("block", "MULTI_NODE_MULTI_WRITER")
MiB = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_control_port() -> int:
    for _ in range(100):
        port = random.randint(20000, 32767)  # tgtd's -C stops at 32767
        if control_port_free(port) and not os.path.exists(os.path.join(SOCKET_DIR, f"socket.{port}")):
            return port
    raise RuntimeError("no free tgtd control port")


def new_tgtd(tmp: Path) -> TgtDaemon:
    return TgtDaemon(f"127.0.0.1:{free_port()}", free_control_port(), str(tmp / "tgtd.log"), io_threads=2)


@dataclass
class IscsiRig:
    luns: LunService
    backend: IscsiBackend
    catalog: Catalog
    root: Path

    @property
    def tgtd(self) -> TgtDaemon:
        return self.backend.tgtd

    def create(self, name: str, size: int = 4 * MiB, params: dict | None = None, secrets: dict | None = None):
        return self.luns.create_volume(name, size, 0, [BLOCK], {"backend": "iscsi", **(params or {})}, {},
                                       secrets=secrets)

    def iscsi_url(self, ctx: dict[str, str]) -> str:
        return f"iscsi://{ctx['portal']}/{ctx['targetIQN']}/{ctx['lun']}"

    def image_opts(self, ctx: dict[str, str], initiator: str | None = None, secret_id: str = "") -> str:
        opts = (f"driver=iscsi,transport=tcp,portal={ctx['portal']},target={ctx['targetIQN']},lun={ctx['lun']},"
                f"initiator-name={initiator or ctx['initiatorName']}")
        if secret_id:
            opts += f",user={ctx['chapUser']},password-secret={secret_id}"
        return opts


def make_rig(root: Path, default: str = "file") -> IscsiRig:
    catalog = Catalog(str(root / "catalog.db"))
    backend = IscsiBackend(FileBackend(str(root / "pool")), catalog, new_tgtd(root), default=default)
    luns = LunService(catalog, backend)
    luns.repair()
    backend.start()
    return IscsiRig(luns, backend, catalog, root)


def close_rig(rig: IscsiRig) -> None:
    rig.backend.stop()
    rig.catalog.close()


@pytest.fixture
def iscsi_rig(tmp_path) -> Iterator[IscsiRig]:
    """The iscsi backend on a real tgtd of its own; tgtd is stopped after the test."""
    rig = make_rig(tmp_path)
    try:
        yield rig
    finally:
        close_rig(rig)


def qemu(argv: list[str], timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
