"""Accelerator choice (probe, cache, overrides) and the guest image builders."""

from __future__ import annotations

import gzip
import time

import pytest

from virt import accel
from virt.bootsector import tick_boot_sector
from virt.guest_images import build_initramfs, build_tick_disk


def test_probe_gives_up_on_a_guest_that_never_boots(tmp_path, monkeypatch):
    # a "QEMU" that hangs like a KVM guest stuck in its BIOS
    hang = tmp_path / "qemu-hangs"
    hang.write_text("#!/bin/sh\nexec sleep 30\n")
    hang.chmod(0o755)
    monkeypatch.setattr(accel.os, "access", lambda path, mode: True)
    started = time.monotonic()
    assert accel.probe_kvm(timeout=1.0, qemu_binary=str(hang)) is False
    assert 0.9 < time.monotonic() - started < 5


def test_choose_accel_override_env_probe_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("PVLUN_ACCEL", raising=False)
    monkeypatch.setattr(accel, "_chosen", None)
    probes = []
    monkeypatch.setattr(accel, "probe_kvm", lambda timeout: probes.append(timeout) or False)
    assert accel.choose_accel("kvm") == "kvm" and probes == []
    monkeypatch.setenv("PVLUN_ACCEL", "kvm")
    assert accel.choose_accel() == "kvm" and probes == []
    monkeypatch.delenv("PVLUN_ACCEL")
    assert accel.choose_accel() == "tcg" and len(probes) == 1
    assert accel.choose_accel() == "tcg" and len(probes) == 1  # cached in the process
    monkeypatch.setattr(accel, "_chosen", None)
    assert accel.choose_accel() == "tcg" and len(probes) == 1  # cached in the file for this boot
    assert (tmp_path / "pvlun" / "accel.json").exists()
    with pytest.raises(ValueError):
        accel.choose_accel("xen")


def test_tick_boot_sector_is_one_bootable_sector(tmp_path):
    sector = tick_boot_sector("HELLO-42")
    assert len(sector) == 512 and sector[-2:] == b"\x55\xaa" and b"HELLO-42" in sector
    disk = build_tick_disk(tmp_path / "t.img", "M")
    assert disk.stat().st_size == 1 << 20 and disk.read_bytes()[:512] == tick_boot_sector("M")
    with pytest.raises(ValueError):
        tick_boot_sector("x" * 400)


def test_initramfs_has_init_busybox_and_virtio_modules_in_load_order(tmp_path):
    data = gzip.decompress(build_initramfs(tmp_path / "initrd.img").read_bytes())
    for name in (b"init\0", b"bin/busybox\0", b"lib/modules/virtio_blk.ko\0", b"lib/modules/ext4.ko\0"):
        assert name in data
    order_at = data.index(b"modules.order\0")
    order = data[order_at: order_at + 600].decode(errors="replace")
    assert order.index("virtio.ko") < order.index("virtio_blk.ko") and order.index("jbd2.ko") < order.index("ext4.ko")
