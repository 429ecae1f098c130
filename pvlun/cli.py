"""The `pvlun` command: a thin layer over the parts' public functions."""

from __future__ import annotations

import argparse
import os
import socket
import sys
from typing import Callable

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # gRPC's fork notices are noise for a CLI and daemon
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")  # children exec tools at once; no fork handlers

from pvlun import __version__

DEFAULT_DATA_DIR = "/var/lib/pvlun"


def parse_size(text: str) -> int:
    """A Kubernetes quantity (10Gi, 512Mi, 1G) for argparse."""
    from controlplane.quantity import parse_quantity

    try:
        return parse_quantity(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def positive_number(what: str, whole: bool = False) -> Callable[[str], float]:
    """An argparse type: a positive, finite number (with `whole`, an integer of at least 1);
    `what` names it in the error."""
    def parse(text: str) -> float:
        try:
            value = int(text) if whole else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a {'whole ' if whole else ''}number") from None
        if not 0 < value < float("inf"):
            raise argparse.ArgumentTypeError(f"{what} must be {'at least 1' if whole else 'positive'}, not {text}")
        return value

    return parse


def migration_hook_arg(text: str) -> tuple[str, str]:
    """An argparse type: `--migration-hook EVENT=COMMAND` (virt/hooks.py checks it)."""
    from virt.hooks import hook_flag

    try:
        return hook_flag(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def node_id_arg(text: str) -> str:
    """A CSI node ID as the driver takes it (csi/validation.py NODE_ID)."""
    from csi.validation import NODE_ID

    if not NODE_ID.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"{text[:40]!r} is not a valid node ID (letters, digits, '.', '_' and '-', starting with a letter "
            f"or digit, at most 128 characters)")
    return text


def network_arg(text: str) -> str:
    """A CIDR for argparse (host/addresses.py parse_network), kept as its canonical text."""
    from host.addresses import parse_network

    try:
        return str(parse_network(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def data_dir_arg(parser: argparse.ArgumentParser) -> None:
    """--data-dir and --kubeconfig, accepted before or after the subcommand (the later one wins)."""
    parser.add_argument("--data-dir", default=argparse.SUPPRESS,
                        help="instance directory (env PVLUN_DATA_DIR; default /var/lib/pvlun)")
    if parser.prog.split()[-1] != "serve":
        parser.add_argument("--kubeconfig", default=argparse.SUPPRESS,
                            help="act on this cluster instead of an embedded instance (env KUBECONFIG, "
                                 "unless --data-dir or PVLUN_DATA_DIR names an instance)")


def cluster_config(args: argparse.Namespace, argv: list[str]) -> str | None:
    """The kubeconfig the command acts on: --kubeconfig, else $KUBECONFIG unless an embedded
    instance was named (--data-dir, PVLUN_DATA_DIR): a user's KUBECONFIG never turns a
    command meant for the local instance into one on a cluster."""
    if getattr(args, "kubeconfig", None):
        return args.kubeconfig
    named = any(a == "--data-dir" or a.startswith("--data-dir=") for a in argv) or "PVLUN_DATA_DIR" in os.environ
    return None if named else (os.environ.get("KUBECONFIG") or None)


def cmd_serve(args: argparse.Namespace) -> int:
    from csi.server import setup_logging
    from pvlun.daemon import Daemon, ServeOptions

    from csi.validation import NODE_ID

    longest = f"{args.node_id}-{args.nodes}" if args.mode == "all" and args.nodes > 1 else args.node_id
    if not NODE_ID.fullmatch(longest):  # the embedded nodes are NODE-ID, NODE-ID-2, ...
        print(f"pvlun serve: --node-id is too long for --nodes {args.nodes}: node {longest[:40]!r}... would be "
              f"{len(longest)} characters (at most 128)", file=sys.stderr)
        return 1
    setup_logging()
    opts = ServeOptions(data_dir=args.data_dir, endpoint=args.endpoint or "", node_id=args.node_id,
                        mode=args.mode, nodes=args.nodes, pool=args.pool, pool_size=args.pool_size or 0,
                        overcommit=args.overcommit,
                        max_volumes_per_node=args.max_volumes_per_node,
                        allow_file_import=args.allow_file_import, upload_address=args.upload_address,
                        metrics_address=args.metrics_address, accel=args.accel,
                        stall_seconds=args.import_stall_timeout, retry_backoff=args.import_retry_backoff,
                        migration_hooks=list(args.migration_hook),
                        migration_network=args.migration_network or "",
                        backend=args.backend, iscsi_portal=args.iscsi_portal,
                        iscsi_control_port=args.iscsi_control_port)
    try:
        Daemon(opts).run_until_signal()
    except (OSError, ValueError) as exc:
        print(f"pvlun serve: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    from pvlun.quickstart import main as quickstart

    return quickstart(args)


class OneLineParser(argparse.ArgumentParser):
    """A bad option is one line (what is wrong, and where help is), not a usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="pvlun", description="Disks for virtual machines on Kubernetes.")
    parser.add_argument("--version", action="version", version=f"pvlun {__version__}")
    parser.add_argument("--data-dir", default=os.environ.get("PVLUN_DATA_DIR", DEFAULT_DATA_DIR),
                        help="instance directory (env PVLUN_DATA_DIR; default %(default)s)")
    parser.add_argument("--kubeconfig", default=None, help="act on this cluster (env KUBECONFIG)")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the CSI driver (and the embedded controllers)")
    serve.add_argument("--endpoint", help="unix:///PATH or tcp://HOST:PORT (default unix://DATA_DIR/csi.sock)")
    serve.add_argument("--node-id", type=node_id_arg, default=socket.gethostname())
    data_dir_arg(serve)
    serve.add_argument("--mode", choices=["all", "controller", "node"], default="all")
    serve.add_argument("--nodes", type=positive_number("the number of nodes", whole=True), default=2,
                       help="present this host as N nodes: NODE-ID, NODE-ID-2, ... (embedded mode; default 2)")
    serve.add_argument("--pool", help="use this directory as the LUN pool")
    serve.add_argument("--pool-size", type=parse_size, default=None,
                       help="size of the XFS reflink pool image made when the data dir cannot reflink "
                            "(default: 90%% of the data dir's filesystem, at most 256Gi; the image is sparse)")
    serve.add_argument("--overcommit", type=positive_number("the overcommit ratio"), default=1.0, metavar="RATIO",
                       help="let the volumes' sizes add up to RATIO x the pool size (default %(default)s)")
    serve.add_argument("--max-volumes-per-node", type=positive_number("the volumes per node", whole=True), default=256)
    serve.add_argument("--allow-file-import", action="store_true",
                       help="let DataVolume http sources use file:// URLs (embedded mode)")
    serve.add_argument("--accel", choices=["kvm", "tcg"], help="QEMU acceleration (default: probe KVM, else TCG)")
    serve.add_argument("--migration-hook", action="append", default=[], metavar="EVENT=COMMAND", type=migration_hook_arg,
                       help="run COMMAND at a live-migration event (pre, post, failed); {vm}, {source}, {target} expand")
    serve.add_argument("--migration-network", type=network_arg, default=None, metavar="CIDR",
                       help="stream live migrations over this host's address in CIDR (a dedicated migration "
                            "network; default: a local socket pair)")
    serve.add_argument("--upload-address", default="127.0.0.1:0", help="HOST:PORT of the HTTPS upload endpoint")
    serve.add_argument("--metrics-address", default="127.0.0.1:0",
                       help="HOST:PORT of the Prometheus /metrics endpoint (empty: off)")
    serve.add_argument("--import-stall-timeout", type=positive_number("the stall timeout"), default=120.0, metavar="SECONDS",
                       help="an import that receives no byte this long is retried, then Failed (default %(default)s)")
    serve.add_argument("--import-retry-backoff", type=positive_number("the retry backoff"), default=10.0,
                       metavar="SECONDS", help="wait before an import's second attempt after a 404, a refused "
                       "connection or a stall, doubling after (default %(default)s, kubelet's restart backoff)")
    serve.add_argument("--backend", choices=["file", "iscsi"], default="file",
                       help="the backend of volumes whose StorageClass names none (default %(default)s)")
    serve.add_argument("--iscsi-portal", default="", metavar="ADDRESS:PORT",
                       help="run pvlun's tgtd listening here (default 127.0.0.1:3260 with --backend iscsi; "
                            "given alone, StorageClasses may still choose backend: iscsi)")
    serve.add_argument("--iscsi-control-port", type=positive_number("the control port", whole=True), default=3261,
                       help="tgtd's management port (its socket /var/run/tgtd/socket.PORT; never a system tgtd's)")
    serve.set_defaults(func=cmd_serve)

    from pvlun.objects_cli import add_commands

    add_commands(sub, data_dir_arg)
    from pvlun.transfer_cli import add_commands as add_transfer_commands

    add_transfer_commands(sub, data_dir_arg)
    from pvlun.vm_cli import add_commands as add_vm_commands

    add_vm_commands(sub, data_dir_arg)
    from pvlun.vmexport_cli import add_commands as add_vmexport_commands

    add_vmexport_commands(sub, data_dir_arg)
    from pvlun.launch_cli import add_commands as add_launch_commands

    add_launch_commands(sub)

    from pvlun.controller_cli import add_commands as add_controller_commands

    add_controller_commands(sub)

    from pvlun.import_cli import add_commands as add_import_commands

    add_import_commands(sub)

    from pvlun.luns import add_commands as add_lun_commands

    add_lun_commands(sub, data_dir_arg)

    quick = sub.add_parser("quickstart", help="a guided run of the main job on a temporary instance")
    quick.set_defaults(func=cmd_quickstart)
    return parser


def main(argv: list[str] | None = None) -> int:
    from controlplane.admission import Refused
    from pvlun.objects_cli import NoDaemon

    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.command != "controller":
        args.kubeconfig = cluster_config(args, argv)
    if getattr(args, "namespace", None):
        from controlplane.admission import check_name

        try:
            check_name("x", args.namespace)
        except ValueError as exc:
            parser.error(str(exc).replace("metadata.namespace", "--namespace"))
    try:
        return args.func(args) or 0
    except (NoDaemon, Refused) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - whatever went wrong, a person reads one line, not a traceback
        from controlplane.user_text import user_text

        print(f"error: {user_text(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
