"""The blank source: an empty disk (a zero-length raw image that Resize grows to the volume)."""

from __future__ import annotations

import io
from typing import BinaryIO

from .base import SourceInfo


class BlankSource:
    checksum = None

    def info(self) -> SourceInfo:
        return SourceInfo(b"", 0, None, "blank")

    def transfer(self) -> BinaryIO:
        return io.BytesIO(b"")

    def close(self) -> None:
        pass
