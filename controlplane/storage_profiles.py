"""CDI's StorageProfile: one per StorageClass of pvlun's driver (cluster-scoped, the class's
name), saying what a DataVolume's claim gets when its `spec.storage` leaves the access and
volume modes out (the first of `claimPropertySets`, or the first with the volume mode it
gives), and how clones of the class are made (`cloneStrategy`, recorded here). An
administrator's `spec.claimPropertySets` / `spec.cloneStrategy` win over what pvlun knows.
"""

from __future__ import annotations

import copy

from controlplane.context import Context
from controlplane.provisioner import storage_class_for
from controlplane.store import Obj
from csi import DRIVER_NAME

KIND = "StorageProfile"
API_VERSION = "cdi.kubevirt.io/v1beta1"
# What the driver serves, the default first: a Filesystem claim for one node (as a claim gets
# without a profile), Block for one node, Block on many nodes (live migration).
DRIVER_PROPERTY_SETS = [
    {"accessModes": ["ReadWriteOnce"], "volumeMode": "Filesystem"},
    {"accessModes": ["ReadWriteOnce"], "volumeMode": "Block"},
    {"accessModes": ["ReadWriteMany"], "volumeMode": "Block"},
]
DRIVER_CLONE_STRATEGY = "csi-clone"  # CreateVolume from a volume: a reflink copy in the pool
CLONE_STRATEGIES = ("copy", "snapshot", "csi-clone")  # CDI's names
CLONE_STRATEGY_ANNOTATION = "cdi.kubevirt.io/clone-strategy"  # on a StorageClass: what its profile gets


def clone_strategy(sc: Obj, spec: Obj) -> str:
    """The profile's status.cloneStrategy as CDI's storage profile controller computes it: the
    profile's spec.cloneStrategy, else the class's `cdi.kubevirt.io/clone-strategy` annotation,
    else what CDI advises for the driver (pvlun: csi-clone, a reflink in the pool)."""
    wanted = spec.get("cloneStrategy")
    if wanted in CLONE_STRATEGIES:
        return wanted
    annotated = (sc["metadata"].get("annotations") or {}).get(CLONE_STRATEGY_ANNOTATION)
    if annotated in CLONE_STRATEGIES:
        return annotated
    return DRIVER_CLONE_STRATEGY


def profile_status(sc: Obj, profile: Obj | None) -> Obj:
    """The status CDI's storage profile controller would give the class's profile."""
    spec = (profile or {}).get("spec") or {}
    return {"storageClass": sc["metadata"]["name"], "provisioner": sc.get("provisioner", ""),
            "claimPropertySets": copy.deepcopy(spec.get("claimPropertySets") or DRIVER_PROPERTY_SETS),
            "cloneStrategy": clone_strategy(sc, spec),
            "dataImportCronSourceFormat": "pvc",
            **({"snapshotClass": spec["snapshotClass"]} if spec.get("snapshotClass") else {})}


def reconcile_storage_profile(ctx: Context, sc: Obj) -> None:
    """Make or keep the StorageProfile of a class of pvlun's driver (keyed on the StorageClass;
    a profile's own change reaches here through its link to the class of its name)."""
    if sc.get("provisioner") != DRIVER_NAME or sc["metadata"].get("deletionTimestamp"):
        return
    name = sc["metadata"]["name"]
    profile = ctx.store.get(KIND, name, "")
    if profile is None:
        owner = [{"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass", "name": name,
                  "uid": sc["metadata"]["uid"]}] if sc["metadata"].get("uid") else []
        profile = ctx.store.create({"apiVersion": API_VERSION, "kind": KIND,
                                    "metadata": {"name": name, "ownerReferences": owner}, "spec": {}})
    status = profile_status(sc, profile)
    if profile.get("status") != status:
        ctx.store.update_status(KIND, name, "", status)


def claim_defaults(storage: dict, property_sets: list, source_mode: bool = False) -> dict:
    """`spec.storage` with the access and volume modes it leaves out filled from the profile's
    property sets, as CDI does: the first set, or the first with the volume mode given. With
    `source_mode` (a clone) a missing volume mode stays missing: the clone takes its source's."""
    if storage.get("accessModes") and storage.get("volumeMode"):
        return storage
    mode = storage.get("volumeMode")
    chosen = next((s for s in property_sets if isinstance(s, dict) and (mode is None or s.get("volumeMode") == mode)),
                  None)
    if chosen is None:
        return storage
    out = dict(storage)
    if not out.get("accessModes") and chosen.get("accessModes"):
        out["accessModes"] = list(chosen["accessModes"])
    if not out.get("volumeMode") and chosen.get("volumeMode") and not source_mode:
        out["volumeMode"] = chosen["volumeMode"]
    return out


def with_profile_defaults(ctx: Context, dv: Obj) -> Obj:
    """The DataVolume with `spec.storage`'s missing modes taken from its class's StorageProfile
    (a copy; the DataVolume itself when there is nothing to fill or no profile). `spec.pvc` is
    a claim spec as given: it gets nothing (CDI's rule)."""
    storage = (dv.get("spec") or {}).get("storage")
    if not isinstance(storage, dict) or (storage.get("accessModes") and storage.get("volumeMode")):
        return dv
    sc = storage_class_for(ctx, {"spec": {"storageClassName": storage.get("storageClassName")}})
    profile = ctx.store.get(KIND, sc["metadata"]["name"], "") if sc else None
    sets = ((profile or {}).get("status") or {}).get("claimPropertySets") or []
    clone = any(k in ((dv.get("spec") or {}).get("source") or {}) for k in ("pvc", "snapshot"))
    filled = claim_defaults(storage, sets, source_mode=clone)
    if filled is storage:
        return dv
    out = copy.deepcopy(dv)
    out["spec"]["storage"] = filled
    return out
