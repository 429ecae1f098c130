"""pvlun cloner: how a DataVolume with a pvc or snapshot source gets its bytes.

`choose_strategy` picks, as CDI does: a CSI clone (CreateVolume with a volume or
snapshot content source — constant time on a reflink pool) when source and target have
the same volume mode; a host-assisted copy (both volumes attached, the disk converted
with qemu-img) when they differ, since a Filesystem volume holds its disk as disk.img
and a Block volume holds it raw.
"""

from cloner.strategy import CSI_CLONE, HOST_ASSISTED, choose_strategy, host_assisted_copy

__all__ = ["CSI_CLONE", "HOST_ASSISTED", "choose_strategy", "host_assisted_copy"]
