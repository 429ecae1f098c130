"""Does an image name anything besides its own file? If so it is refused, whatever it names.

qemu follows what an image's metadata says: a qcow2 backing file or external data file, a
VMDK descriptor's extents (a text descriptor, or one embedded in a sparse header), in
any of qemu's spellings (a path, `json:{...}`, `nbd:`, `http:`). Running as root, that
read host files into volumes. The decision is made from what `qemu-img info --output=json`
reports for the image opened as a single file (a `json:` spec with `"backing": null` over
one file node), never from the image's name; qemu 7.2 prints, for that spec:

- `filename`: the file node qemu opened (a path, or `nbd+unix://?socket=...`);
- `backing-filename` / `full-backing-filename`: a backing file the header names;
- `format-specific.data.data-file` (qcow2): an external data file;
- `format-specific.data.extents[].filename` (vmdk): every extent, the image itself for a
  monolithic one (qemu 7.2 skips ZERO extents; a descriptor of only those makes it abort);
- `children` (qemu 8 and later): the nodes below the image, only `file` is its own.

qemu-img info itself opens VMDK extents; in its sandbox an extent that is not the image does
not exist, so info fails and names it: `refuse_failed_open` reads that answer the same way.
"""

from __future__ import annotations

from . import errors
from .errors import ImportFailed

_SELF_CONTAINED = "only self-contained images are accepted"


def _shown(name: object) -> str:
    """The name an image gave, short enough for a status line."""
    text = str(name)
    return repr(text if len(text) <= 80 else text[:77] + "...")


def refuse_references(info: dict) -> None:
    """Raise ImportFailed if `qemu-img info` shows the image naming any file or protocol but its own."""
    own = info.get("filename")
    if not isinstance(own, str) or not own:
        raise ImportFailed(errors.INVALID_IMAGE, "qemu-img info does not say which file it opened")
    backing = info.get("backing-filename") or info.get("full-backing-filename")
    if backing:
        raise ImportFailed(errors.BACKING_FILE, f"the image names a backing file {_shown(backing)}; {_SELF_CONTAINED}")
    specific = (info.get("format-specific") or {}).get("data") or {}
    if specific.get("data-file"):
        raise ImportFailed(errors.DATA_FILE,
                           f"the qcow2 image uses an external data file {_shown(specific['data-file'])}; {_SELF_CONTAINED}")
    for extent in specific.get("extents") or []:
        if extent.get("filename") != own:
            raise ImportFailed(errors.BACKING_FILE, f"the VMDK names the {extent.get('format') or 'sparse'} extent "
                                                    f"{_shown(extent.get('filename'))}; upload a monolithic VMDK "
                                                    f"({_SELF_CONTAINED})")
    _refuse_children(info.get("children") or [], own)


def _refuse_children(children: list, own: str) -> None:
    for child in children:
        name = child.get("name")
        sub = child.get("info") or {}
        if name != "file" or sub.get("filename") != own or sub.get("children"):
            raise ImportFailed(errors.BACKING_FILE, f"the image opens a node {_shown(name)} besides its own file; "
                                                    f"{_SELF_CONTAINED}")


def refuse_failed_open(stderr: str, spec: str, own: str) -> None:
    """`qemu-img info` of `spec` (over the file `own`) failed: if it failed opening another
    file, that is a reference. qemu nests the reason:
    "Could not open '<spec>': Could not open '<other>': <why>".
    """
    text = stderr.strip().removeprefix("qemu-img: ")
    text = text.removeprefix(f"Could not open '{spec}': ")
    if text.startswith("Could not open '"):
        name = text[len("Could not open '"):].rpartition("': ")[0]
        if name == own:
            return
        raise ImportFailed(errors.BACKING_FILE, f"the image refers to another file {_shown(name)} (an extent or data "
                                                f"file); {_SELF_CONTAINED}")
