"""KubeVirt's container images in a VMI spec: `containerDisk` volumes and
`firmware.kernelBoot.container`, parsed and validated.

An image reference, a path in the image and the kernel's command line reach the registry,
the node's cache and QEMU's argv: each must match a strict pattern here, at apply.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from controlplane.vm_spec_fields import SpecError, matching, one_of
from controlplane.vm_spec_fields import mapping as _map
from controlplane.vm_spec_fields import name as _name
from controlplane.vm_spec_fields import shown

PULL_POLICIES = ("Always", "IfNotPresent", "Never")
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
# [host[:port]/]repo[/more][:tag][@sha256:digest], as the distribution reference grammar has it
IMAGE = re.compile(rf"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?(?::[0-9]{{1,5}})?/)?{_COMPONENT}(?:/{_COMPONENT})*"
                   r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[0-9a-f]{64})?")
IMAGE_MAX = 512
FILE_PATH = re.compile(r"(?:/[A-Za-z0-9_+-][A-Za-z0-9._+-]{0,254})+")  # absolute; no '..', no empty component
FILE_PATH_MAX = 1024
KERNEL_ARGS_MAX = 2048  # Linux's COMMAND_LINE_SIZE on x86


@dataclass(frozen=True)
class ContainerImage:
    """An image a VMI needs on its node, and where to find its file(s) inside."""

    image: str
    pull_policy: str | None = None  # None: Kubernetes' default for the tag
    pull_secret: str | None = None  # a kubernetes.io/dockerconfigjson Secret in the VMI's namespace
    path: str | None = None  # containerDisk: the disk file (None: the one file under /disk)


@dataclass(frozen=True)
class KernelBoot:
    """`firmware.kernelBoot`: QEMU boots the kernel (and initrd) of a container image directly."""

    container: ContainerImage
    kernel_path: str | None = None
    initrd_path: str | None = None
    kernel_args: str = ""


def _image(body: dict, path: str) -> ContainerImage:
    image = body.get("image")
    if image is None or image == "":
        raise SpecError(f"{path}.image", "required")
    if not isinstance(image, str) or len(image) > IMAGE_MAX or not IMAGE.fullmatch(image):
        raise SpecError(f"{path}.image", f"{shown(image)} is not an image reference (REGISTRY/REPOSITORY:TAG or "
                                         "REGISTRY/REPOSITORY@sha256:DIGEST)")
    if "/" not in image or not re.match(r"[^/]*[.:]|localhost/", image):
        raise SpecError(f"{path}.image", f"{shown(image)} names no registry host; give the registry, "
                                         "e.g. registry.example:5000/repo:tag")
    policy = None if body.get("imagePullPolicy") is None else one_of(
        body["imagePullPolicy"], f"{path}.imagePullPolicy", PULL_POLICIES, "imagePullPolicy")
    secret = None if body.get("imagePullSecret") in (None, "") else _name(
        body["imagePullSecret"], f"{path}.imagePullSecret", limit=253)
    return ContainerImage(image, policy, secret)


def file_path(value: Any, path: str) -> str:
    if not isinstance(value, str) or len(value) > FILE_PATH_MAX or not FILE_PATH.fullmatch(value) \
            or "/../" in value + "/" or "/./" in value + "/":
        raise SpecError(path, f"{shown(value)} is not an absolute path in the image (letters, digits, "
                              "'.', '_', '+', '-'; no '..')")
    return value


def parse_container_disk(body: dict, path: str) -> ContainerImage:
    """A `containerDisk` volume's body."""
    unknown = sorted(set(body) - {"image", "imagePullPolicy", "imagePullSecret", "path"})
    if unknown:
        raise SpecError(f"{path}.{unknown[0]}" if str(unknown[0]).isalnum() else path,
                        "unknown field (image, path, imagePullPolicy, imagePullSecret)")
    image = _image(body, path)
    disk = None if body.get("path") in (None, "") else file_path(body["path"], f"{path}.path")
    return ContainerImage(image.image, image.pull_policy, image.pull_secret, disk)


def parse_kernel_boot(raw: Any, path: str) -> KernelBoot:
    """`firmware.kernelBoot`: {kernelArgs, container: {image, kernelPath, initrdPath, imagePullPolicy,
    imagePullSecret}}, as KubeVirt validates it: a container with a kernel or an initrd path,
    kernelArgs only with a kernel."""
    raw = _map(raw, path, required=True)
    if "container" not in raw:
        raise SpecError(f"{path}.container", "required (kernelBoot takes its kernel from a container image)")
    body = _map(raw["container"], f"{path}.container", required=True)
    where = f"{path}.container"
    kernel = None if body.get("kernelPath") in (None, "") else file_path(body["kernelPath"], f"{where}.kernelPath")
    initrd = None if body.get("initrdPath") in (None, "") else file_path(body["initrdPath"], f"{where}.initrdPath")
    if kernel is None:
        raise SpecError(f"{where}.kernelPath", "required (QEMU boots the kernel; an initrd alone cannot boot)")
    args = raw.get("kernelArgs") or ""
    if args:
        if kernel is None:
            raise SpecError(f"{path}.kernelArgs", "needs container.kernelPath")
        matching(args, f"{path}.kernelArgs", re.compile(r"[\x20-\x7e]{1,%d}" % KERNEL_ARGS_MAX),
                 f"a kernel command line (printable ASCII, at most {KERNEL_ARGS_MAX} characters)")
    return KernelBoot(_image(body, where), kernel, initrd, args)
