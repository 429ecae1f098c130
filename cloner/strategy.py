"""Which of CDI's clone strategies a DataVolume clone of a claim takes, and why.

CDI's planner: the strategy asked for is the target class's StorageProfile `status.cloneStrategy`
(its spec, else the class's `cdi.kubevirt.io/clone-strategy` annotation, else what the driver
advises), `snapshot` when there is no profile. `snapshot` needs a VolumeSnapshotClass of the
driver; `snapshot` and `csi-clone` need source and target on one driver, in one volume mode,
and a target no larger than the source unless its class allows expansion. What cannot be done
falls back to `copy` (host-assisted), with CDI's reason.
"""

from __future__ import annotations

from dataclasses import dataclass

from controlplane.quantity import parse_quantity
from controlplane.storage_profiles import clone_strategy

SNAPSHOT, CSI_CLONE, COPY = "snapshot", "csi-clone", "copy"
CLONE_TYPE_ANNOTATION = "cdi.kubevirt.io/cloneType"  # on the DataVolume and its claim: the strategy taken
FALLBACK_ANNOTATION = "cdi.kubevirt.io/cloneFallbackReason"  # on the claim: why not the one asked for


@dataclass(frozen=True)
class Choice:
    strategy: str
    asked: str  # what the profile (or CDI's default) asked for
    reason: str = ""  # CDI's reason for a fallback (IncompatibleVolumeModes, ...); "" if none
    message: str = ""

    def says(self) -> str:
        """One line for events and conditions: which strategy, and why."""
        if self.reason:
            return f"clone strategy {self.strategy} (asked for {self.asked}): {self.message}"
        return f"clone strategy {self.strategy}, as the target's StorageProfile asks"


def asked_strategy(target_class: dict | None, profile: dict | None) -> str:
    """The strategy the target's class asks for; CDI's default (snapshot) without a class."""
    if target_class is None:
        return SNAPSHOT
    return clone_strategy(target_class, (profile or {}).get("spec") or {})


def choose_strategy(asked: str, *, source_pvc: dict, target_mode: str, target_size: int, source_class: dict | None,
                    target_class: dict | None, snapshot_classes: list[dict]) -> Choice:
    """CDI's planner over what the store holds (a pure function: the caller looks things up)."""
    def fallback(reason: str, message: str) -> Choice:
        return Choice(COPY, asked, reason, message)

    if asked not in (SNAPSHOT, CSI_CLONE):
        return Choice(COPY, asked)
    driver = (target_class or {}).get("provisioner", "")
    if asked == SNAPSHOT and not any(c.get("driver") == driver for c in snapshot_classes):
        return fallback("NoVolumeSnapshotClass", f"no VolumeSnapshotClass of driver {driver or '(none)'}")
    if not driver or (source_class or {}).get("provisioner") != driver:
        return fallback("IncompatibleProvisioners", "source and target are provisioned by different drivers")
    source_mode = (source_pvc.get("spec") or {}).get("volumeMode") or "Filesystem"
    if source_mode != target_mode:
        return fallback("IncompatibleVolumeModes", f"the source is a {source_mode} volume and the target "
                                                   f"a {target_mode} one: the disk is copied across")
    capacity = ((source_pvc.get("status") or {}).get("capacity") or {}).get("storage") or "0"
    if target_size > parse_quantity(str(capacity)) and not (target_class or {}).get("allowVolumeExpansion"):
        return fallback("NoVolumeExpansion", f"the target is larger than the source and storageclass "
                                             f"{target_class['metadata']['name']} does not allow volume expansion")
    return Choice(asked, asked)
