"""pvlun cloner."""
