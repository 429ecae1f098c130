"""VirtualMachinePool controller (KubeVirt's pool controller), the same in both modes: it
works only through the ObjectStore, and what runs the VMs is the VM controller.

- Scale out: VMs named `<pool>-<index>`, the lowest free indexes first (a name another VM of
  the namespace holds is skipped, and so is an index whose `<template>-<index>` DataVolume or
  claim exists already: a VM never takes a disk it does not own), made from the template with
  their dataVolumeTemplates renamed per index (controlplane/replica_specs.py), owned by the
  pool (controller: true). Every VM the pool writes passes the admission `pvlun apply` runs.
- Scale in (proactive, KubeVirt's default; `unmanaged` and `opportunistic` delete nothing): VMs
  already being deleted count as gone; of the others KubeVirt's selection
  policy picks (`scaleInStrategy.proactive.selectionPolicy.sortPolicy`: AscendingOrder,
  DescendingOrder, Newest, Oldest; Random, KubeVirt's default, when not given). Deleting a VM
  stops it; its DataVolumes follow through the garbage collector.
- Template changes: the pool's spec is kept per generation in a ControllerRevision
  `<pool>-<generation>` the pool owns (shortened with a hash when that is no label value),
  and every VM and VMI carries the revision it came from
  (label `kubevirt.io/vm-pool-revision-name`). A VM whose revision's template differs from the
  pool's is updated in place (opportunistic); a running VM whose VMI came from a different
  VMI template is restarted (proactive, KubeVirt's default; `updateStrategy.opportunistic`
  leaves that to the next start, `unmanaged` updates nothing); one whose dataVolumeTemplates
  changed is deleted and made again. Unused revisions are pruned.
- `spec.paused`: nothing is scaled or updated; status still follows (ReplicaPaused).
- A VM whose labels its selector no longer selects is released (virt/replica_claims.py).
"""

from __future__ import annotations

import hashlib
import logging
import random

from controlplane.admission import LABEL_MAX, admit
from controlplane.context import Context
from controlplane.label_selectors import matches
from controlplane.replica_specs import (BURST_REPLICAS, REVISION_LABEL, controlled_by, owner_reference, pool_vm,
                                        pool_vm_name, replicas_of, vm_index)
from controlplane.store import Conflict, Obj
from controlplane.user_text import user_text
from virt.reconcile import REQUEST
from virt.replica_claims import claimed
from virt.replica_status import POOL_PAUSE, is_ready, write_status

log = logging.getLogger("pvlun.virt")
KIND = "VirtualMachinePool"
REVISION_KIND = "ControllerRevision"
STEPS = {"FailedScaleOut": "scale out", "FailedScaleIn": "scale in", "FailedUpdate": "VM update"}


def revision_name(pool: Obj) -> str:
    """KubeVirt's name for a pool's revision, `<pool>-<generation>`; it is also the value of
    every VM's revision label, so one longer than a label value may be (63 characters) keeps
    the start of the pool's name, then a hash of all of it and the generation."""
    name, generation = pool["metadata"]["name"], pool["metadata"].get("generation", 1)
    if len(f"{name}-{generation}") <= LABEL_MAX:
        return f"{name}-{generation}"
    suffix = f"-{hashlib.sha256(name.encode()).hexdigest()[:10]}-{generation}"
    return name[:LABEL_MAX - len(suffix)].rstrip("-.") + suffix


def _admitted(ctx: Context, pool: Obj, vm: Obj) -> None:
    """The VM as `pvlun apply` would take it (ValueError naming the problem, for ReplicaFailure),
    whose DataVolumes and claims are its own or not there yet."""
    admit(vm, f"pool {pool['metadata']['name']}")
    ns, uid = vm["metadata"].get("namespace", "default"), vm["metadata"].get("uid")
    for template in vm["spec"].get("dataVolumeTemplates") or []:
        name = template["metadata"]["name"]
        found = ctx.store.get("DataVolume", name, ns)  # its claim is the DataVolume's
        kind = "DataVolume" if found is not None else "PersistentVolumeClaim"
        found = found or ctx.store.get(kind, name, ns)
        if found is not None and not (uid and controlled_by(found, vm)):
            raise ValueError(f"{kind} {ns}/{name} exists and is not owned by VM {vm['metadata']['name']}: it is "
                             "left alone")


def _disks_taken(ctx: Context, ns: str, vm: Obj) -> bool:
    """Whether a DataVolume or claim the new VM would make exists already (another's disk)."""
    return any(ctx.store.get(kind, template["metadata"]["name"], ns) is not None
               for template in vm["spec"].get("dataVolumeTemplates") or []
               for kind in ("DataVolume", "PersistentVolumeClaim"))


