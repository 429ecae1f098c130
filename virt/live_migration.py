"""Live migration of a running VMI to another node, driven by a
VirtualMachineInstanceMigration object: publish the volumes on the target (pre hook),
QEMU migration, unpublish from the source (post hook) — or clean the target on failure."""

from __future__ import annotations

import logging
import shlex
import threading

from controlplane.context import Context
from controlplane.store import Obj, remove_finalizer
from controlplane.user_text import user_text
from virt.hooks import HookContext, MigrationHooks
from virt.launcher import VmLauncher
from virt.migration import MigrationStatus, local_stream_pair, migrate, tcp_stream_pair
from virt.runtime import CSI_SOURCES, attach_volumes, detach_volumes, set_vmi_status
from controlplane.vm_spec import SpecError, parse_migration

log = logging.getLogger("pvlun.virt")
NODE_SELECTOR_KEY = "kubernetes.io/hostname"
FINALIZER = "pvlun.dev/migration"


def register_user_hooks(ctx: Context, hooks: MigrationHooks) -> None:
    """Hooks given to `pvlun serve --migration-hook EVENT=COMMAND`, and Python callables
    registered in ctx.services['migration_hooks'] as (event, callable); they run after ours."""
    for event, hook in ctx.services.get("migration_hooks", []):
        hooks.register(event, shlex.split(hook) if isinstance(hook, str) else hook)


def _status(ctx: Context, mig: Obj, **fields) -> None:
    meta = mig["metadata"]
    ctx.store.merge_status("VirtualMachineInstanceMigration", meta["name"], meta.get("namespace", "default"), **fields)


def start_migration(ctx: Context, mig: Obj) -> None:
    from virt.reconcile import runtime

    meta = mig["metadata"]
    ns = meta.get("namespace", "default")
    try:
        vmi_name = parse_migration(mig).vmi_name
    except SpecError as exc:
        _status(ctx, mig, phase="Failed", reason=user_text(exc))
        return
    key = f"{ns}/{vmi_name}"
    rt = runtime(ctx).get(key)
    if rt is None:
        _status(ctx, mig, phase="Failed", reason=f"VirtualMachineInstance {key} is not running")
        return
    problem = not_migratable(ctx, rt.spec)
    if problem:
        _status(ctx, mig, phase="Failed", reason=problem)
        return
    selector = (mig.get("spec") or {}).get("addedNodeSelector") or {}
    target = selector.get(NODE_SELECTOR_KEY) or next((n for n in ctx.node_ids if n != rt.node), None)
    if target is None or target == rt.node or target not in ctx.node_ids:
        _status(ctx, mig, phase="Failed",
                reason=f"no target node: nodes are {', '.join(ctx.node_ids)} and the VMI runs on {rt.node}")
        return
    _status(ctx, mig, phase="Scheduling", sourceNode=rt.node, targetNode=target)
    meta = mig["metadata"]
    if FINALIZER not in meta.get("finalizers", []):  # a delete while it runs cancels it
        ctx.store.patch_metadata("VirtualMachineInstanceMigration", meta["name"], ns,
                                 finalizers=meta.get("finalizers", []) + [FINALIZER])
    cancels(ctx).setdefault(key_of(mig), threading.Event())
    ctx.jobs.start("migration:" + key, lambda: run_migration(ctx, mig, key, target))


def cancels(ctx: Context) -> dict[str, threading.Event]:
    """One cancel flag per running migration (by the migration object's key)."""
    return ctx.services.setdefault("migration_cancels", {})


def key_of(obj: Obj) -> str:
    return f"{obj['metadata'].get('namespace', 'default')}/{obj['metadata']['name']}"


def cancel_migration(ctx: Context, mig: Obj) -> None:
    """The migration object was deleted: abort what runs (the source keeps running), then let it go."""
    flag = cancels(ctx).get(key_of(mig))
    if flag is not None and not flag.is_set():
        log.info("migration %s deleted: cancelling", key_of(mig))
        flag.set()
    vmi = (mig.get("spec") or {}).get("vmiName", "")
    if not ctx.jobs.running(f"migration:{mig['metadata'].get('namespace', 'default')}/{vmi}"):
        cancels(ctx).pop(key_of(mig), None)
        remove_finalizer(ctx.store, mig, FINALIZER)


def not_migratable(ctx: Context, spec) -> str | None:
    """KubeVirt's LiveMigratable condition: every CSI volume shared (block, ReadWriteMany)."""
    for volume in spec.volumes:
        if volume.source == "emptyDisk":
            return f"volume {volume.name} is an emptyDisk; it cannot move between nodes"
        if volume.source == "containerDisk":  # its overlay holds the guest's writes on this node only
            return f"volume {volume.name} is a containerDisk; its writes stay on this node"
        if volume.source in CSI_SOURCES:
            pvc = ctx.store.get("PersistentVolumeClaim", volume.claim_name, spec.namespace) or {}
            pvc_spec = pvc.get("spec") or {}
            if "ReadWriteMany" not in (pvc_spec.get("accessModes") or []) or pvc_spec.get("volumeMode") != "Block":
                return (f"volume {volume.name} (claim {volume.claim_name}) is not shared: live migration needs "
                        "volumeMode Block with accessModes ReadWriteMany")
    return None


def run_migration(ctx: Context, mig: Obj, key: str, target: str) -> MigrationStatus:
    from virt.reconcile import runtime

    vms = runtime(ctx)
    rt = vms.get(key)
    made: dict[str, object] = {}

    def publish_on_target(hook: HookContext) -> None:
        disks, attached = attach_volumes(ctx, rt.spec, key, target)
        made["disks"], made["attached"] = disks, attached

    def unpublish_from_source(hook: HookContext) -> None:
        detach_volumes(ctx, source_attached, key)

    def clean_target(hook: HookContext) -> None:
        detach_volumes(ctx, made.get("attached", {}), key)

    def target_launcher() -> VmLauncher:
        launcher = vms.launcher(rt.spec, key, target, made["disks"], incoming="defer")
        made["launcher"] = launcher
        return launcher

    hooks = MigrationHooks()
    hooks.register("pre", publish_on_target, name="publish-volumes-on-target")
    hooks.register("post", unpublish_from_source, name="unpublish-volumes-from-source")
    hooks.register("failed", clean_target, name="unpublish-volumes-from-target")
    register_user_hooks(ctx, hooks)
    source_attached = dict(rt.attachments)
    rt.migrating = True

    def progress(status: MigrationStatus) -> None:
        fields = status.as_dict()
        if fields["phase"] == "Succeeded":  # not before the post hooks ran and the VMI names the target (below)
            fields["phase"] = "Running"
        _status(ctx, mig, **fields)
        set_vmi_status(ctx, key, migrationState=fields)

    address = ctx.services.get("migration_address")  # `pvlun serve --migration-network`: ours in it
    try:
        result = migrate(rt.launcher, target_launcher, hooks=hooks, source_node=rt.node, target_node=target,
                         on_progress=progress, cancel=cancels(ctx).get(key_of(mig)),
                         stream_pair=tcp_stream_pair(address) if address else local_stream_pair)
    finally:
        rt.migrating = False
    cancels(ctx).pop(key_of(mig), None)
    if result.phase == "Succeeded":
        rt.launcher = made["launcher"]  # type: ignore[assignment]
        rt.node = target
        rt.attachments = made["attached"]  # type: ignore[assignment]
        set_vmi_status(ctx, key, phase="Running", nodeName=target, launcher=rt.launcher.status(),
                       migrationState=result.as_dict())
    _status(ctx, mig, **result.as_dict())
    return result
