"""pvlun csi."""
