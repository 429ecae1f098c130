"""Warning events `FieldIgnored` on a VirtualMachine or VirtualMachineInstance, one per field
its spec keeps but QEMU does not run (controlplane/vm_ignored.py), so `describe` names each.

Called from the shared reconcile path (virt/reconcile.py), so both `pvlun serve` and the
cluster controller say it; scheduling fields (nodeSelector, ...) only where they are ignored,
i.e. not on a cluster, whose launcher Pods carry them. Each event is written once per object
(its uid) and message: a memo spares the store on every reconcile, and the object's stored
events spare a restarted daemon from repeating them.
"""

from __future__ import annotations

from controlplane.context import Context
from controlplane.store import Obj
from controlplane.vm_ignored import REASON, event_messages
from controlplane.vm_spec import SpecError, parse_virtual_machine, parse_virtual_machine_instance

_MEMO = "spec_warnings"
_MEMO_MAX = 4096  # objects remembered; an older one forgotten only costs one look at its events


def announce_ignored(ctx: Context, obj: Obj | None) -> None:
    """The FieldIgnored events of a VM or VMI, each once; a spec that does not parse says
    nothing here (its status says why it cannot run)."""
    if obj is None:
        return
    try:
        if obj.get("kind") == "VirtualMachine":
            ignored = parse_virtual_machine(obj).template.ignored
        else:
            ignored = parse_virtual_machine_instance(obj).ignored
    except SpecError:
        return
    messages = event_messages(ignored, cluster=ctx.cluster is not None)
    meta = obj["metadata"]
    key = (obj["kind"], meta.get("namespace", "default"), meta["name"], meta.get("uid", ""))
    memo: dict = ctx.services.setdefault(_MEMO, {})
    if memo.get(key) == messages:
        return
    if messages:
        said = {e["message"] for e in ctx.store.events(obj) if e.get("reason") == REASON}
        for message in messages:
            if message not in said:
                ctx.store.add_event(obj, "Warning", REASON, message)
    if len(memo) >= _MEMO_MAX:
        memo.pop(next(iter(memo)))
    memo[key] = messages
