"""Fixtures for the importer tests: they live in importer_support.py (shared with the tests)."""

from importer_support import (  # noqa: F401  (pytest finds fixtures by name)
    images,
    nginx,
    pki,
    public,
    py_http,
    py_https,
    scratch,
    upload,
)
