"""Choose the accelerator: KVM only when a probe guest really boots on it, else TCG.

/dev/kvm existing is not enough: under some nested setups a KVM guest sits in its BIOS
for seconds or forever. So we boot the tick guest (virt/bootsector.py) with -accel kvm and
wait for its marker on the serial port for a few seconds. The answer is cached in the
process and in a small file keyed by the host boot id, so a fleet of VMs pays the probe once
per boot. `PVLUN_ACCEL=kvm|tcg` or the `override` argument skip the probe. The probe QEMU
runs in the same sandbox as every QEMU (host/sandbox.py), handed only its disk, its log
directory and /dev/kvm.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from host.sandbox import Sandbox, give, prepare_dir
from virt.guest_images import build_tick_disk
from virt.qemu_args import QEMU_BINARY, SECCOMP

PROBE_MARKER = "PVLUN-KVM-PROBE"
KVM_DEVICE = "/dev/kvm"
DEFAULT_PROBE_SECONDS = 2.0
_chosen: str | None = None


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def _cache_file() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pvlun" / "accel.json"


def kvm_devices() -> list[str]:
    """The devices a KVM guest's QEMU is handed."""
    return [KVM_DEVICE]


def probe_kvm(timeout: float = DEFAULT_PROBE_SECONDS, qemu_binary: str = QEMU_BINARY) -> bool:
    """True when a guest under KVM prints its marker within `timeout` seconds."""
    binary = shutil.which(qemu_binary)
    if not os.access(KVM_DEVICE, os.R_OK | os.W_OK) or binary is None:
        return False
    with tempfile.TemporaryDirectory(prefix="pvlun-kvm-probe-") as tmp:
        disk = build_tick_disk(Path(tmp) / "probe.img", PROBE_MARKER)
        give(str(disk))
        logs = prepare_dir(tmp, "log-")
        log = Path(logs) / "serial.log"
        argv = [qemu_binary, "-nodefaults", "-no-user-config", "-display", "none", "-sandbox", SECCOMP,
                "-accel", "kvm", "-m", "32",
                "-blockdev", json.dumps({"driver": "file", "filename": str(disk), "node-name": "f0", "read-only": True}),
                "-device", "virtio-blk-pci,drive=f0",
                "-chardev", "file,id=s0,path=" + str(log).replace(",", ",,"), "-serial", "chardev:s0"]
        handed = [str(disk)] + ([] if os.path.realpath(binary).startswith("/usr/") else [binary])
        with Sandbox(read_only=handed, writable=[logs], devices=kvm_devices()) as box:
            proc = subprocess.Popen(box.wrap(argv), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            try:
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline and proc.poll() is None:
                    if log.exists() and PROBE_MARKER.encode() in log.read_bytes():
                        return True
                    time.sleep(0.05)
                return False
            finally:
                proc.kill()  # bwrap: its sandbox dies with it (die-with-parent)
                proc.wait()


def choose_accel(override: str | None = None, *, probe_timeout: float = DEFAULT_PROBE_SECONDS,
                 use_cache: bool = True) -> str:
    """"kvm" or "tcg": the override, else $PVLUN_ACCEL, else the (cached) probe's answer."""
    global _chosen
    wanted = override or os.environ.get("PVLUN_ACCEL") or ""
    if wanted:
        if wanted not in ("kvm", "tcg"):
            raise ValueError(f"accelerator must be kvm or tcg, not {wanted!r}")
        return wanted
    if use_cache and _chosen:
        return _chosen
    cache = _cache_file()
    if use_cache:
        try:
            saved = json.loads(cache.read_text())
            if saved.get("bootId") == _boot_id() and saved.get("accel") in ("kvm", "tcg"):
                _chosen = saved["accel"]
                return _chosen
        except (OSError, ValueError):
            pass
    _chosen = "kvm" if probe_kvm(probe_timeout) else "tcg"
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"bootId": _boot_id(), "accel": _chosen, "probedAt": time.time()}))
    except OSError:
        pass
    return _chosen
