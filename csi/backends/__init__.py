"""pvlun csi/backends."""
