"""Test guests made at run time from Debian packages and our own code.

Two guests, both small and quick under TCG:
- the *tick* disk: one boot sector (virt/bootsector.py) that prints a marker and then a
  tick counter on COM1 — shows that a migrated guest kept running;
- the *linux* disk: SYSLINUX (Debian `syslinux`, on a FAT file system) booting the Debian
  kernel with a busybox-static initramfs whose init mounts the second disk and prints the
  sha256 of a file put there by the test, then a marker; its *agent* variant also carries the
  QEMU guest agent (Debian `qemu-guest-agent`'s qemu-ga with its libraries) and starts it on
  the agent's virtio-serial port.
`build_data_disk` makes that second disk (ext4 via `mkfs.ext4 -d`, no mount needed).
"""

from __future__ import annotations

import glob
import gzip
import io
import os
import shutil
import stat
import tempfile
from pathlib import Path

from host.command import output, run
from virt.bootsector import tick_boot_sector

TICK_DISK_SIZE = 1 << 20
LINUX_MODULES = ("virtio_pci", "virtio_blk", "virtio_net", "ext4", "crc32c_generic")
BUSYBOX = "/bin/busybox"
QEMU_GA = "/usr/sbin/qemu-ga"
AGENT_MODULES = ("virtio_console",)
OS_RELEASE = 'ID=pvlun-test\nNAME="pvlun test guest"\nPRETTY_NAME="pvlun test guest (busybox)"\nVERSION_ID=1\n'


def build_tick_disk(path: str | os.PathLike, marker: str = "PVLUN-BOOT", *, size: int = TICK_DISK_SIZE,
                    poweroff_after: int = 0) -> Path:
    """Write a raw disk whose boot sector prints `marker` and then "tick N" lines on COM1
    (and powers the guest off after "tick `poweroff_after`", when given)."""
    path = Path(path)
    with open(path, "wb") as f:
        f.write(tick_boot_sector(marker, poweroff_after=poweroff_after))
        f.truncate(max(size, 512))
    return path


def kernel_path() -> Path:
    """The newest Debian kernel in /boot (package linux-image-amd64)."""
    found = sorted(glob.glob("/boot/vmlinuz-*"))
    if not found:
        raise FileNotFoundError("no /boot/vmlinuz-*: install linux-image-amd64")
    return Path(found[-1])


def _module_files(release: str, names: tuple[str, ...]) -> list[Path]:
    """Module files for `names` plus their dependencies, in load order (deps first)."""
    base = Path("/lib/modules") / release
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (base / "modules.dep").read_text().splitlines():
        mod, _, rest = line.partition(":")
        deps[mod] = rest.split()
        by_name[Path(mod).name.split(".ko")[0].replace("-", "_")] = mod
    ordered: list[str] = []

    def visit(mod: str) -> None:
        if mod in ordered:
            return
        for dep in reversed(deps.get(mod, [])):
            visit(dep)
        ordered.append(mod)

    for name in names:
        if name not in by_name:
            continue  # built into this kernel
        visit(by_name[name])
    return [base / m for m in ordered]


