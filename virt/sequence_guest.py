"""The sequence guest: the linux test guest (virt/guest_images.py) running a script that writes
a rising sequence number to two disks in a loop — disk A, then disk B, each write synced before
the next — so a snapshot of both disks taken at one instant holds B == A or B == A - 1, never
anything else. What VM snapshot tests and benchmarks check crash consistency with.

Disk A (the guest's vdb) is a raw tar holding the script, which the guest's init extracts and
runs (`after=script`); its number lives at A_OFFSET, past the tar. Disk B (vdc) holds its number
at offset 0. At start the script carries on from the number on disk A (a restored disk goes on
from where its snapshot was), printing `PVLUN-SEQ-START <n>`, and `PVLUN-SEQ-RUNNING` once it
has written a few."""

from __future__ import annotations

import io
import os
import re
import tarfile
from pathlib import Path

from host.command import run
from virt.guest_images import build_linux_disk

A_OFFSET = 2 << 20  # disk A's number, past the tar the script comes in
DISK_BYTES = 4 << 20
SCRIPT_NAME = "seq.sh"
SCRIPT = f"""a=/dev/vdb; b=/dev/vdc
n=$(dd if=$a bs=512 skip={A_OFFSET // 512} count=1 2>/dev/null | tr -dc '0-9')
n=${{n:-0}}
echo "PVLUN-SEQ-START $n"
while true; do
  n=$((n+1))
  printf 'SEQ %d\\n' $n | dd of=$a bs=512 seek={A_OFFSET // 512} count=1 conv=notrunc,sync,fsync 2>/dev/null
  printf 'SEQ %d\\n' $n | dd of=$b bs=512 count=1 conv=notrunc,sync,fsync 2>/dev/null
  [ $n -eq 3 ] && echo PVLUN-SEQ-RUNNING
done
"""
_NUMBER = re.compile(rb"SEQ (\d+)\n")


def build_boot_disk(path: str | os.PathLike) -> Path:
    """The linux guest's boot disk, told to run the script on its disk A."""
    return build_linux_disk(path, data_device="vdb", check_file=SCRIPT_NAME, after="script", marker="PVLUN-SEQ-DONE")


def build_disk_a(path: str | os.PathLike) -> Path:
    """Disk A: a tar holding the script, its number's place still zero — as a qcow2 image (an
    importer takes a bare tar for an archive that should hold a disk image, not for the disk)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo(SCRIPT_NAME)
        info.size, info.mode = len(SCRIPT), 0o755
        tar.addfile(info, io.BytesIO(SCRIPT.encode()))
    path = Path(path)
    raw = path.with_name(path.name + ".raw")
    try:
        with open(raw, "wb") as f:
            f.write(out.getvalue())
            f.truncate(DISK_BYTES)
        run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(path)])
    finally:
        raw.unlink(missing_ok=True)
    return path


def read_number(path: str | os.PathLike, offset: int) -> int:
    """The sequence number a disk (a LUN file or device) holds at `offset`; 0 if none yet."""
    with open(path, "rb") as f:
        f.seek(offset)
        found = _NUMBER.match(f.read(512))
    return int(found.group(1)) if found else 0


def read_pair(disk_a: str | os.PathLike, disk_b: str | os.PathLike) -> tuple[int, int]:
    """(A, B) as the two disks hold them."""
    return read_number(disk_a, A_OFFSET), read_number(disk_b, 0)


def vm_manifest(name: str, url: str, *, storage_class: str = "", strategy: str = "Always") -> str:
    """A VirtualMachine of three Block DataVolumes: boot (the linux guest), A (imported: the
    script) and B (blank). `url` is where boot.img and seqa.img are served."""
    cls = f", storageClassName: {storage_class}" if storage_class else ""
    storage = "{volumeMode: Block, accessModes: [ReadWriteOnce]%s, resources: {requests: {storage: %s}}}"
    return f"""apiVersion: kubevirt.io/v1
kind: VirtualMachine
metadata: {{name: {name}}}
spec:
  runStrategy: {strategy}
  dataVolumeTemplates:
  - metadata: {{name: {name}-boot}}
    spec: {{source: {{http: {{url: "{url}/boot.img"}}}}, storage: {storage % (cls, "64Mi")}}}
  - metadata: {{name: {name}-a}}
    spec: {{source: {{http: {{url: "{url}/seqa.img"}}}}, storage: {storage % (cls, "4Mi")}}}
  - metadata: {{name: {name}-b}}
    spec: {{source: {{blank: {{}}}}, storage: {storage % (cls, "4Mi")}}}
  template:
    spec:
      terminationGracePeriodSeconds: 1
      domain:
        resources: {{requests: {{memory: 256Mi}}}}
        devices:
          autoattachPodInterface: false
          disks:
          - {{name: boot, bootOrder: 1, disk: {{bus: virtio}}}}
          - {{name: a, disk: {{bus: virtio}}}}
          - {{name: b, disk: {{bus: virtio}}}}
      volumes:
      - {{name: boot, dataVolume: {{name: {name}-boot}}}}
      - {{name: a, dataVolume: {{name: {name}-a}}}}
      - {{name: b, dataVolume: {{name: {name}-b}}}}
"""
