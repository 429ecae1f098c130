"""pvlun: disks for virtual machines on Kubernetes."""

__version__ = "0.1.0"
DRIVER_NAME = "csi.pvlun.dev"