def _cpio_newc(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A newc cpio archive of (name, mode, data) entries — the initramfs format."""
    out = io.BytesIO()
    for ino, (name, mode, data) in enumerate(entries + [("TRAILER!!!", 0, b"")], start=1):
        encoded = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0]
        out.write(b"070701" + b"".join(b"%08X" % v for v in fields) + encoded)
        out.write(b"\0" * (-out.tell() % 4) + data)
        out.write(b"\0" * (-out.tell() % 4))
    return out.getvalue()


INIT_SCRIPT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules.order); do insmod "/lib/modules/$m" 2>/dev/null; done
data=/dev/vdb; file=payload.bin; marker=PVLUN-LINUX; after=idle; mode=ro
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    pvlun.data=*) data="/dev/${arg#pvlun.data=}" ;;
    pvlun.file=*) file="${arg#pvlun.file=}" ;;
    pvlun.marker=*) marker="${arg#pvlun.marker=}" ;;
    pvlun.after=*) after="${arg#pvlun.after=}" ;;
    pvlun.mount=rw) mode=rw ;;
  esac
done
i=0; while [ ! -b "$data" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
mkdir -p /mnt
if mount -t ext4 -o "$mode" "$data" /mnt 2>/dev/null || mount -o ro "$data" /mnt 2>/dev/null; then
  sum=$(sha256sum "/mnt/$file" | cut -d' ' -f1)
else
  cd /mnt && tar -xf "$data" "$file" 2>/dev/null; sum=$(sha256sum "/mnt/$file" | cut -d' ' -f1)
fi
echo "PVLUN-SHA256 ${sum:-none} $file"
if [ -x /usr/sbin/qemu-ga ]; then  # the agent variant: qemu-ga on its port (no udev: find it by name)
  port=; i=0
  while [ -z "$port" ] && [ $i -lt 100 ]; do
    for p in /sys/class/virtio-ports/*; do
      [ "$(cat "$p/name" 2>/dev/null)" = org.qemu.guest_agent.0 ] && [ -c "/dev/${p##*/}" ] && port="/dev/${p##*/}"
    done
    [ -n "$port" ] || { sleep 0.1; i=$((i+1)); }
  done
  if [ -n "$port" ]; then
    mkdir -p /run /dev/virtio-ports; ln -sf "$port" /dev/virtio-ports/org.qemu.guest_agent.0
    LD_LIBRARY_PATH=/lib/x86_64-linux-gnu /usr/sbin/qemu-ga -m virtio-serial \
      -p /dev/virtio-ports/org.qemu.guest_agent.0 -f /run/qemu-ga.pid -t /run 2>/run/qemu-ga.log &
    echo "PVLUN-AGENT started"
  else
    echo "PVLUN-AGENT no port"
  fi
fi
if [ "$after" = script ]; then sh "/mnt/$file"; fi
echo "$marker"
if [ "$after" = poweroff ]; then sync; poweroff -f; fi
while true; do sleep 3600; done
"""


def _shared_libraries(binary: str) -> list[str]:
    """The shared libraries `binary` loads, the dynamic loader included, as ldd names them."""
    found = []
    for line in output(["ldd", binary], timeout=30).splitlines():
        words = line.split()
        if "=>" in words and len(words) > words.index("=>") + 1 and words[words.index("=>") + 1].startswith("/"):
            found.append(words[words.index("=>") + 1])
        elif words and words[0].startswith("/"):
            found.append(words[0])
    return found


def _agent_entries() -> list[tuple[str, int, bytes]]:
    """qemu-ga (Debian qemu-guest-agent) and its libraries at their paths, and an os-release."""
    if not os.path.exists(QEMU_GA):
        raise FileNotFoundError(f"no {QEMU_GA}: install qemu-guest-agent")
    entries: list[tuple[str, int, bytes]] = [(d, stat.S_IFDIR | 0o755, b"") for d in ("usr", "usr/sbin", "etc", "run")]
    entries.append(("etc/os-release", stat.S_IFREG | 0o644, OS_RELEASE.encode()))
    made = {"usr", "usr/sbin", "etc", "run", "lib"}
    for lib in _shared_libraries(QEMU_GA):
        parts = lib.strip("/").split("/")
        for depth in range(1, len(parts)):
            directory = "/".join(parts[:depth])
            if directory not in made:
                made.add(directory)
                entries.append((directory, stat.S_IFDIR | 0o755, b""))
        entries.append(("/".join(parts), stat.S_IFREG | 0o755, Path(lib).read_bytes()))  # the file a link names
    entries.append((QEMU_GA.lstrip("/"), stat.S_IFREG | 0o755, Path(QEMU_GA).read_bytes()))
    return entries


def build_initramfs(path: str | os.PathLike, *, release: str | None = None, agent: bool = False) -> Path:
    """A gzip'd busybox-static initramfs with the virtio and ext4 modules and our init (and, for
    `agent`, qemu-ga with its libraries and the virtio console module its port needs)."""
    release = release or kernel_path().name.removeprefix("vmlinuz-")
    mods = _module_files(release, LINUX_MODULES + (AGENT_MODULES if agent else ()))
    entries: list[tuple[str, int, bytes]] = []
    for d in ("bin", "dev", "proc", "sys", "mnt", "lib", "lib/modules"):
        entries.append((d, stat.S_IFDIR | 0o755, b""))
    if agent:
        entries += _agent_entries()
    entries.append(("bin/busybox", stat.S_IFREG | 0o755, Path(BUSYBOX).read_bytes()))
    entries.append(("init", stat.S_IFREG | 0o755, INIT_SCRIPT.encode()))
    entries.append(("modules.order", stat.S_IFREG | 0o644, "".join(m.name + "\n" for m in mods).encode()))
    for m in mods:
        entries.append((f"lib/modules/{m.name}", stat.S_IFREG | 0o644, m.read_bytes()))
    path = Path(path)
    path.write_bytes(gzip.compress(_cpio_newc(entries), compresslevel=6))
    return path


def build_linux_disk(
    path: str | os.PathLike,
    *,
    marker: str = "PVLUN-LINUX",
    data_device: str = "vdb",
    check_file: str = "payload.bin",
    after: str = "idle",
    size_mib: int = 48,
    extra_cmdline: str = "",
    agent: bool = False,
) -> Path:
    """A raw FAT disk booted by SYSLINUX into the Debian kernel and our busybox initramfs.

    The guest mounts /dev/`data_device` (ext4, other fs, or a raw tar), prints
    "PVLUN-SHA256 <hex> <file>" and then `marker` on ttyS0; `after` is "idle" or "poweroff".
    With `agent`, qemu-ga runs in it ("PVLUN-AGENT started" on ttyS0); `pvlun.mount=rw` in
    `extra_cmdline` mounts the data disk writable (what a freeze has something to freeze on).
    """
    if after not in ("idle", "poweroff", "script"):
        raise ValueError('after must be "idle" or "poweroff"')
    for word in (marker, data_device, check_file):
        if not word or any(c.isspace() for c in word):
            raise ValueError(f"{word!r}: must be a non-empty word")
    kernel = kernel_path()
    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="pvlun-linux-") as tmp:
        initrd = build_initramfs(Path(tmp) / "initrd.img", release=kernel.name.removeprefix("vmlinuz-"), agent=agent)
        cfg = Path(tmp) / "syslinux.cfg"
        cmdline = (
            "console=ttyS0,115200 quiet loglevel=3 panic=-1 mitigations=off no_timer_check "
            f"pvlun.data={data_device} pvlun.file={check_file} pvlun.marker={marker} pvlun.after={after} {extra_cmdline}"
        ).strip()
        cfg.write_text(f"DEFAULT linux\nPROMPT 0\nTIMEOUT 0\nLABEL linux\n  KERNEL vmlinuz\n"
                       f"  INITRD initrd.img\n  APPEND {cmdline}\n")
        path.unlink(missing_ok=True)
        run(["mkfs.vfat", "-n", "PVLUNBOOT", "-C", str(path), str(size_mib * 1024)])
        run(["syslinux", "--install", str(path)])
        run(["mcopy", "-i", str(path), str(kernel), "::vmlinuz"])
        run(["mcopy", "-i", str(path), str(initrd), str(cfg), "::"])
    return path


