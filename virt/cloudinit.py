"""NoCloud seed images for cloudInitNoCloud volumes.

cloud-init's NoCloud datasource looks for a file system labelled `cidata` holding
user-data, meta-data and optionally network-config. We write an ISO 9660 image with
genisoimage (Joliet + Rock Ridge, volume id cidata), as KubeVirt does; it is attached
read-only like any other volume (a regular file, so `-blockdev` driver file).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from host.command import run
from controlplane.vm_spec import Volume, VmSpec


def meta_data(vm: VmSpec) -> str:
    """NoCloud meta-data: a stable instance-id (so a migration or restart is not a new instance)."""
    return f"instance-id: {vm.namespace}.{vm.name}\nlocal-hostname: {vm.hostname or vm.name}\n"


def build_nocloud_seed(path: str | os.PathLike, vm: VmSpec, volume: Volume) -> Path:
    """Write the seed image for `volume` (a cloudInitNoCloud volume of `vm`) to `path`."""
    if volume.source != "cloudInitNoCloud":
        raise ValueError(f"volume {volume.name} is not a cloudInitNoCloud volume")
    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="pvlun-cidata-") as tmp:
        files = ["user-data", "meta-data"]
        Path(tmp, "user-data").write_text(volume.user_data or "")
        Path(tmp, "meta-data").write_text(meta_data(vm))
        if volume.network_data is not None:
            Path(tmp, "network-config").write_text(volume.network_data)
            files.append("network-config")
        partial = path.with_name(path.name + ".part")
        partial.unlink(missing_ok=True)  # genisoimage would write through whatever is there
        run(["genisoimage", "-quiet", "-output", str(partial), "-volid", "cidata", "-joliet", "-rock",
             *[str(Path(tmp, f)) for f in files]])
        partial.replace(path)
    return path

