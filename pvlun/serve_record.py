"""What a running `pvlun serve` leaves in its data dir for the CLI: its pid, its CSI endpoints
and its node IDs. Written once its servers listen, removed when it stops, so that every
command reaches the daemon however it was started (`--endpoint`, `--node-id`, `--mode`).

`serve.json` for mode all; `serve-controller.json` and `serve-node.json` for split daemons
sharing a data dir (their parts are put together when read).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

MODES = ("all", "controller", "node")


@dataclass
class ServeRecord:
    controller: str = ""  # endpoint of the Controller service ("" when no running daemon serves it)
    nodes: dict[str, str] = field(default_factory=dict)  # node ID → endpoint of its Node service, first node first


def record_path(data_dir: str, mode: str) -> str:
    return os.path.join(data_dir, "serve.json" if mode == "all" else f"serve-{mode}.json")


def write(data_dir: str, mode: str, controller: str, nodes: dict[str, str]) -> None:
    path = record_path(data_dir, mode)
    fd = os.open(path + ".new", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"pid": os.getpid(), "mode": mode, "controller": controller, "nodes": nodes}, f)
    os.replace(path + ".new", path)


def remove(data_dir: str, mode: str) -> None:
    try:
        os.unlink(record_path(data_dir, mode))
    except FileNotFoundError:
        pass


def _alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def read(data_dir: str) -> ServeRecord | None:
    """The endpoints of the daemons running on data_dir (records of dead ones are ignored)."""
    found = ServeRecord()
    for mode in MODES:
        try:
            with open(record_path(os.path.abspath(data_dir), mode)) as f:
                data = json.load(f)
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict) or not _alive(data.get("pid")):
            continue
        found.controller = found.controller or str(data.get("controller") or "")
        for node_id, endpoint in (data.get("nodes") or {}).items():
            found.nodes.setdefault(str(node_id), str(endpoint))
    return found if found.controller or found.nodes else None
