"""`pvlun controller`: the reconcilers on a Kubernetes API (cluster mode), leader-elected.

Several replicas may run; one leads (a coordination.k8s.io Lease) and reconciles, the others
wait. /healthz answers while the process works; /readyz once its caches are synced; /metrics
is Prometheus'. The driver itself is the CSI sidecars' and the kubelet's: PVCs, PVs and
snapshots are the cluster's own, so pvlun's provisioner and snapshotter do not run here."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import threading

from typing import TYPE_CHECKING

from controlplane.leader import LEASE_SECONDS, RENEW_DEADLINE, RETRY_SECONDS
from pvlun.cli import migration_hook_arg

if TYPE_CHECKING:
    from http.server import ThreadingHTTPServer

log = logging.getLogger("pvlun.controller")

DEFAULT_NAMESPACE = "pvlun"
LEASE_NAME = "pvlun-controller"


def _host_port(text: str, flag: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{flag}: {text!r} is not HOST:PORT (or :PORT)")
    return host or "0.0.0.0", int(port)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 3600:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds (0 < s < 3600)")
    return value


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("controller", help="run the controllers on a Kubernetes API (cluster mode)")
    p.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG") or None,
                   help="kubeconfig file (env KUBECONFIG; default: the in-cluster service account)")
    p.add_argument("--context", help="kubeconfig context (default: its current context)")
    p.add_argument("--namespace", dest="controller_namespace",
                   default=os.environ.get("POD_NAMESPACE") or DEFAULT_NAMESPACE,
                   help="the controller's namespace: its Lease lives there (env POD_NAMESPACE; default %(default)s)")
    p.add_argument("--image", default=os.environ.get("PVLUN_IMAGE", ""),
                   help="image of the importer and launcher Pods (env PVLUN_IMAGE)")
    p.add_argument("--kvm", action="store_true", help="launcher Pods ask for /dev/kvm (devices.kubevirt.io/kvm)")
    p.add_argument("--leader-elect", action=argparse.BooleanOptionalAction, default=True,
                   help="campaign for the Lease before reconciling (default on)")
    for flag, default, what in (("lease-duration", LEASE_SECONDS, "a standby waits this long after the last renewal"),
                                ("renew-deadline", RENEW_DEADLINE, "the leader gives up when it could not renew this long"),
                                ("retry-period", RETRY_SECONDS, "between tries")):
        p.add_argument(f"--leader-elect-{flag}", type=_seconds, default=default, metavar="SECONDS",
                       help=f"{what} (default %(default)s)")
    p.add_argument("--identity", default=os.environ.get("POD_NAME") or socket.gethostname(),
                   help="this replica's name in the Lease (env POD_NAME; default the host name)")
    p.add_argument("--metrics-address", default=":8080", type=lambda t: _host_port(t, "--metrics-address"),
                   help="HOST:PORT of /metrics (default %(default)s)")
    p.add_argument("--health-address", default=":8081", type=lambda t: _host_port(t, "--health-address"),
                   help="HOST:PORT of /healthz and /readyz (default %(default)s)")
    p.add_argument("--workers", type=int, default=2, help="reconcile workers (default %(default)s)")
    p.add_argument("--migration-hook", action="append", default=[], type=migration_hook_arg, metavar="EVENT=COMMAND",
                   help="run COMMAND (an argv, no shell) in the controller's container at a live-migration event "
                        "(pre, post, failed); {vm}, {namespace}, {source}, {target} expand to the VMI and its "
                        "nodes, the migration's state comes as JSON on stdin")
    p.set_defaults(func=cmd_controller)


class Health:
    """What /healthz and /readyz say: alive while the loop's threads are; ready when synced."""

    def __init__(self) -> None:
        self.synced = threading.Event()
        self.failed = threading.Event()

    def serve(self, address: tuple[str, int]) -> ThreadingHTTPServer:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        health = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                path = self.path.split("?", 1)[0]
                if path == "/healthz":
                    ok = not health.failed.is_set()
                elif path == "/readyz":
                    ok = health.synced.is_set() and not health.failed.is_set()
                else:
                    self.send_error(404)
                    return
                body = b"ok\n" if ok else b"not ready\n"
                self.send_response(200 if ok else 503)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        server = ThreadingHTTPServer(address, Handler)
        threading.Thread(target=server.serve_forever, name="health", daemon=True).start()
        return server


def cmd_controller(args: argparse.Namespace) -> int:
    from prometheus_client import start_http_server

    from controlplane.context import Cluster, Context
    from controlplane.control_loop import ControlLoop
    from controlplane.kube_store import KubeStore
    from controlplane.leader import LeaderElector
    from csi.server import setup_logging
    from pvlun.controllers import CLUSTER_SELECTORS, CLUSTER_WATCHED, cluster_reconcilers

    if not args.image:
        raise ValueError("--image (or PVLUN_IMAGE) is required: importer and launcher Pods run it")
    setup_logging()
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    health = Health()
    health_server = health.serve(args.health_address)
    metrics_server, _ = start_http_server(args.metrics_address[1], addr=args.metrics_address[0])
    store = KubeStore.from_kubeconfig(args.kubeconfig, args.context, namespace=args.controller_namespace,
                                      selectors=CLUSTER_SELECTORS)
    reconcilers = cluster_reconcilers()
    store.start(dict.fromkeys([kind for kind, _ in reconcilers] + list(CLUSTER_WATCHED)))
    health.synced.set()  # every informer listed: a kind it may not read has stopped the start already
    ctx = Context(store=store, csi=None, data_dir="", node_ids=[], stopping=stopping,
                  cluster=Cluster(image=args.image, namespace=args.controller_namespace, kvm=args.kvm),
                  services={"pod_exec": store.exec, "migration_hooks": list(args.migration_hook)})
    loop = ControlLoop(ctx, reconcilers, watched=CLUSTER_WATCHED)

    def lost() -> None:
        health.failed.set()
        stopping.set()

    elector = None
    stores = [store]
    try:
        if args.leader_elect:
            # its own store, watching Leases of the controller's namespace only (its Role's reach;
            # cluster-wide it would cache every node's heartbeat Lease)
            lease_store = KubeStore.from_kubeconfig(args.kubeconfig, args.context, namespace=args.controller_namespace,
                                                    watch_namespace=args.controller_namespace)
            stores.append(lease_store)
            elector = LeaderElector(lease_store, LEASE_NAME, args.controller_namespace, args.identity,
                                    lease_seconds=args.leader_elect_lease_duration,
                                    renew_deadline=args.leader_elect_renew_deadline,
                                    retry_seconds=args.leader_elect_retry_period)
            elector.run(stopping, lambda: loop.start(args.workers), lost)
        else:
            loop.start(args.workers)
            stopping.wait()
    finally:
        stopping.set()
        loop.join(10)
        if elector is not None:
            elector.release()
        for each in stores:
            each.stop()
        health_server.shutdown()
        metrics_server.shutdown()
    if health.failed.is_set():
        log.error("leadership lost: exiting so a fresh process campaigns again")
        return 1
    return 0
