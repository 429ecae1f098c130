"""pvlun as a storage host and node hosts (host/netns.py): a split deployment for tests and
`make bench`.

The storage host runs `pvlun serve --mode controller` (with the iscsi backend, its target
listens on the storage host's address); every node host runs `pvlun serve --mode node
--node-id <host>` in its own network namespace. They share the data directory, where each
records its CSI endpoint (controlplane/serve_record.py); the endpoints are unix sockets,
filesystem objects, so a client in any network namespace reaches them:
`CsiClient.of_daemon(data_dir)` talks to the whole deployment.

`backend` is the backend the controller serves: "file" (the default; single-host, so it
proves the plumbing only) adds no flag; any other value is passed on as `--backend NAME`,
with `controller_args` / `node_args` for the rest (a target's portal, a node's initiator).
A node plugin's node ID is its host's name unless `node_ids` maps the host to another (host
names are short, as network namespaces want; a CSI node ID need not be). A node plugin may
have a data dir of its own (`node_dirs`), sharing nothing with the controller, as on a real
cluster: it reaches iSCSI LUNs from the publish context alone, and its start-up repair keeps
what its mounts show staged (pvlun/daemon.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from controlplane import serve_record
from host.netns import Hosts
from pvlun.local_run import start_daemon, stop_daemon


@dataclass
class SplitDeployment:
    """`start()` the controller on the `storage` host and a node plugin on each of `nodes`
    (default: every other host); `stop()` ends them, node plugins first. A context manager."""

    hosts: Hosts
    data_dir: str
    storage: str = "storage"  # the controller's host; "" runs it in the root namespace
    nodes: Sequence[str] = ()
    backend: str = "file"
    controller_args: Sequence[str] = ()
    node_args: Sequence[str] = ()
    pool_size: str = "2Gi"
    node_ids: Mapping[str, str] = field(default_factory=dict)  # host → its node plugin's node ID
    node_dirs: Mapping[str, str] = field(default_factory=dict)  # host → its own data dir (else data_dir)
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)  # role (serve_record.role) → daemon

    def __post_init__(self) -> None:
        if not self.nodes:
            self.nodes = [name for name in self.hosts.hosts if name != self.storage]

    def __enter__(self) -> "SplitDeployment":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        """The controller first (its pool exists before a node plugin looks for it), then the
        node plugins; each returns once it serves."""
        backend = [] if self.backend == "file" else ["--backend", self.backend]
        prefix = self.hosts[self.storage].prefix if self.storage else []
        self.processes["controller"] = start_daemon(
            self.data_dir, "--mode", "controller", *backend, *self.controller_args, pool_size=self.pool_size,
            prefix=prefix, log_name="serve-controller.log")
        for node in self.nodes:
            self._start_node(node)

    def _start_node(self, node: str) -> None:
        role = serve_record.role("node", self.node_id(node))
        self.processes[role] = start_daemon(self.node_dir(node), "--mode", "node", "--node-id", self.node_id(node),
                                            *self.node_args, prefix=self.hosts[node].prefix,
                                            log_name=f"serve-{role}.log")

    def restart_node(self, node: str, sig: int = signal.SIGTERM) -> None:
        """End the node plugin of host `node` with `sig` (SIGKILL: a crash, which leaves its pid
        file behind) and start it again; returns once it serves."""
        role = serve_record.role("node", self.node_id(node))
        proc = self.processes.pop(role)
        proc.send_signal(sig)
        proc.wait(60)
        pid_file = os.path.join(self.node_dir(node), serve_record.file_name(role, ".pid"))
        if os.path.exists(pid_file):
            os.unlink(pid_file)
        self._start_node(node)

    def node_id(self, node: str) -> str:
        """The node ID the node plugin of host `node` serves as."""
        return self.node_ids.get(node, node)

    def node_dir(self, node: str) -> str:
        """The data dir of the node plugin of host `node`."""
        return self.node_dirs.get(node, self.data_dir)

    def node_pid(self, node: str) -> int:
        """The pid of the node plugin of `node` (to check its namespace, or to kill it)."""
        return self.processes[serve_record.role("node", self.node_id(node))].pid

    def stop(self) -> None:
        dirs = {serve_record.role("node", self.node_id(n)): self.node_dir(n) for n in self.nodes}
        for role in sorted(self.processes, key=lambda r: r == "controller"):
            stop_daemon(self.processes[role], dirs.get(role, self.data_dir), owns_pool=role == "controller")
        self.processes.clear()
