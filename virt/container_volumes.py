"""containerDisk volumes and `kernelBoot` on this node.

The image's files come from the node's image cache (importer/container_disks.py, handed to
the virt layer by the daemon as `ctx.services["container_images"]`: the virt layer does not
import the importer). Each containerDisk boots through a qcow2 overlay of its own, made fresh
in the VMI's run directory for every run and deleted when the run ends: the guest's writes go
there, the cached image is opened read-only and never written, and the next run starts from
the image as it was — KubeVirt's containerDisks are ephemeral the same way.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Callable

from host.command import run
from virt.qemu_args import BaseImage, DiskAttachment
from controlplane.vm_images import ContainerImage
from controlplane.vm_spec import VmSpec

CONTAINER_SOURCE = "containerDisk"
OVERLAY_SUFFIX = ".overlay.qcow2"
SERVICE = "container_images"

SecretLookup = Callable[[str], dict[str, str]]


class NoImageCache(ValueError):
    """This process has no image cache (cluster mode: refused before anything starts)."""


@dataclass(frozen=True)
class BootKernel:
    """`firmware.kernelBoot` on this node: cached kernel and initrd files, the command line."""

    kernel: str
    initrd: str | None
    args: str


def uses_images(vm: VmSpec) -> bool:
    return vm.kernel_boot is not None or any(v.source == CONTAINER_SOURCE for v in vm.volumes)


def cluster_refusal(vm: VmSpec) -> str | None:
    """Why this VMI cannot run in cluster mode yet (None: it can)."""
    fields = [f"volumes {v.name} (containerDisk)" for v in vm.volumes if v.source == CONTAINER_SOURCE]
    if vm.kernel_boot is not None:
        fields.append("domain.firmware.kernelBoot")
    if not fields:
        return None
    return (f"container images are not supported in cluster mode yet ({', '.join(fields)}): use a DataVolume "
            "with a registry source, or run the VM with `pvlun serve`")


def _fetch(cache: Any, what: str, call: Callable[[], Any]) -> Any:
    if cache is None:
        raise NoImageCache(f"{what}: this daemon has no container image cache")
    try:
        return call()
    except ValueError as exc:  # the cache's ImageUnavailable: one line already
        raise ValueError(f"{what}: {exc}") from None


def _secret(image: ContainerImage, secret: SecretLookup) -> dict[str, str] | None:
    return secret(image.pull_secret) if image.pull_secret else None


def overlay_path(run_dir: str | os.PathLike, volume: str) -> str:
    return os.path.join(str(run_dir), volume + OVERLAY_SUFFIX)


def container_disks(vm: VmSpec, run_dir: str | os.PathLike, cache: Any,
                    secret: SecretLookup) -> dict[str, DiskAttachment]:
    """Every containerDisk volume as an attachment: a fresh overlay over its cached disk.
    On failure, the overlays made so far are removed."""
    out: dict[str, DiskAttachment] = {}
    try:
        for volume in vm.volumes:
            if volume.source != CONTAINER_SOURCE or volume.container is None:
                continue
            image = volume.container
            disk = _fetch(cache, f"volume {volume.name} (image {image.image})",
                          lambda: cache.disk(image.image, image.path, policy=image.pull_policy,
                                             pull_secret=_secret(image, secret)))
            path = overlay_path(run_dir, volume.name)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # a run cut off before its end left it: every run starts from the image
            # -u: the size is given, so this qemu-img never opens the (hostile) image it names
            run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", disk.path, "-F", disk.format,
                 path, str(disk.virtual_size)], timeout=60)
            os.chmod(path, 0o600)
            out[volume.name] = DiskAttachment(path, block=False, direct_io=False,
                                              overlay_of=BaseImage(disk.path, disk.format))
    except BaseException:
        remove_overlays(vm, run_dir)
        raise
    return out


def remove_overlays(vm: VmSpec, run_dir: str | os.PathLike) -> None:
    """The run ended: its containerDisks' writes go with it."""
    for volume in vm.volumes:
        if volume.source == CONTAINER_SOURCE:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(overlay_path(run_dir, volume.name))


def boot_kernel(vm: VmSpec, cache: Any, secret: SecretLookup) -> BootKernel | None:
    """The kernel (and initrd) of `firmware.kernelBoot`, from the cache."""
    boot = vm.kernel_boot
    if boot is None:
        return None
    image = boot.container
    what = f"firmware.kernelBoot (image {image.image})"

    def fetch(path: str) -> str:
        return _fetch(cache, what, lambda: cache.file(image.image, path, policy=image.pull_policy,
                                                      pull_secret=_secret(image, secret)))

    kernel = fetch(boot.kernel_path or "")
    initrd = fetch(boot.initrd_path) if boot.initrd_path else None
    return BootKernel(kernel, initrd, boot.kernel_args)
