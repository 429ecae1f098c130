"""pvlun virt."""
