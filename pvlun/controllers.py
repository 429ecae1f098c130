"""The embedded control plane's loop: reconcile every object of every kind whenever the
store changes (and once a second regardless), as Kubernetes controllers would."""

from __future__ import annotations

import logging
import threading
from typing import Callable

from pvlun.context import Context
from pvlun.garbage_collector import collect_garbage
from pvlun.store import Obj

log = logging.getLogger("pvlun.controllers")

Reconciler = Callable[[Context, Obj], None]


def reconcilers() -> list[tuple[str, Reconciler]]:
    """Kind → reconcile function, in the order a change flows through them."""
    from importer.reconcile import reconcile_datavolume
    from pvlun.provisioner import reconcile_pvc
    from pvlun.snapshotter import reconcile_volume_snapshot

    table: list[tuple[str, Reconciler]] = [
        ("DataVolume", reconcile_datavolume),
        ("PersistentVolumeClaim", reconcile_pvc),
        ("VolumeSnapshot", reconcile_volume_snapshot),
    ]
    try:
        from virt.reconcile import RECONCILERS as virt_reconcilers
    except ImportError:  # the virt layer is optional for the driver alone
        virt_reconcilers = []
    return table + list(virt_reconcilers)


def reconcile_once(ctx: Context, table: list[tuple[str, Reconciler]]) -> None:
    for kind, fn in table:
        for obj in ctx.store.list(kind):
            if ctx.stopping.is_set():
                return
            try:
                fn(ctx, obj)
            except Exception as exc:  # one bad object must not stop the others
                log.exception("reconcile %s %s failed", kind, obj["metadata"].get("name"))
                ctx.store.add_event(obj, "Warning", "ReconcileError", str(exc))


def run_loop(ctx: Context) -> threading.Thread:
    table = reconcilers()

    def loop() -> None:
        seen = -1
        while not ctx.stopping.is_set():
            current = ctx.store.wait_for_change(seen, timeout=1.0)
            seen = current
            reconcile_once(ctx, table)
            collect_garbage(ctx)

    thread = threading.Thread(target=loop, name="reconcile", daemon=True)
    thread.start()
    return thread
