"""Where an iSCSI LUN goes, and how many targets an estate needs: pure rules, the same for
the driver (csi/backends/iscsi.py), `pvlun luns` and `pvlun plan luns`.

A *target group* (StorageClass parameter `targetGroup`, else "default") is a row of targets
`iqn.2026-12.dev.pvlun:<group>-<n>`, n = 1, 2, ...; each holds at most `lunsPerTarget`
disk LUNs, numbered 1..limit (tgt's LUN 0 is its controller). A new volume takes the lowest
free number of the lowest target with room; a full target opens the next one, up to
`maxTargets` (0: no bound). A group at 90% of its slots or more is near its limit.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from csi.errors import exhausted, invalid, shown
from host.tgt import MAX_LUNS_PER_TARGET

IQN_PREFIX = "iqn.2026-12.dev.pvlun"
GROUP = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
DEFAULT_GROUP = "default"
NEAR_LIMIT = 0.90
BACKENDS = {"file", "iscsi"}


@dataclass(frozen=True)
class GroupSpec:
    """What a StorageClass asks of the iscsi backend."""

    group: str = DEFAULT_GROUP
    luns_per_target: int = MAX_LUNS_PER_TARGET
    max_targets: int = 0  # 0: as many as needed

    @property
    def slots(self) -> int | None:
        """LUN slots of the whole group, None when targets are unbounded."""
        return self.luns_per_target * self.max_targets if self.max_targets else None


def target_iqn(group: str, index: int) -> str:
    return f"{IQN_PREFIX}:{group}-{index}"


def initiator_for_node(node_id: str) -> str:
    """The initiator name a node logs in with, from its CSI node ID alone (so the controller
    needs nothing the node wrote): node IDs are [A-Za-z0-9._-], all legal in an IQN once
    lowercased (RFC 3722 maps IQNs to lowercase)."""
    return f"{IQN_PREFIX}:node.{node_id.lower()}"


def _whole(parameters: dict[str, str], key: str, default: int, low: int, high: int) -> int:
    text = parameters.get(key, "")
    if not text:
        return default
    if not (text.isascii() and text.isdigit()) or not low <= int(text) <= high:
        raise invalid(f"StorageClass parameter {key} must be a whole number from {low} to {high}, not {shown(text)}")
    return int(text)


def backend_of(parameters: dict[str, str], default: str) -> str:
    name = parameters.get("backend", "") or default
    if name not in BACKENDS:
        raise invalid(f"StorageClass parameter backend {shown(name)} is not one of {', '.join(sorted(BACKENDS))}")
    return name


def group_spec(parameters: dict[str, str]) -> GroupSpec:
    group = parameters.get("targetGroup", "") or DEFAULT_GROUP
    if not GROUP.fullmatch(group):
        raise invalid(f"StorageClass parameter targetGroup {shown(group)} must be 1-63 lowercase letters, digits "
                      "or '-', starting and ending with a letter or digit")
    return GroupSpec(group, _whole(parameters, "lunsPerTarget", MAX_LUNS_PER_TARGET, 1, MAX_LUNS_PER_TARGET),
                     _whole(parameters, "maxTargets", 0, 0, 100000))


def place(used: dict[int, set[int]], spec: GroupSpec) -> tuple[int, int]:
    """(target index, LUN number) for a new LUN of a group whose targets hold `used`
    (index -> LUN numbers taken); RESOURCE_EXHAUSTED when every allowed target is full."""
    index = 1
    while not spec.max_targets or index <= spec.max_targets:
        taken = used.get(index, set())
        if len(taken) < spec.luns_per_target:
            return index, min(set(range(1, spec.luns_per_target + 1)) - taken)
        index += 1
    raise exhausted(f"target group {spec.group} is full: {spec.max_targets} targets x {spec.luns_per_target} LUNs "
                    "are all in use. Delete volumes, or raise maxTargets or lunsPerTarget in the StorageClass")


def free_slots(used: dict[int, set[int]], spec: GroupSpec) -> int | None:
    """LUN slots left in the group (None: unbounded)."""
    if spec.slots is None:
        return None
    return max(0, spec.slots - sum(len(v) for i, v in used.items() if i <= spec.max_targets))


def near_limit(used: dict[int, set[int]], spec: GroupSpec) -> str:
    """A warning when the group (bounded) or its newest target is at 90% or more, else ""."""
    if spec.slots is not None:
        taken = spec.slots - (free_slots(used, spec) or 0)
        if taken >= NEAR_LIMIT * spec.slots:
            return (f"target group {spec.group} uses {taken} of its {spec.slots} LUN slots ({taken / spec.slots:.0%}); "
                    "raise maxTargets or lunsPerTarget before it is full")
    return ""


@dataclass(frozen=True)
class Plan:
    luns: int
    targets: int
    luns_per_target: int
    last_target_luns: int  # LUNs on the last, possibly partly filled, target


def plan(vms: int, disks_per_vm: int, limit: int = MAX_LUNS_PER_TARGET) -> Plan:
    """How many LUNs and targets `vms` VMs of `disks_per_vm` disks each need, every disk its
    own LUN and at most `limit` LUNs a target (as `place` fills them)."""
    for value, what in ((vms, "--vms"), (disks_per_vm, "--disks-per-vm"), (limit, "--limit")):
        if type(value) is not int or value < (0 if what == "--vms" else 1):
            raise ValueError(f"{what} must be a whole number{' of at least 1' if what != '--vms' else ''}")
    if limit > MAX_LUNS_PER_TARGET:
        raise ValueError(f"--limit {limit} is above what tgtd can hold in one target ({MAX_LUNS_PER_TARGET})")
    luns = vms * disks_per_vm
    targets = math.ceil(luns / limit)
    return Plan(luns, targets, limit, luns - (targets - 1) * limit if targets else 0)
