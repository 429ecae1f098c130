"""`pvlun launch` (a VMI's QEMU, in its launcher Pod), `pvlun launch-migrate` (tell a
running launcher to migrate its VMI to a target launcher) and `pvlun launch-freeze` (freeze or
thaw its guest for a VM snapshot), wired to virt/pod_launch.py, virt/pod_migration.py and
virt/pod_freeze.py."""

from __future__ import annotations

import argparse
import json
import sys

from pvlun.cli import network_arg, positive_number
from virt.pod_layout import DISK_DIR, MIGRATION_PORT, RUN_DIR


def _volume(text: str) -> tuple[str, str]:
    from controlplane.vm_spec_fields import NAME

    name, sep, path = text.partition("=")
    if not sep or not path or not NAME.fullmatch(name) or len(name) > 63:
        raise argparse.ArgumentTypeError(f"{text[:80]!r} is not NAME=PATH (NAME a volume of the VMI)")
    return name, path


def _port(text: str) -> int:
    if not text.isascii() or not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"{text[:20]!r} is not a port (1..65535)")
    return int(text)


def _fail(command: str, exc: BaseException) -> int:
    from controlplane.user_text import user_text

    print(f"pvlun {command}: {user_text(exc)}", file=sys.stderr)
    return 1


def cmd_launch(args: argparse.Namespace) -> int:
    from virt.launcher import LaunchError
    from virt.pod_launch import LaunchOptions, run_launch
    from virt.pod_migration import read_token

    try:
        options = LaunchOptions(vmi_file=args.vmi_file, run_dir=args.run_dir, disk_dir=args.disk_dir,
                                accel=args.accel, volumes=dict(args.volume), incoming_port=args.incoming,
                                listen_address=args.listen_address,
                                token=read_token(args.token_file) if args.token_file else None,
                                incoming_timeout=args.incoming_timeout, migration_network=args.migration_network or "")
        return run_launch(options)
    except (OSError, ValueError, LaunchError) as exc:
        return _fail("launch", exc)


def cmd_launch_migrate(args: argparse.Namespace) -> int:
    from virt.pod_migration import read_token, request_cancel, request_migration

    if bool(args.cancel) == bool(args.to):
        return _fail("launch-migrate", ValueError("give --to HOST:PORT (migrate) or --cancel (abort), one of them"))
    try:
        if args.cancel:
            result = {"cancelled": request_cancel(args.run_dir)}
        else:
            token = read_token(args.token_file) if args.token_file else None
            result = request_migration(args.run_dir, args.to, token)
    except (OSError, ValueError) as exc:
        return _fail("launch-migrate", exc)
    print(json.dumps(result, separators=(",", ":")), flush=True)
    return 0 if result.get("phase") == "Succeeded" or result.get("cancelled") else 1


def cmd_launch_freeze(args: argparse.Namespace) -> int:
    from virt.pod_migration import request_freeze

    try:
        result = request_freeze(args.run_dir, None if args.thaw else args.unfreeze_timeout)
    except (OSError, ValueError) as exc:
        return _fail("launch-freeze", exc)
    print(json.dumps(result, separators=(",", ":")), flush=True)
    return 0 if "error" not in result else 1


def add_commands(sub) -> None:
    launch = sub.add_parser("launch", help="run a VirtualMachineInstance's QEMU (the launcher Pod's command)")
    launch.add_argument("--vmi-file", required=True, help="the VMI as JSON (in a Pod: its downward-API file)")
    launch.add_argument("--run-dir", default=RUN_DIR, help="QEMU's run directory: serial log, QMP and launcher "
                        "sockets (default %(default)s)")
    launch.add_argument("--disk-dir", default=DISK_DIR, help="where cloud-init seeds and emptyDisks are made "
                        "(default %(default)s)")
    launch.add_argument("--accel", choices=["kvm", "tcg"], help="QEMU acceleration (default: probe KVM, else TCG)")
    launch.add_argument("--volume", action="append", type=_volume, default=[], metavar="NAME=PATH",
                        help="the claim of volume NAME is at PATH, or is the iSCSI LUN iscsi://HOST:PORT/IQN/LUN that QEMU "
                        "logs in to itself as the initiator of node $NODE_NAME (default: /dev/pvlun/NAME, else "
                        "/var/run/kubevirt-private/vmi-disks/NAME/disk.img)")
    launch.add_argument("--incoming", type=_port, metavar="PORT",
                        help=f"a migration target: wait for the stream on PORT (KubeVirt's is {MIGRATION_PORT})")
    launch.add_argument("--listen-address", default="", help="with --incoming: the address to listen on "
                        "(default: all)")
    launch.add_argument("--migration-network", type=network_arg, default=None, metavar="CIDR",
                        help="migrate over this node's address in CIDR: listen there (with --incoming), and "
                             "connect from there to a target that must be in CIDR")
    launch.add_argument("--token-file", help="with --incoming: the migration's shared token (a Secret's file)")
    launch.add_argument("--incoming-timeout", type=positive_number("the incoming timeout"), default=600.0,
                        metavar="SECONDS", help="with --incoming: give up when no stream came (default %(default)s)")
    launch.set_defaults(func=cmd_launch)

    migrate = sub.add_parser("launch-migrate", help="migrate the VMI of a running `pvlun launch` to a target launcher")
    migrate.add_argument("--run-dir", default=RUN_DIR, help="the source launcher's run directory (default %(default)s)")
    migrate.add_argument("--to", metavar="HOST:PORT", help="the target launcher's address")
    migrate.add_argument("--cancel", action="store_true", help="abort the migration in flight instead (the source "
                         "runs on); exit 0 when there was one")
    migrate.add_argument("--token-file", help="the migration's shared token ('-': stdin)")
    migrate.set_defaults(func=cmd_launch_migrate)

    freeze = sub.add_parser("launch-freeze", help="freeze the guest of a running `pvlun launch` through its agent "
                            "for a VM snapshot, or thaw it (--thaw)")
    freeze.add_argument("--run-dir", default=RUN_DIR, help="the launcher's run directory (default %(default)s)")
    freeze.add_argument("--unfreeze-timeout", type=positive_number("the unfreeze timeout"), default=300.0,
                        metavar="SECONDS", help="the launcher thaws the guest by itself after this long "
                        "(KubeVirt's unfreezeTimeout; at most 300, default %(default)s)")
    freeze.add_argument("--thaw", action="store_true", help="thaw the guest now")
    freeze.set_defaults(func=cmd_launch_freeze)
