"""`pvlun import`: fill one disk from a DataVolume source, as an importer pod does (or anywhere).

Progress goes to stdout (a line per step) and to /metrics (--metrics-address); the outcome is
one JSON line in the termination log (importer/pod_result.py) and the exit code: 0 when the disk
is complete, 1 with a one-line reason otherwise.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from pvlun.cli import parse_size, positive_number

DEFAULT_TERMINATION_LOG = "/dev/termination-log"


def address_arg(text: str) -> tuple[str, int]:
    """HOST:PORT for argparse (port 0: any free port)."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"{text[:60]!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def overhead_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a number") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError("the filesystem overhead is a fraction from 0 up to (not including) 1")
    return value


def datavolume_arg(text: str) -> str:
    from controlplane.admission import check_name

    namespace, _, name = text.partition("/")
    try:
        check_name(name, namespace)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--datavolume NAMESPACE/NAME: {exc}") from None
    return text


def add_commands(sub) -> None:
    imp = sub.add_parser("import", help="fill one disk from a DataVolume source (what an importer pod runs)")
    what = imp.add_mutually_exclusive_group(required=True)
    what.add_argument("--source-file", metavar="PATH",
                      help='the DataVolume\'s spec.source as JSON, e.g. {"http": {"url": "https://..."}}')
    what.add_argument("--upload-address", type=address_arg, metavar="HOST:PORT",
                      help="serve one HTTPS upload instead (the upload pod; needs --datavolume)")
    imp.add_argument("--target", required=True, metavar="PATH",
                     help="DIR/disk.img on a Filesystem volume, or a block device or raw file (Block)")
    imp.add_argument("--size", type=parse_size, help="the disk's size (default: the volume's)")
    imp.add_argument("--filesystem-overhead", type=overhead_arg, metavar="FRACTION",
                     help="share of a Filesystem volume left to the filesystem (default 0.055, CDI's)")
    imp.add_argument("--content-type", choices=["kubevirt", "archive"], default="kubevirt")
    imp.add_argument("--preallocation", action="store_true", help="allocate the whole disk")
    imp.add_argument("--scratch-dir", default="/scratch", help="space for downloads (default %(default)s)")
    imp.add_argument("--cert-dir", default="/certs", help="the certConfigMap's keys as files (default %(default)s)")
    imp.add_argument("--extra-headers-dir", default="/extraheaders",
                     help="the secretExtraHeaders Secrets, in subdirectories 0, 1, ... (default %(default)s)")
    imp.add_argument("--upload-secret-dir", default="/etc/pvlun/upload",
                     help="token.key, tls.crt, tls.key of the upload server (default %(default)s)")
    imp.add_argument("--datavolume", type=datavolume_arg, metavar="NAMESPACE/NAME",
                     help="the DataVolume (metric labels; the one upload tokens must name)")
    imp.add_argument("--owner-uid", default="", help="the DataVolume's uid (CDI's progress metric label)")
    imp.add_argument("--metrics-address", type=address_arg, metavar="HOST:PORT", help="serve /metrics here")
    imp.add_argument("--stall-timeout", type=positive_number("the stall timeout"), default=120.0, metavar="SECONDS",
                     help="end the attempt when no byte came this long (default %(default)s)")
    imp.add_argument("--termination-log", metavar="PATH",
                     help=f"where the outcome goes as JSON (default {DEFAULT_TERMINATION_LOG} when writable)")
    imp.set_defaults(func=cmd_import)


def cmd_import(args: argparse.Namespace) -> int:
    from controlplane.user_text import user_text
    from importer.errors import INTERNAL, ImportFailed
    from importer.pod_result import termination_message

    os.umask(0o007)  # disk.img is its fsGroup's to write too (CDI: KubeVirt's QEMU runs as that group)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_NoTraceback("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    if args.upload_address and not args.datavolume:
        print("error: --upload-address needs --datavolume NAMESPACE/NAME (the DataVolume tokens name)", file=sys.stderr)
        return 2
    log_path = args.termination_log or (DEFAULT_TERMINATION_LOG if os.access(DEFAULT_TERMINATION_LOG, os.W_OK) else None)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    preallocated = False
    try:
        progress = _progress(args)
        result = _run(args, progress, stop)
        preallocated = bool(args.preallocation)
    except ImportFailed as exc:
        return _fail(log_path, exc.reason, exc.message, termination_message)
    except Exception as exc:  # noqa: BLE001 - a person reads one line, never a traceback
        return _fail(log_path, INTERNAL, user_text(exc), termination_message)
    print(f"import complete: {result}", flush=True)
    _write(log_path, termination_message("Succeeded", "", "Import Complete", progress="100.0%",
                                         preallocation_applied=preallocated))
    return 0


class _NoTraceback(logging.Formatter):
    """Log lines without tracebacks: the pod's log is read by people (and by kubelet, as the
    termination message when the JSON could not be written)."""

    def format(self, record: logging.LogRecord) -> str:
        record.exc_info, record.exc_text = None, None
        return super().format(record)


def _run(args: argparse.Namespace, progress, stop: threading.Event) -> str:
    from importer.pod_import import import_once, pod_lookups, read_source, serve_upload, target_at

    overhead = {} if args.filesystem_overhead is None else {"filesystem_overhead": args.filesystem_overhead}
    target = target_at(args.target, args.size, content_type=args.content_type, preallocation=args.preallocation,
                       **overhead)
    os.makedirs(args.scratch_dir, exist_ok=True)
    if args.upload_address:
        serve_upload(args.datavolume, target, secret_dir=args.upload_secret_dir, address=args.upload_address,
                     scratch_dir=args.scratch_dir, progress=progress, cancelled=stop.is_set,
                     listening=lambda url: print(f"upload server: {url}", flush=True))
        return f"upload into {args.datavolume}"
    source = read_source(args.source_file)
    lookups = pod_lookups(source, cert_dir=args.cert_dir, headers_dir=args.extra_headers_dir)
    result = import_once(source, target, scratch_dir=args.scratch_dir, progress=progress, lookups=lookups,
                         stall=args.stall_timeout, cancelled=stop.is_set)
    layers = "".join(f" in {layer}" for layer in result.layers)
    return f"{result.format}{layers}, {result.virtual_size} bytes of disk ({result.method}, {result.seconds:.1f} s)"


def _progress(args: argparse.Namespace):
    """The progress callback: a line on stdout, and the metrics when they are served."""
    from importer import metrics

    if args.metrics_address:
        from prometheus_client import start_http_server

        server, _ = start_http_server(args.metrics_address[1], addr=args.metrics_address[0])
        host, port = server.server_address[:2]
        print(f"metrics: http://{host}:{port}/metrics", flush=True)
    namespace, _, name = (args.datavolume or "/").partition("/")

    def report(percent: float) -> None:
        metrics.set_progress(namespace, name, percent)
        metrics.set_cdi_progress(args.owner_uid, percent)
        print(f"progress: {percent:.2f}%", flush=True)

    report(0.0)
    return report


def _fail(log_path: str | None, reason: str, message: str, termination_message) -> int:
    from controlplane.user_text import one_line

    print(f"error: {reason}: {one_line(message)}", file=sys.stderr, flush=True)
    _write(log_path, termination_message("Failed", reason, message))
    return 1


def _write(path: str | None, text: str) -> None:
    if path is None:
        return
    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError as exc:
        print(f"warning: cannot write the termination log {path}: {exc.strerror}", file=sys.stderr)
