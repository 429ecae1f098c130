"""The clone strategy chosen as CDI's planner chooses it, and the copy strategy's byte mover
(sparse, verified by checksum) on real files and a real loop device."""

from __future__ import annotations

import os
import subprocess

import pytest

from cloner import COPY, CSI_CLONE, SNAPSHOT, ChecksumMismatch, asked_strategy, choose_strategy, copy_sparse
import cloner.sparse_copy as sparse_copy

MiB = 1 << 20
DRIVER = "csi.pvlun.dev"


def klass(name: str = "pvlun", provisioner: str = DRIVER, expand: bool = True, annotation: str | None = None) -> dict:
    meta: dict = {"name": name}
    if annotation:
        meta["annotations"] = {"cdi.kubevirt.io/clone-strategy": annotation}
    return {"metadata": meta, "provisioner": provisioner, "allowVolumeExpansion": expand}


def claim(mode: str = "Block", size: int = 64 * MiB) -> dict:
    return {"spec": {"volumeMode": mode}, "status": {"capacity": {"storage": str(size)}}}


VSC = [{"driver": DRIVER, "metadata": {"name": "pvlun-snap"}}]


def choose(asked: str, *, mode: str = "Block", size: int = 64 * MiB, source_class=None, target_class=None,
           snapshot_classes=VSC):
    return choose_strategy(asked, source_pvc=claim(), target_mode=mode, target_size=size,
                           source_class=source_class or klass(), target_class=target_class or klass(),
                           snapshot_classes=snapshot_classes)


def test_profile_spec_wins_over_the_class_annotation_which_wins_over_the_drivers_advice():
    assert asked_strategy(klass(), None) == CSI_CLONE  # what pvlun advises: a reflink in the pool
    assert asked_strategy(klass(annotation="copy"), None) == COPY
    assert asked_strategy(klass(annotation="copy"), {"spec": {"cloneStrategy": "snapshot"}}) == SNAPSHOT
    assert asked_strategy(None, None) == SNAPSHOT  # no class: CDI's default


def test_what_can_be_done_is_done_as_asked():
    assert (choose(SNAPSHOT).strategy, choose(CSI_CLONE).strategy, choose(COPY).strategy) == (SNAPSHOT, CSI_CLONE, COPY)
    assert choose(CSI_CLONE).says() == "clone strategy csi-clone, as the target's StorageProfile asks"


@pytest.mark.parametrize("asked, kwargs, reason", [
    (SNAPSHOT, {"snapshot_classes": []}, "NoVolumeSnapshotClass"),
    (CSI_CLONE, {"mode": "Filesystem"}, "IncompatibleVolumeModes"),
    (SNAPSHOT, {"mode": "Filesystem"}, "IncompatibleVolumeModes"),
    (CSI_CLONE, {"source_class": klass("other", "other.example.com")}, "IncompatibleProvisioners"),
    (CSI_CLONE, {"size": 128 * MiB, "target_class": klass(expand=False)}, "NoVolumeExpansion"),
])
def test_what_cannot_be_done_falls_back_to_copy_with_cdis_reason(asked, kwargs, reason):
    choice = choose(asked, **kwargs)
    assert (choice.strategy, choice.asked, choice.reason) == (COPY, asked, reason)
    assert choice.says().startswith(f"clone strategy copy (asked for {asked}): ")


def test_a_larger_target_on_an_expandable_class_keeps_the_strategy():
    assert choose(SNAPSHOT, size=128 * MiB).strategy == SNAPSHOT


def golden(path: str, size: int = 64 * MiB) -> bytes:
    """A sparse image: data at the start, in the middle (with a zero chunk inside), at the end."""
    with open(path, "wb") as f:
        f.truncate(size)
        f.write(b"BOOT" * 128)
        f.seek(size // 2)
        f.write(os.urandom(MiB) + bytes(2 * sparse_copy.ZERO_BLOCK) + os.urandom(MiB))
        f.seek(size - 4096)
        f.write(os.urandom(4096))
    with open(path, "rb") as f:
        return f.read()


def allocated(path: str) -> int:
    return os.stat(path).st_blocks * 512


def test_copy_is_byte_exact_sparse_and_writes_only_data(tmp_path):
    src, dst = str(tmp_path / "src.img"), str(tmp_path / "dst.img")
    want = golden(src)
    with open(src, "rb") as s, open(dst, "w+b") as d:
        d.truncate(len(want))
        written = copy_sparse(s.fileno(), d.fileno(), len(want))
    assert open(dst, "rb").read() == want
    assert 2 * MiB < written < 3 * MiB  # the data, not the zero chunk between nor the holes
    assert allocated(dst) <= allocated(src) + sparse_copy.CHUNK  # holes stay holes


def loop(path: str) -> str:
    return subprocess.run(["losetup", "-f", "--show", "--direct-io=on", path], check=True, capture_output=True,
                          text=True).stdout.strip()


def test_loop_device_to_loop_device_is_byte_exact_and_reads_only_the_source_luns_data(tmp_path):
    src, lun = str(tmp_path / "src.img"), str(tmp_path / "lun.img")
    want = golden(src, 16 * MiB)
    with open(lun, "wb") as f:
        f.truncate(16 * MiB)
    devices = [loop(src), loop(lun)]
    try:
        source, target = os.open(devices[0], os.O_RDONLY), os.open(devices[1], os.O_RDWR)
        try:
            with open(src, "rb") as f:  # the LUN's holes, seen through its device
                assert sparse_copy.source_extents(source, len(want)) == sparse_copy.data_extents(f.fileno(), len(want))
            written = copy_sparse(source, target, len(want))
        finally:
            os.close(source)
            os.close(target)
    finally:
        for device in devices:
            subprocess.run(["losetup", "-d", device], check=True)
    assert open(lun, "rb").read() == want
    assert 2 * MiB < written < 3 * MiB


def test_a_target_that_does_not_read_back_as_written_is_a_checksum_mismatch(tmp_path, monkeypatch):
    src, dst = str(tmp_path / "src.img"), str(tmp_path / "dst.img")
    want = golden(src)
    real_write = sparse_copy._write

    def lossy(fd: int, data: memoryview, offset: int) -> None:  # a device that garbles one chunk's last byte
        if offset == len(want) // 2:
            data[-1] ^= 0xFF  # the copy's buffer: the source's checksum was taken already
        real_write(fd, data, offset)

    monkeypatch.setattr(sparse_copy, "_write", lossy)
    with open(src, "rb") as s, open(dst, "w+b") as d:
        d.truncate(len(want))
        with pytest.raises(ChecksumMismatch, match=f"1 chunk\\(s\\) differ, the first at byte {len(want) // 2}"):
            copy_sparse(s.fileno(), d.fileno(), len(want))
