"""pvlun importer."""
