"""pvlun: disks for virtual machines on Kubernetes."""

from csi import DRIVER_NAME, __version__

__all__ = ["DRIVER_NAME", "__version__"]
