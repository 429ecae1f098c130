"""Which embedded node can take another volume: the scheduler's share of kubelet's work.

Every node publishes at most `--max-volumes-per-node` volumes (CSI's max_volumes_per_node).
A node's used slots are the distinct volumes its VolumeAttachments name, plus what work
that holds a reservation has not attached yet. Work takes the first node with room: the
embedded nodes are one host, so packing gains nothing by spreading and keeps a VM where
its user expects it, while a crowd overflows onto the next node. When no node has room the
work waits (the job queue keeps it) instead of failing at ControllerPublish.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from controlplane.kubelet import NodeFull
from controlplane.store import ObjectStore


class NoFreeSlot(LookupError):
    """No node had a free attach slot in time."""


def _owns(owner: str, attachment_owner: str) -> bool:
    return attachment_owner == owner or attachment_owner.startswith(owner + "/")


@dataclass
class Usage:
    """Free slots per node at one moment, and which nodes hold each owner's attachments."""

    free: dict[str, int]
    holders: dict[str, set[str]]  # attachment owner -> nodes

    def nodes_of(self, owner: str) -> set[str]:
        return {n for o, nodes in self.holders.items() if _owns(owner, o) for n in nodes}


class NodeSlots:
    def __init__(self, store: ObjectStore, node_ids: list[str], limit: int):
        self.store, self.node_ids, self.limit = store, list(node_ids), limit
        self._lock = threading.RLock()
        self._reserved: dict[str, tuple[str, int]] = {}  # owner -> (node, volumes)

    def usage(self) -> Usage:
        volumes: dict[str, set[str]] = {n: set() for n in self.node_ids}
        holders: dict[str, set[str]] = {}
        made: dict[tuple[str, str], int] = {}  # (owner, node) -> attachments
        for att in self.store.list("VolumeAttachment"):
            spec = att.get("spec") or {}
            node, owner = spec.get("nodeName"), spec.get("owner", "")
            if node in volumes:
                volumes[node].add(spec.get("volumeId"))
                holders.setdefault(owner, set()).add(node)
                made[(owner, node)] = made.get((owner, node), 0) + 1
        free = {n: self.limit - len(v) for n, v in volumes.items()}
        with self._lock:
            for owner, (node, count) in self._reserved.items():
                done = sum(c for (o, n), c in made.items() if n == node and _owns(owner, o))
                free[node] -= max(0, count - done)
        return Usage(free, holders)

    def reserve(self, owner: str, volumes: int, usage: Usage | None = None) -> str | None:
        """A node for `owner`'s `volumes` attachments (owner or owner/... in their records):
        the node that already holds some of them (a retry after a failed detach), else the
        first node with enough free slots. They stay reserved until `release`.
        `usage` (from `usage()`, updated here) lets a caller place many in one pass."""
        with self._lock:
            usage = self.usage() if usage is None else usage
            held = sorted(usage.nodes_of(owner))
            room = [n for n in self.node_ids if usage.free[n] >= volumes]
            if not held and not room:
                return None
            node = held[0] if held else room[0]
            usage.free[node] -= volumes
            self._reserved[owner] = (node, volumes)
            return node

    def release(self, owner: str) -> None:
        with self._lock:
            self._reserved.pop(owner, None)

    @contextmanager
    def hold(self, owner: str, volumes: int = 1, timeout: float = 60) -> Iterator[str]:
        """Wait (up to `timeout`) for a node with room, keep it reserved inside the block;
        a node found full there after all is NoFreeSlot too (for work that cannot queue)."""
        deadline = time.monotonic() + timeout
        while (node := self.reserve(owner, volumes)) is None:
            if time.monotonic() >= deadline:
                raise NoFreeSlot(f"no node has {volumes} free attach slot(s) now (each takes {self.limit}); "
                                 "try again later")
            time.sleep(0.2)
        try:
            yield node
        except NodeFull as exc:  # another attacher won the race for the slot
            raise NoFreeSlot(f"{exc}; try again later") from None
        finally:
            self.release(owner)
