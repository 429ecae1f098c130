"""pvlun's CSI driver: every PersistentVolume is one LUN on a backend."""

__version__ = "0.1.0"  # the project's version (pyproject.toml says the same)
DRIVER_NAME = "csi.pvlun.dev"
