"""pvlun importer/sources."""