def build_data_disk(path: str | os.PathLike, files: dict[str, bytes], *, size_mib: int = 16) -> Path:
    """A raw ext4 disk holding `files` (made with `mkfs.ext4 -d`, no mount needed)."""
    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="pvlun-data-") as tmp:
        for name, data in files.items():
            target = Path(tmp) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        path.unlink(missing_ok=True)
        with open(path, "wb") as f:
            f.truncate(size_mib << 20)
        run(["mkfs.ext4", "-q", "-F", "-d", tmp, str(path)])
    return path


def required_tools() -> list[str]:
    """Tools the linux guest needs that are missing (for a clear message in tests)."""
    return [t for t in ("mkfs.vfat", "syslinux", "mcopy", "mkfs.ext4") if shutil.which(t) is None]


def tick_vm_manifest(name: str, image_url: str, *, strategy: str = "Always", access: str = "ReadWriteMany",
                     memory: str = "64Mi", grace: int = 1) -> str:
    """A kubevirt.io/v1 VirtualMachine booting the tick guest from a Block DataVolume
    (dataVolumeTemplates, `<name>-root`) imported from `image_url`; ReadWriteMany so it
    can live-migrate. Used by the quickstart, the benchmarks and the tests."""
    return f"""apiVersion: kubevirt.io/v1
kind: VirtualMachine
metadata:
  name: {name}
spec:
  runStrategy: {strategy}
  dataVolumeTemplates:
  - metadata:
      name: {name}-root
    spec:
      source:
        http:
          url: {image_url}
      storage:
        volumeMode: Block
        accessModes: [{access}]
        resources:
          requests:
            storage: 8Mi
  template:
    metadata:
      labels:
        app: {name}
    spec:
      terminationGracePeriodSeconds: {grace}
      domain:
        cpu:
          cores: 1
        memory:
          guest: {memory}
        devices:
          autoattachPodInterface: false
          disks:
          - name: root
            bootOrder: 1
            disk:
              bus: virtio
      volumes:
      - name: root
        dataVolume:
          name: {name}-root
"""
