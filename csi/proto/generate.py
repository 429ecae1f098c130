"""Generate the Python CSI stubs from proto/csi.proto.

Run as ``python -m csi.proto.generate [--out DIR]`` (``make proto``). The
stubs are committed; tests/test_proto_fresh.py regenerates them into a
temporary directory and fails when they drift from proto/csi.proto.

The proto is staged in a scratch tree at ``csi/proto/csi.proto`` so protoc
names the modules after their real package: the gRPC module then imports
``from csi.proto import csi_pb2`` and message classes carry
``csi.proto.csi_pb2`` as their module.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_SOURCE = REPO_ROOT / "proto" / "csi.proto"
PACKAGE_DIR = Path(__file__).resolve().parent
STAGED_NAME = "csi/proto/csi.proto"
GENERATED_FILES = ("csi_pb2.py", "csi_pb2_grpc.py", "csi_pb2.pyi")


class ProtocError(RuntimeError):
    """protoc rejected the proto; its diagnostics went to stderr."""


def _well_known_include() -> str:
    """grpc_tools ships google/protobuf/*.proto; no system protoc needed."""
    return str(resources.files("grpc_tools") / "_proto")


def generate(out_dir: Path = PACKAGE_DIR, proto: Path = PROTO_SOURCE) -> list[Path]:
    """Write csi_pb2.py, csi_pb2_grpc.py and csi_pb2.pyi into ``out_dir``."""
    from grpc_tools import protoc

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="csi-proto-") as tmp:
        src_root = Path(tmp) / "src"
        gen_root = Path(tmp) / "gen"
        staged = src_root / STAGED_NAME
        staged.parent.mkdir(parents=True)
        gen_root.mkdir()
        shutil.copyfile(proto, staged)
        rc = protoc.main([
            "grpc_tools.protoc",
            f"-I{src_root}",
            f"-I{_well_known_include()}",
            f"--python_out={gen_root}",
            f"--pyi_out={gen_root}",
            f"--grpc_python_out={gen_root}",
            STAGED_NAME,
        ])
        if rc != 0:
            raise ProtocError(f"protoc failed on {proto} (exit {rc})")
        written = []
        for name in GENERATED_FILES:
            target = out_dir / name
            tmp_target = target.with_suffix(target.suffix + ".tmp")
            shutil.copyfile(gen_root / "csi" / "proto" / name, tmp_target)
            tmp_target.replace(target)
            written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PACKAGE_DIR,
                        help="output directory (default: the csi.proto package)")
    args = parser.parse_args(argv)
    try:
        for path in generate(args.out):
            print(path)
    except ProtocError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
