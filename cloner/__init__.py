"""pvlun cloner: how a DataVolume with a pvc source gets its bytes, by CDI's three strategies.

`snapshot` (a temporary VolumeSnapshot of the source, a claim restored from it, the snapshot
deleted), `csi-clone` (a claim whose dataSource is the source: CreateVolume with a volume
content source) and `copy` (host-assisted: both volumes attached, the disk streamed across,
sparse and verified by checksum). `choose_strategy` says which applies and why; the reconcile
in importer/ runs it.
"""

from cloner.host_copy import TooSmall, grow_disk_image, host_assisted_copy
from cloner.sparse_copy import ChecksumMismatch, copy_sparse
from cloner.strategy import (CLONE_TYPE_ANNOTATION, COPY, CSI_CLONE, FALLBACK_ANNOTATION, SNAPSHOT, Choice,
                             asked_strategy, choose_strategy)

__all__ = ["CLONE_TYPE_ANNOTATION", "COPY", "CSI_CLONE", "FALLBACK_ANNOTATION", "SNAPSHOT", "ChecksumMismatch",
           "Choice", "TooSmall", "asked_strategy", "choose_strategy", "copy_sparse", "grow_disk_image",
           "host_assisted_copy"]
