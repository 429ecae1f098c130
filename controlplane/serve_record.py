"""What a running `pvlun serve` leaves in its data dir for the CLI: its pid, its CSI endpoints
and its node IDs. Written once its servers listen, removed when it stops, so that every
command reaches the daemon however it was started (`--endpoint`, `--node-id`, `--mode`).

`serve.json` for mode all; `serve-controller.json` and `serve-node-NODE_ID.json` for split
daemons sharing a data dir (their parts are put together when read).
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field


@dataclass
class ServeRecord:
    controller: str = ""  # endpoint of the Controller service ("" when no running daemon serves it)
    nodes: dict[str, str] = field(default_factory=dict)  # node ID → endpoint of its Node service, first node first


def node_endpoint(data_dir: str, node_id: str) -> str:
    """Where a node plugin of the daemon on data_dir listens, unless --endpoint said otherwise."""
    return f"unix://{os.path.join(data_dir, 'nodes', node_id, 'csi.sock')}"


def default_endpoint(data_dir: str) -> str:
    """Where the daemon on data_dir serves its controller (and first node), by default."""
    return f"unix://{os.path.join(os.path.abspath(data_dir), 'csi.sock')}"


def role(mode: str, node_id: str) -> str:
    """What one daemon is on its data dir: "all", "controller" or "node-NODE_ID" (node
    plugins of several node IDs may share a data dir)."""
    return f"node-{node_id}" if mode == "node" else mode


def file_name(role_name: str, suffix: str) -> str:
    """serve.json / serve.pid for mode all, serve-ROLE.json / serve-ROLE.pid otherwise."""
    return "serve" + suffix if role_name == "all" else f"serve-{role_name}{suffix}"


def record_path(data_dir: str, role_name: str) -> str:
    return os.path.join(data_dir, file_name(role_name, ".json"))


def write(data_dir: str, role_name: str, controller: str, nodes: dict[str, str]) -> None:
    path = record_path(data_dir, role_name)
    fd = os.open(path + ".new", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"pid": os.getpid(), "mode": role_name.partition("-")[0], "controller": controller,
                   "nodes": nodes}, f)
    os.replace(path + ".new", path)


def remove(data_dir: str, role_name: str) -> None:
    try:
        os.unlink(record_path(data_dir, role_name))
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
    data_dir = os.path.abspath(data_dir)
    paths = [record_path(data_dir, "all"), record_path(data_dir, "controller")]
    paths += sorted(glob.glob(os.path.join(glob.escape(data_dir), "serve-node*.json")))
    for path in paths:
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict) or not _alive(data.get("pid")):
            continue
        found.controller = found.controller or str(data.get("controller") or "")
        for node_id, endpoint in (data.get("nodes") or {}).items():
            found.nodes.setdefault(str(node_id), str(endpoint))
    return found if found.controller or found.nodes else None
