"""Which reconcilers the control loop (controlplane/control_loop.py) runs, and start-up
repair: the wiring of the parts (importer, cloner, virt) into the control plane."""

from __future__ import annotations

from controlplane.context import Context
from controlplane.control_loop import ControlLoop, Reconciler
from controlplane.instancetypes import KINDS as INSTANCETYPE_KINDS


def reconcilers() -> list[tuple[str, Reconciler]]:
    """Kind → reconcile function. A kind may have several; they run in this order, one key
    at a time: the garbage collector first (an orphan is deleted, not worked on), then the
    kind's controller."""
    from importer.reconcile import reconcile_datavolume
    from importer.data_source import reconcile_data_source
    from importer.import_cron import reconcile_data_import_cron
    from importer.vm_export import reconcile_virtual_machine_export
    from controlplane.garbage_collector import KINDS as COLLECTED, collect_if_orphaned
    from controlplane.kubelet import reconcile_attachment
    from controlplane.provisioner import reconcile_pvc
    from controlplane.snapshotter import reconcile_volume_snapshot
    from controlplane.storage_profiles import reconcile_storage_profile

    table: list[tuple[str, Reconciler]] = [(kind, collect_if_orphaned) for kind in COLLECTED] + [
        ("VolumeAttachment", reconcile_attachment),
        ("DataVolume", reconcile_datavolume),
        ("PersistentVolumeClaim", reconcile_pvc),
        ("VolumeSnapshot", reconcile_volume_snapshot),
        ("DataSource", reconcile_data_source),
        ("DataImportCron", reconcile_data_import_cron),
        ("StorageClass", reconcile_storage_profile),
        ("VirtualMachineExport", reconcile_virtual_machine_export),
    ]
    try:
        from virt.reconcile import RECONCILERS as virt_reconcilers
    except ImportError:  # the virt layer is optional for the driver alone
        return table
    return table + list(virt_reconcilers) + vm_snapshot_reconcilers() + replica_reconcilers()


def replica_reconcilers() -> list[tuple[str, Reconciler]]:
    """KubeVirt's VirtualMachinePool and VirtualMachineInstanceReplicaSet controllers (both modes)."""
    from virt.vm_pools import KIND as POOL_KIND, reconcile_vm_pool
    from virt.vmi_replica_sets import KIND as REPLICA_SET_KIND, reconcile_vmi_replica_set

    return [(POOL_KIND, reconcile_vm_pool), (REPLICA_SET_KIND, reconcile_vmi_replica_set)]


def vm_snapshot_reconcilers() -> list[tuple[str, Reconciler]]:
    """KubeVirt's snapshot.kubevirt.io controllers (on a cluster through VolumeSnapshots: virt/vm_snapshot_cluster.py)."""
    from virt.vm_restore import reconcile_vm_restore
    from virt.vm_snapshot import reconcile_vm_snapshot, reconcile_vm_snapshot_content

    return [("VirtualMachineSnapshot", reconcile_vm_snapshot),
            ("VirtualMachineSnapshotContent", reconcile_vm_snapshot_content),
            ("VirtualMachineRestore", reconcile_vm_restore)]


# On a cluster: what the reconcilers read besides their own kinds (claims for DataVolumes and
# VMs, Pods for their importers and launchers, StorageProfiles, the instancetypes and preferences VMs name).
CLUSTER_WATCHED = ("PersistentVolumeClaim", "Pod", "StorageProfile", *INSTANCETYPE_KINDS)
# ... and only the Pods it made (importer and launcher Pods carry this label), not the cluster's
CLUSTER_SELECTORS = {"Pod": "app.kubernetes.io/managed-by=pvlun-controller"}


def cluster_reconcilers() -> list[tuple[str, Reconciler]]:
    """On a cluster the CSI sidecars provision, snapshot and attach, and Kubernetes' garbage
    collector follows ownerReferences: what is left is CDI's and KubeVirt's controllers."""
    from importer.data_source import reconcile_data_source
    from importer.import_cron import reconcile_data_import_cron
    from importer.reconcile import reconcile_datavolume
    from importer.vm_export import reconcile_virtual_machine_export
    from virt.reconcile import CLUSTER_RECONCILERS

    from controlplane.storage_profiles import reconcile_storage_profile

    return [("DataVolume", reconcile_datavolume), ("DataSource", reconcile_data_source),
            ("DataImportCron", reconcile_data_import_cron), ("StorageClass", reconcile_storage_profile),
            ("VirtualMachineExport", reconcile_virtual_machine_export)] + list(CLUSTER_RECONCILERS) + \
        vm_snapshot_reconcilers() + replica_reconcilers()


def run_loop(ctx: Context) -> ControlLoop:
    loop = ControlLoop(ctx, reconcilers())
    loop.start()
    return loop


def recover(ctx: Context) -> dict[str, int]:
    """Start-up repair, each part its own objects, in the order that keeps a VM from running
    twice and tells an upload under way: QEMU and VMIs, attachments, imports, migrations."""
    from controlplane.recovery import recover_attachments
    from importer.recovery import recover_imports
    from virt.recovery import recover_migrations, recover_vmis

    counts = dict.fromkeys(("qemu", "attachments", "foreign", "vmis", "datavolumes", "migrations", "failed",
                            "scratch"), 0)
    recover_vmis(ctx, counts)
    owners = recover_attachments(ctx, counts)
    recover_imports(ctx, counts, owners)
    recover_migrations(ctx, counts)
    return counts
