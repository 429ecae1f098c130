"""Fixtures for the CSI tests; they live in csi_support.py, a uniquely named module the
test files import their helpers from (several test folders have a conftest.py).

The conformance suite's `driver` runs each test on the file backend and on the iscsi backend
split over network namespaces (split_support.py): the whole suite, about 50 s on iscsi. Tests
marked `file_only(reason)` do not run on iscsi; the reason says why the assertion does not
apply to an iSCSI LUN.
"""

from csi_support import *  # noqa: F401,F403
from csi_support import driver, res  # noqa: F401  (the fixtures, named for pytest)


def pytest_configure(config):
    config.addinivalue_line("markers", "file_only(reason): a conformance test whose assertion holds for the "
                                       "file backend only; the reason says why")


def pytest_collection_modifyitems(config, items):
    keep, dropped = [], []
    for item in items:
        callspec = getattr(item, "callspec", None)
        on_iscsi = callspec is not None and callspec.params.get("driver") == "iscsi"
        if on_iscsi:
            only_file = item.get_closest_marker("file_only")
            if only_file is not None:
                assert only_file.args and only_file.args[0], f"{item.nodeid}: file_only needs its reason"
                dropped.append(item)
                continue
        keep.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep
