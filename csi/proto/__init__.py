"""CSI v1 protocol stubs, generated from proto/csi.proto (``make proto``).

The stubs load lazily so ``python -m csi.proto.generate`` still runs when
they are missing or stale.
"""

import importlib

__all__ = ["csi_pb2", "csi_pb2_grpc"]


def __getattr__(name: str):
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