def _revision_spec(ctx: Context, ns: str, name: str | None) -> dict | None:
    stored = ctx.store.get(REVISION_KIND, name, ns) if name else None
    data = (stored or {}).get("data")
    return data if isinstance(data, dict) else None


def _ensure_revision(ctx: Context, pool: Obj) -> str:
    name, ns = revision_name(pool), pool["metadata"].get("namespace", "default")
    if ctx.store.get(REVISION_KIND, name, ns) is None:
        try:
            ctx.store.create({"apiVersion": "apps/v1", "kind": REVISION_KIND,
                              "metadata": {"name": name, "namespace": ns, "ownerReferences": [owner_reference(pool)]},
                              "data": pool.get("spec") or {}, "revision": pool["metadata"].get("generation", 1)})
        except Conflict:
            pass  # made meanwhile
    return name


def _sorted_for_scale_in(pool: Obj, vms: list[Obj]) -> list[Obj]:
    policy = ((((pool["spec"].get("scaleInStrategy") or {}).get("proactive") or {}).get("selectionPolicy") or {})
              .get("sortPolicy")) or "Random"
    if policy == "Random":
        return random.sample(vms, len(vms))
    if policy in ("AscendingOrder", "DescendingOrder"):
        return sorted(vms, key=lambda vm: vm_index(vm["metadata"]["name"]) or 0, reverse=policy == "DescendingOrder")
    return sorted(vms, key=lambda vm: vm["metadata"].get("creationTimestamp", ""), reverse=policy == "Newest")


def _scale_out(ctx: Context, pool: Obj, count: int, revision: str) -> None:
    ns = pool["metadata"].get("namespace", "default")
    taken = {vm["metadata"]["name"] for vm in ctx.store.list("VirtualMachine", ns)}
    index = 0
    for _ in range(count):
        while pool_vm_name(pool["metadata"]["name"], index) in taken or \
                _disks_taken(ctx, ns, pool_vm(pool, index, revision)):
            index += 1
        vm = pool_vm(pool, index, revision)
        index += 1
        _admitted(ctx, pool, vm)  # the index made a name too long, ...: ValueError
        ctx.store.create(vm)
        taken.add(vm["metadata"]["name"])
        ctx.store.add_event(pool, "Normal", "SuccessfulCreate", f"Created VM {ns}/{vm['metadata']['name']}")
        log.info("pool %s/%s: VM %s created", ns, pool["metadata"]["name"], vm["metadata"]["name"])


def _scale_in(ctx: Context, pool: Obj, vms: list[Obj], count: int) -> None:
    ns, strategy = pool["metadata"].get("namespace", "default"), pool["spec"].get("scaleInStrategy") or {}
    if strategy.get("unmanaged") is not None or strategy.get("opportunistic") is not None:
        return  # KubeVirt's: VMs leave such a pool only when someone else deletes them
    eligible = [vm for vm in vms if not vm["metadata"].get("deletionTimestamp")]
    count -= len(vms) - len(eligible)  # those already going count
    for vm in _sorted_for_scale_in(pool, eligible)[:max(count, 0)]:
        ctx.store.delete("VirtualMachine", vm["metadata"]["name"], ns)
        ctx.store.add_event(pool, "Normal", "SuccessfulDelete", f"Deleted VM {ns}/{vm['metadata']['name']} with uid "
                                                                 f"{vm['metadata'].get('uid', '')} from pool")


def _update(ctx: Context, pool: Obj, vms: list[Obj], revision: str) -> None:
    """Opportunistic update of outdated VMs (their spec rewritten in place), then the
    proactive one of their running VMIs."""
    strategy = pool["spec"].get("updateStrategy") or {}
    if strategy.get("unmanaged") is not None:
        return
    ns, template = pool["metadata"].get("namespace", "default"), pool["spec"].get("virtualMachineTemplate")
    for vm in vms:
        if vm["metadata"].get("deletionTimestamp"):
            continue
        own = (vm["metadata"].get("labels") or {}).get(REVISION_LABEL)
        if (_revision_spec(ctx, ns, own) or {}).get("virtualMachineTemplate") != template:
            _rewrite(ctx, pool, vm, revision)
        elif strategy.get("opportunistic") is None:
            _proactive(ctx, pool, vm, own)


def _rewrite(ctx: Context, pool: Obj, vm: Obj, revision: str) -> None:
    name, ns = vm["metadata"]["name"], vm["metadata"].get("namespace", "default")
    index = vm_index(name)
    if index is None:
        return
    fresh = pool_vm(pool, index, revision)
    _admitted(ctx, pool, {**fresh, "metadata": {**fresh["metadata"], "uid": vm["metadata"].get("uid")}})
    updated = dict(vm, spec=fresh["spec"])
    updated["metadata"] = dict(vm["metadata"], labels=fresh["metadata"]["labels"])
    if "annotations" in fresh["metadata"]:
        updated["metadata"]["annotations"] = {**(vm["metadata"].get("annotations") or {}),
                                              **fresh["metadata"]["annotations"]}
    ctx.store.apply(updated)
    ctx.store.add_event(pool, "Normal", "SuccessfulUpdate", f"Updated VM {ns}/{name}")


def _proactive(ctx: Context, pool: Obj, vm: Obj, vm_revision: str | None) -> None:
    """A running VM whose VMI came from another revision: restarted when the VMI template
    differs, deleted (and made again) when the dataVolumeTemplates do, else only relabelled."""
    name, ns = vm["metadata"]["name"], vm["metadata"].get("namespace", "default")
    vmi = ctx.store.get("VirtualMachineInstance", name, ns)
    if vmi is None or vmi["metadata"].get("deletionTimestamp") or (vmi.get("status") or {}).get("phase") != "Running":
        return
    vmi_revision = (vmi["metadata"].get("labels") or {}).get(REVISION_LABEL)
    if vmi_revision == vm_revision or (vm["metadata"].get("annotations") or {}).get(REQUEST):
        return
    wanted = ((_revision_spec(ctx, ns, vm_revision) or {}).get("virtualMachineTemplate") or {}).get("spec") or {}
    had = ((_revision_spec(ctx, ns, vmi_revision) or {}).get("virtualMachineTemplate") or {}).get("spec")
    if had is not None and had.get("dataVolumeTemplates") != wanted.get("dataVolumeTemplates"):
        ctx.store.delete("VirtualMachine", name, ns)
        ctx.store.add_event(pool, "Normal", "SuccessfulDelete", f"Deleted VM {ns}/{name}: its dataVolumeTemplates "
                                                                 "changed")
    elif had is None or had.get("template") != wanted.get("template"):
        ctx.store.annotate("VirtualMachine", name, ns, **{REQUEST: "restart"})  # as `virtctl restart`
        ctx.store.add_event(pool, "Normal", "SuccessfulUpdate", f"Restarting VM {ns}/{name} with its updated template")
    else:
        ctx.store.patch_metadata("VirtualMachineInstance", name, ns,
                                 labels={**(vmi["metadata"].get("labels") or {}), REVISION_LABEL: vm_revision})


def _prune_revisions(ctx: Context, pool: Obj, vms: list[Obj], keep: str) -> None:
    ns = pool["metadata"].get("namespace", "default")
    used = {keep}
    for vm in vms:
        used.add((vm["metadata"].get("labels") or {}).get(REVISION_LABEL))
        vmi = ctx.store.get("VirtualMachineInstance", vm["metadata"]["name"], ns)
        used.add(((vmi or {}).get("metadata", {}).get("labels") or {}).get(REVISION_LABEL))
    for revision in ctx.store.list(REVISION_KIND, ns):
        if controlled_by(revision, pool) and revision["metadata"]["name"] not in used:
            ctx.store.delete(REVISION_KIND, revision["metadata"]["name"], ns)


def reconcile_vm_pool(ctx: Context, pool: Obj) -> float | None:
    meta, spec = pool["metadata"], pool.get("spec") or {}
    ns = meta.get("namespace", "default")
    if meta.get("deletionTimestamp"):
        return None  # its VMs, their DataVolumes and its revisions follow through the garbage collector
    template_labels = ((spec.get("virtualMachineTemplate") or {}).get("metadata") or {}).get("labels") or {}
    try:
        if not matches(spec.get("selector"), template_labels):
            return None  # refused at admission; a stored one from elsewhere is left alone, as KubeVirt does
    except ValueError:
        return None
    vms = claimed(ctx, pool, "VirtualMachine")
    failure = None
    if not spec.get("paused"):
        diff = len(vms) - replicas_of(spec)
        step = "FailedScaleOut" if diff < 0 else "FailedScaleIn" if diff > 0 else "FailedUpdate"
        try:
            revision = _ensure_revision(ctx, pool)
            if diff < 0:
                _scale_out(ctx, pool, min(-diff, BURST_REPLICAS), revision)
            elif diff > 0:
                _scale_in(ctx, pool, vms, min(diff, BURST_REPLICAS))
            else:
                _update(ctx, pool, vms, revision)
                _prune_revisions(ctx, pool, vms, revision)
        except Conflict:
            raise  # a race with another writer: the loop retries, as KubeVirt requeues
        except Exception as exc:  # noqa: BLE001 - reported on the pool (ReplicaFailure), retried by the loop
            failure = (step, f"error during {STEPS[step]}: {user_text(exc)}")
        vms = claimed(ctx, pool, "VirtualMachine")
    write_status(ctx, ctx.store.get(KIND, meta["name"], ns) or pool, len(vms), sum(map(is_ready, vms)), failure,
                 POOL_PAUSE)
    return 10.0 if failure else None

