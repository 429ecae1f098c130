"""Start-up repair of the node side: loop devices and mounts of this pool's LUNs that no
publication explains are undone.

The node service keeps no state: a stage or publish cut off by a crash (kill -9 while mkfs
ran, before the staging mount was made) leaves a loop device that no later NodeUnstage finds,
since unstaging follows the mounts at the staging path. Once the volume is deleted the device
holds a `vol-….img (deleted)` file forever and keeps the pool's filesystem busy ("pool stays
mounted: target is busy"). So, before the node serves, every loop device backed by a LUN file
of the pool's volumes dirs (deleted or not) is checked against the catalog's publications
(ControllerPublishVolume comes before any NodeStageVolume, and ControllerUnpublishVolume after
the last NodeUnstageVolume): a volume published nowhere may have nothing on a node, so the
device's mounts (staging mount, publish binds, device-node binds) are unmounted, newest
first, and the device is detached.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Collection, Sequence

from csi import attach
from host.command import CommandError

log = logging.getLogger(__name__)

_LUN_NAME = re.compile(r"(vol-[0-9a-f]{32})\.img")


def _volume_of(backing: str, volumes_dirs: Collection[str]) -> str | None:
    """The volume ID whose LUN file (in one of volumes_dirs, deleted or not) backs a device."""
    head, name = os.path.split(attach.deleted_backing(backing)[0])
    found = _LUN_NAME.fullmatch(name)
    return found.group(1) if found and head in volumes_dirs else None


def release_unexplained(volumes_dirs: Sequence[str], published: Collection[str]) -> dict[str, int]:
    """Unmount and detach every loop device of a LUN of these volumes dirs whose volume is
    not in `published`; returns what was undone. A device that cannot be released (a mount
    busy in use) is logged and left: the start goes on."""
    dirs = {os.path.realpath(d) for d in volumes_dirs}
    counts = {"devices": 0, "mounts": 0, "failed": 0}
    for device in attach.all_loop_devices():
        volume_id = _volume_of(device.backing_file, dirs)
        if volume_id is None or (volume_id in published and not attach.deleted_backing(device.backing_file)[1]):
            continue
        try:
            for mount in reversed(attach.mounts_using(device.path)):
                attach.unmount(mount.mount_point)
                counts["mounts"] += 1
            attach.detach_loop(device.path)
        except CommandError as exc:
            log.warning("cannot release %s of volume %s, which no publication explains: %s",
                        device.path, volume_id, exc)
            counts["failed"] += 1
            continue
        log.warning("released %s of volume %s: no publication explains it (a stage or publish a crash cut off)",
                    device.path, volume_id)
        counts["devices"] += 1
    return counts
