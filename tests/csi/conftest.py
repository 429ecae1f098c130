"""Fixtures for the CSI tests; they live in csi_support.py, a uniquely named module the
test files import their helpers from (several test folders have a conftest.py)."""

from csi_support import *  # noqa: F401,F403
from csi_support import driver, res  # noqa: F401  (the fixtures, named for pytest)
