"""LUN accounting where people look: `pvlun luns` (one table: targets, nodes, groups, with
used/limit), `pvlun plan luns` (targets an estate needs, by the rules the driver places LUNs
with: csi/lun_slots.py) and the pvlun_iscsi_* gauges on the daemon's /metrics."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterator



def report_rows(rows: list[dict]) -> list[tuple[str, str, str, str]]:
    """(KIND, NAME, USED/LIMIT, NODES) lines: each target, then each node, then each group."""
    lines = []
    nodes: dict[str, int] = {}
    groups: dict[str, list[int]] = {}
    for r in rows:
        lines.append(("target", r["target"], f"{r['used']}/{r['limit']}",
                      ",".join(f"{n}:{c}" for n, c in r["nodes"].items()) or "-"))
        for node, count in r["nodes"].items():
            nodes[node] = nodes.get(node, 0) + count
        g = groups.setdefault(r["group"], [0, 0, 0])
        g[0] += r["used"]
        g[1] += r["limit"]
        g[2] += 1
    lines += [("node", node, str(count), "-") for node, count in sorted(nodes.items())]
    lines += [("group", name, f"{used}/{limit}", f"{targets} target{'s' if targets != 1 else ''}")
              for name, (used, limit, targets) in sorted(groups.items())]
    return lines


def format_table(lines: list[tuple[str, ...]], header: tuple[str, ...] = ("KIND", "NAME", "LUNS", "NODES")) -> str:
    rows = [header, *lines]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def read_accounting(data_dir: str) -> list[dict]:
    """The accounting from the instance's catalog (what the daemon exports; it need not run)."""
    from csi.catalog import Catalog
    from csi.iscsi_exports import ExportTable, accounting

    path = os.path.join(data_dir, "catalog.db")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no pvlun instance in {data_dir} (no catalog.db)")
    catalog, table = Catalog(path), ExportTable(path)
    try:
        return accounting(table, catalog)
    finally:
        table.close()
        catalog.close()


def cmd_luns(args: argparse.Namespace) -> int:
    rows = read_accounting(args.data_dir)
    if not rows:
        print("no iSCSI targets: no volume uses the iscsi backend")
        return 0
    print(format_table(report_rows(rows)))
    return 0


def cmd_plan_luns(args: argparse.Namespace) -> int:
    try:
        from csi.lun_slots import plan

        p = plan(args.vms, args.disks_per_vm, args.limit)
    except ValueError as exc:
        print(f"pvlun plan luns: {exc}", file=sys.stderr)
        return 1
    print(f"{args.vms} VMs x {args.disks_per_vm} disks = {p.luns} LUNs (one per PersistentVolume)")
    print(f"{p.targets} target{'s' if p.targets != 1 else ''} of at most {p.luns_per_target} LUNs"
          + (f" (the last holds {p.last_target_luns})" if p.targets else ""))
    return 0


def add_commands(sub, data_dir_arg: Callable[[argparse.ArgumentParser], None]) -> None:
    from host.tgt import MAX_LUNS_PER_TARGET

    luns = sub.add_parser("luns", help="iSCSI LUNs per target, per node and per target group, with the limits")
    data_dir_arg(luns)
    luns.set_defaults(func=cmd_luns)
    plan_parser = sub.add_parser("plan", help="plan capacity")
    what = plan_parser.add_subparsers(dest="what", required=True)
    p = what.add_parser("luns", help="how many LUNs and iSCSI targets a VM estate needs")
    p.add_argument("--vms", type=int, required=True)
    p.add_argument("--disks-per-vm", type=int, default=1)
    p.add_argument("--limit", type=int, default=MAX_LUNS_PER_TARGET,
                   help=f"LUNs per target (the StorageClass's lunsPerTarget; default and most: {MAX_LUNS_PER_TARGET})")
    p.set_defaults(func=cmd_plan_luns)


class LunCollector:
    """pvlun_iscsi_luns / pvlun_iscsi_lun_limit per target, pvlun_iscsi_node_luns per node,
    read when scraped."""

    def __init__(self, accounting: Callable[[], list[dict]]):
        self.accounting = accounting

    def describe(self) -> Iterator:
        return iter(())

    def collect(self) -> Iterator:
        from prometheus_client.core import GaugeMetricFamily

        rows = self.accounting()
        used = GaugeMetricFamily("pvlun_iscsi_luns", "LUNs exported by an iSCSI target", labels=["target", "group"])
        limit = GaugeMetricFamily("pvlun_iscsi_lun_limit", "LUNs an iSCSI target may hold (lunsPerTarget)",
                                  labels=["target", "group"])
        node = GaugeMetricFamily("pvlun_iscsi_node_luns", "iSCSI LUNs published on a node", labels=["node"])
        per_node: dict[str, int] = {}
        for r in rows:
            used.add_metric([r["target"], r["group"]], r["used"])
            limit.add_metric([r["target"], r["group"]], r["limit"])
            for n, c in r["nodes"].items():
                per_node[n] = per_node.get(n, 0) + c
        for n, c in sorted(per_node.items()):
            node.add_metric([n], c)
        yield from (used, limit, node)
