"""Hostile: a host that cannot back the pool. The data dir is a 512 MiB ext4 filesystem of
the test's own and `--pool-size` says 8 GiB: the pool image used to be a sparse 1+ GiB
file, a 900Mi blank Block DataVolume Succeeded, and writing it failed with ENOSPC ("critical
space allocation error" on the pool's loop device) while the catalog beside it turned
"database or disk is full". Now the image holds real host space and grows only on what the
host has: the 900Mi volume is refused (ProvisioningFailed, RESOURCE_EXHAUSTED, saying what
the host has), what GetCapacity offers is provisioned and written in full — even after
something else (scratch copies, another program) filled the host to the last byte — and the
catalog goes on working."""

from __future__ import annotations

import errno
import hashlib
import os
import time

import pytest
from test_datavolume import dv

from csi.proto import csi_pb2 as pb
from controlplane import kubelet
from controlplane.csi_client import CsiClient
from pvlun.local_run import small_ext4

MiB = 1 << 20


@pytest.fixture
def small_host(tmp_path):
    """A 512 MiB ext4 filesystem mounted as the directory that holds the data dir."""
    with small_ext4(str(tmp_path / "host.img"), 512 * MiB) as mount_point:
        yield mount_point


def phase(inst, name: str) -> dict:
    return (inst.get("DataVolume", name) or {}).get("status") or {}


def fill_host(directory: str) -> str:
    """Write a file until the filesystem says ENOSPC (what scratch copies would do); its path."""
    junk = os.path.join(directory, "junk")
    chunk = b"\xa5" * MiB
    with open(junk, "wb") as f:
        try:
            while True:
                f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    return junk


@pytest.fixture
def serve_on_small_host(small_host, daemons):
    """start(*flags): `pvlun serve --pool-size 8Gi` (16 times the host) on it; stopped before it goes."""
    start_instance, stop_instance = daemons
    started = []

    def start(*flags: str):
        data_dir = os.path.join(small_host, "data")
        os.makedirs(data_dir)
        inst = start_instance(data_dir, "--nodes", "1", *flags)
        inst.host = small_host
        started.append(inst)
        return inst

    try:
        yield start
    finally:
        for inst in started:
            stop_instance(inst)


def test_the_pool_promises_only_host_space_it_holds_and_a_full_host_cannot_take_it_back(serve_on_small_host, daemons):
    inst = serve_on_small_host()
    data_dir, small_host = inst.data_dir, inst.host
    image = os.path.join(data_dir, "pool.img")
    st = os.stat(image)
    assert st.st_blocks * 512 >= st.st_size  # no holes: every byte of it is the host's

    inst.apply(dv("too-big", "    blank: {}", size="900Mi"))
    failed = inst.wait(lambda: phase(inst, "too-big").get("phase") == "Failed" and phase(inst, "too-big"), 60,
                       "the 900Mi DataVolume refused")
    ready = next(c for c in failed["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "ProvisioningFailed", ready
    assert ready["message"].startswith("RESOURCE_EXHAUSTED: not enough room in the pool"), ready
    assert "host filesystem has" in ready["message"] and data_dir not in ready["message"]

    node = inst.nodes()[0]
    csi = CsiClient(data_dir, [node])
    try:
        offered = csi.controller.GetCapacity(pb.GetCapacityRequest()).available_capacity
        assert 64 * MiB < offered < 512 * MiB
        size = offered // MiB - 4
        inst.apply(dv("fits", "    blank: {}", size=f"{size}Mi"), "--wait")
        assert phase(inst, "fits")["phase"] == "Succeeded"
        assert os.stat(image).st_size > st.st_size  # the image grew to hold it, on real blocks
        assert os.stat(image).st_blocks * 512 >= os.stat(image).st_size

        junk = fill_host(small_host)  # the host is full now: the pool's blocks stay the pool's
        attached = kubelet.attach(inst.store, csi, data_dir, "fits", "default", node, "test/fits")
        try:
            written = hashlib.sha256()
            fd = os.open(attached.path, os.O_WRONLY)
            try:
                for _ in range(size):
                    block = os.urandom(MiB)
                    os.write(fd, block)
                    written.update(block)
                os.fsync(fd)
            finally:
                os.close(fd)
            read = hashlib.sha256()
            with open(attached.path, "rb") as f:
                for _ in range(size):
                    read.update(f.read(MiB))
            assert read.digest() == written.digest()
        finally:
            kubelet.detach(inst.store, csi, attached.volume_id, node, "test/fits")
        os.unlink(junk)
    finally:
        csi.close()
    inst.apply(dv("after", "    blank: {}", size="1Mi"), "--wait")  # the catalog beside it is fine
    daemons[1](inst)
    with open(os.path.join(data_dir, "serve.log")) as f:
        log = f.read()
    assert inst.proc.returncode == 0 and "database or disk is full" not in log, log[-3000:]
    assert "pool stays mounted" not in log, log[-3000:]


def test_a_sparse_pool_image_of_an_older_pvlun_counts_only_the_free_space_the_host_can_fill(small_host):
    """An image made sparse (as pvlun made them before) is measured as it is: its free space
    counts only as far as the host could fill the holes under it, less the host's reserve."""
    from csi.capacity import PoolSpace
    from csi.pool_image import PoolBacking, host_room

    image = os.path.join(small_host, "pool.img")
    with open(image, "wb") as f:
        f.truncate(4096 * MiB)  # a 4 GiB image on a 512 MiB host: all holes
    room, reserve = host_room(small_host)
    assert 256 * MiB < room < 512 * MiB and reserve == 64 * MiB
    claimed = PoolSpace(free=3900 * MiB, held=0, filesystem=4000 * MiB)  # what its XFS would say
    backing = PoolBacking(small_host, image, os.path.join(small_host, "pool"), 4096 * MiB)
    real = backing.adjust(claimed)
    assert real.free == room and real.growable == 0
    assert real.usable < room  # no promise beyond what the host can give
    assert "host filesystem has" in real.note


def test_overcommitted_a_thin_pool_counts_only_what_the_host_can_fill_and_more_once_it_frees_space(
        serve_on_small_host):
    """Past overcommit 1 the image is sparse at its whole --pool-size (8Gi on a 512 MiB host):
    volumes take host blocks only as they are written, the pool's usable space is what the host
    could fill now (not the image's size), and it rises when something else frees host space."""
    from test_hostile_pool_use import pool_metrics

    inst = serve_on_small_host("--overcommit", "4")
    image = os.path.join(inst.data_dir, "pool.img")
    junk = os.path.join(inst.host, "junk")
    with open(junk, "wb") as f:  # something else holds 96 MiB of the host for now
        f.write(b"\xa5" * 96 * MiB)
        os.fsync(f.fileno())
    inst.apply(dv("thin-a", "    blank: {}", size="200Mi") + "---\n" + dv("thin-b", "    blank: {}", size="200Mi"),
               "--wait")
    assert phase(inst, "thin-a")["phase"] == phase(inst, "thin-b")["phase"] == "Succeeded"
    st = os.stat(image)
    assert st.st_size == 8 * 1024 * MiB and st.st_blocks * 512 < 256 * MiB  # sparse: thin for real
    usable = pool_metrics(inst)["pvlun_pool_usable_bytes"]
    assert usable < 512 * MiB  # what the host can fill, not the 8 GiB the image says
    os.unlink(junk)
    inst.wait(lambda: pool_metrics(inst)["pvlun_pool_usable_bytes"] > usable + 64 * MiB, 30,
              "the pool's usable space risen with the host's free space")
