"""`pvlun serve`: the CSI driver (and, in embedded mode, the controllers) in one process."""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import socket
import threading
from dataclasses import dataclass, field

from csi.backends.file import FileBackend
from csi.catalog import Catalog
from csi.controller import ControllerService
from csi.errors import private_root
from csi.group_controller import GroupControllerService
from csi.identity import IdentityService
from csi.lun_service import LunService
from csi.pool import DEFAULT_POOL_SIZE, pool_backing, prepare_pool, private_dir, release_pool
from csi.proto import csi_pb2_grpc
from csi.server import build_server, parse_endpoint
from controlplane import serve_record
from controlplane.serve_record import default_endpoint, node_endpoint
from pvlun.instance_lock import InstanceLocks

ISCSI_STATE_ROOT = "/run/pvlun/iscsi"
log = logging.getLogger("pvlun.serve")
DEFAULT_PORTAL = "127.0.0.1:3260"


@dataclass
class ServeOptions:
    data_dir: str
    endpoint: str = ""
    node_id: str = field(default_factory=socket.gethostname)
    mode: str = "all"  # all | controller | node
    nodes: int = 2
    pool: str | None = None
    pool_size: int = DEFAULT_POOL_SIZE
    max_volumes_per_node: int = 256
    overcommit: float = 1.0  # volumes may add up to this many times the pool size
    controllers: bool = True  # run the embedded control plane (mode all)
    allow_file_import: bool = False  # let DataVolumes read file:// URLs (embedded mode only)
    upload_address: str = "127.0.0.1:0"
    metrics_address: str = "127.0.0.1:0"
    stall_seconds: float = 120.0  # an import that receives no byte this long is stalled
    retry_backoff: float = 10.0  # before a failed import's second attempt (doubling after)
    accel: str | None = None
    migration_hooks: list[tuple[str, str]] = field(default_factory=list)
    migration_network: str = ""  # CIDR: live migrations stream over this host's address in it
    backend: str = "file"  # of volumes whose StorageClass names none: file | iscsi
    iscsi_portal: str = ""  # where pvlun's tgtd listens (DEFAULT_PORTAL with backend iscsi)
    iscsi_control_port: int = 3261

    def iscsi(self) -> bool:
        return self.backend == "iscsi" or bool(self.iscsi_portal)

    def node_ids(self) -> list[str]:
        """This host as N nodes: <node-id>, <node-id>-2, ... (embedded mode only: a split
        node plugin is exactly the node it runs on)."""
        count = self.nodes if self.mode == "all" else 1
        return [self.node_id] + [f"{self.node_id}-{i}" for i in range(2, count + 1)]


def initiator_state_dir(data_dir: str, node_id: str) -> str:
    """Where the node plugin of `node_id` on data_dir keeps its userspace iSCSI initiator's
    state (a storage daemon's QMP socket per volume): under /run, whose short path leaves room
    in the 107 bytes of a socket path."""
    tag = hashlib.sha256(f"{os.path.abspath(data_dir)}\0{node_id}".encode()).hexdigest()[:16]
    return os.path.join(ISCSI_STATE_ROOT, tag)


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port or 0)


class Daemon:
    """Owns the pool, the catalog and the gRPC servers; `stop()` is safe from a signal."""

    def __init__(self, opts: ServeOptions):
        self.opts = opts
        self.data_dir = os.path.abspath(opts.data_dir)
        self.stopped = threading.Event()
        self._stop_lock = threading.Lock()
        self._stop_called = False
        self._start_done = threading.Event()  # a signal in the middle of start-up stops once it is over
        self.servers = []
        self.catalog: Catalog | None = None
        self.luns: LunService | None = None
        self.ctx = None
        self.loop = None
        self.metrics_server = None
        self.pool_watch = None
        self.iscsi = None  # the iscsi backend (its tgtd), when it runs
        self.initiators: dict = {}  # node ID → its userspace iSCSI initiator (csi/iscsi_userspace.py)
        # split deployments share a data dir: the controller and each node plugin keep their own
        self.role = serve_record.role(opts.mode, opts.node_id)
        self.pid_file = os.path.join(self.data_dir, serve_record.file_name(self.role, ".pid"))
        self.locks = InstanceLocks()
        self.migration_address: str | None = None

    def start(self) -> None:
        if self.opts.migration_network:  # before anything is touched: a host with no address there stops here
            from host.addresses import local_address_in, parse_network

            self.migration_address = local_address_in(parse_network(self.opts.migration_network))
            log.info("live migrations stream over %s (migration network %s)", self.migration_address,
                     self.opts.migration_network)
        try:
            self._lock()  # a second daemon on this instance stops here, having touched nothing
            try:
                self._start()
            except BaseException:
                log.error("pvlun serve could not start; releasing what it took")
                self.stop()  # never leave a pool mounted or a half-started server behind
                raise
        finally:
            self._start_done.set()

    def endpoint(self) -> str:
        """Where the first server listens: --endpoint, else a socket in the data dir (a split
        node plugin its node's own, so it never replaces the controller's)."""
        if self.opts.endpoint:
            return self.opts.endpoint
        if self.opts.mode == "node":
            return node_endpoint(self.data_dir, self.opts.node_id)
        return default_endpoint(self.data_dir)

    def _lock(self) -> None:
        """Take this daemon's roles (pvlun/instance_lock.py); InstanceBusy if one is taken."""
        opts = self.opts
        with_controller = opts.mode in ("all", "controller")
        for node_id in opts.node_ids()[1:]:  # a socket that cannot be bound fails before anything is taken
            parse_endpoint(node_endpoint(self.data_dir, node_id))
        parse_endpoint(self.endpoint())
        os.makedirs(self.data_dir, mode=0o700, exist_ok=True)
        try:
            if with_controller:
                self.locks.role(self.data_dir, "controller")
            for node_id in opts.node_ids() if opts.mode in ("all", "node") else []:
                self.locks.role(self.data_dir, f"node-{node_id}")
            if with_controller:  # the pool's own directory, before anything is mounted on it
                self.locks.pool(private_dir(os.path.abspath(opts.pool or os.path.join(self.data_dir, "pool"))))
        except BaseException:
            self.locks.release()
            raise

    def _start(self) -> None:
        private_dir(self.data_dir)  # 0700, also when it existed (a hostPath is made 0755)
        opts = self.opts
        for root in (self.data_dir, opts.pool):  # no status or event shows a path inside them
            if root:
                private_root(root)
        self.catalog = Catalog(os.path.join(self.data_dir, "catalog.db"))
        with_controller = opts.mode in ("all", "controller")
        with_node = opts.mode in ("all", "node")
        if with_controller:
            thin = opts.overcommit > 1  # past 1 the user chose thin provisioning: a sparse pool image
            pool = prepare_pool(self.data_dir, opts.pool, opts.pool_size, thin=thin)
            self.locks.pool(pool)  # an image pool's mounted root too: no --pool may name it
            backend = FileBackend(pool)
            if opts.iscsi():
                backend = self.iscsi = self._iscsi_backend(backend)
            self.luns = LunService(self.catalog, backend, opts.max_volumes_per_node, opts.overcommit,
                                   pool_backing(self.data_dir, pool, opts.pool_size, thin))
            repaired = self.luns.repair()
            if self.iscsi is not None:  # after repair: only what the catalog keeps comes back
                self.iscsi.start()
            log.info("pool %s (reflinks: %s); start-up repair: %s", pool, backend.reflinks, repaired)
            from controlplane.pool_watch import PoolWatch

            self.pool_watch = PoolWatch(self.luns.pool_usage)
        node_ids = opts.node_ids() if with_node else []
        for node_id in node_ids:
            self.catalog.register_node(node_id)
        if with_node and not (opts.mode == "all" and opts.controllers):
            self._release_unexplained()  # with a control plane: once its repair undid the attachments
        first = node_ids[0] if node_ids else None
        self.servers.append(build_server(self.endpoint(), self._services(with_controller, first)))
        nodes = {first: self.endpoint()} if first else {}
        for node_id in node_ids[1:]:
            nodes[node_id] = node_endpoint(self.data_dir, node_id)
            self.servers.append(build_server(nodes[node_id], self._services(False, node_id)))
        serve_record.write(self.data_dir, self.role, self.endpoint() if with_controller else "", nodes)
        if opts.mode == "all" and opts.controllers:
            self._start_control_plane(node_ids)
        if self.pool_watch is not None and opts.overcommit > 1:  # at 1 every promise is backed: nothing to watch
            self.pool_watch.run(self.ctx)
        with open(self.pid_file, "w") as f:
            f.write(str(os.getpid()))
        log.info("serving %s (mode %s, nodes %s)", self.endpoint(), opts.mode, node_ids)

    def _iscsi_backend(self, file_backend):
        from csi.backends.iscsi import IscsiBackend
        from host.tgt import TgtDaemon

        tgtd = TgtDaemon(self.opts.iscsi_portal or DEFAULT_PORTAL, self.opts.iscsi_control_port,
                         os.path.join(self.data_dir, "tgtd.log"))
        return IscsiBackend(file_backend, self.catalog, tgtd, default=self.opts.backend)

    def _start_control_plane(self, node_ids: list[str]) -> None:
        """The embedded Kubernetes: object store, reconcile loop, talking CSI over our own socket."""
        from controlplane.context import Context
        from pvlun.controllers import run_loop
        from controlplane.csi_client import CsiClient
        from controlplane.store import SQLiteStore

        store = SQLiteStore(os.path.join(self.data_dir, "catalog.db"))
        csi = CsiClient(self.data_dir, node_ids, self.endpoint())
        self.ctx = Context(store, csi, self.data_dir, node_ids, max_volumes_per_node=self.opts.max_volumes_per_node)
        self.ctx.services["allow_file"] = self.opts.allow_file_import
        self.ctx.services["stall_seconds"] = self.opts.stall_seconds
        self.ctx.services["retry_backoff"] = self.opts.retry_backoff
        self.ctx.services["accel"] = self.opts.accel
        self.ctx.services["migration_hooks"] = list(self.opts.migration_hooks)
        self.ctx.services["migration_address"] = self.migration_address
        from importer.container_disks import ImageCache  # containerDisk and kernelBoot images, per digest

        self.ctx.services["container_images"] = ImageCache(os.path.join(self.data_dir, "container-disks"),
                                                           certs_dir=os.path.join(self.data_dir, "certs.d"))
        if self.pool_watch is not None:
            from controlplane.provisioner import ensure_default_storage_class

            self.ctx.services["pool_watch"] = self.pool_watch
            ensure_default_storage_class(self.ctx)  # where the pool's warnings go
        if self.luns is not None:
            from controlplane.pool_watch import pool_classes

            ctx = self.ctx  # a LUN group near its limit: a Warning on the driver's StorageClasses
            self.luns.on_warning = lambda message: [ctx.store.add_event(sc, "Warning", "LunsNearLimit", message)
                                                    for sc in pool_classes(ctx)]
        from pvlun.controllers import recover

        log.info("control plane start-up repair: %s", recover(self.ctx))
        from csi.catalog import reserve_space

        reserve_space(os.path.join(self.data_dir, "catalog.db"))  # its WAL exists now: repair wrote
        self._release_unexplained()
        from importer.upload_gateway import UploadGateway

        upload = UploadGateway(self.ctx, _address(self.opts.upload_address))
        upload.start()
        self.ctx.services["upload"] = upload
        if self.opts.metrics_address:
            from prometheus_client import start_http_server

            host, port = _address(self.opts.metrics_address)
            self.metrics_server, _ = start_http_server(port, addr=host)
            from importer import metrics

            store = self.ctx.store  # a deleted DataVolume's progress series goes with it
            metrics.drop_deleted(lambda ns, name: store.get("DataVolume", name, ns) is not None)
            if self.luns is not None:
                self.ctx.services["pool_watch"].expose()
            if self.iscsi is not None:
                from prometheus_client.core import REGISTRY
                from pvlun.luns import LunCollector

                REGISTRY.register(LunCollector(self.iscsi.accounting))
            with open(os.path.join(self.data_dir, "metrics.url"), "w") as f:
                f.write(f"http://{host}:{self.metrics_server.server_address[1]}/metrics")
        self.loop = run_loop(self.ctx)

    def _volumes_dir(self) -> str:
        """Where the pool's LUN files are, as the node side reaches them."""
        if self.luns is not None:
            return self.luns.backend.volumes_dir
        return os.path.join(os.path.abspath(self.opts.pool or os.path.join(self.data_dir, "pool")), "volumes")

    def _release_unexplained(self) -> None:
        """Node side start-up repair (csi/node_repair.py): loop devices and mounts of our LUNs
        that no publication in the catalog explains, left by a stage a crash cut off."""
        from csi.node_repair import release_unexplained

        published = self.catalog.published_volumes()
        log.info("node start-up repair: %s", release_unexplained([self._volumes_dir()], published))
        for node_id in self.opts.node_ids():
            initiator = self._initiator(node_id)
            # A split node plugin may share no catalog with its controller (a data dir of its
            # own): what it staged to the end is explained by its mounts, and the CO unstages it.
            explained = published | initiator.staged() if self.opts.mode == "node" else published
            log.info("node %s iSCSI start-up repair: %s", node_id, initiator.repair(explained))

    def _initiator(self, node_id: str):
        """The node's userspace iSCSI initiator (its state: initiator_state_dir)."""
        from csi.iscsi_context import initiator_name
        from csi.iscsi_userspace import UserspaceInitiator

        if node_id not in self.initiators:
            self.initiators[node_id] = UserspaceInitiator(initiator_state_dir(self.data_dir, node_id),
                                                          initiator_name(node_id))
        return self.initiators[node_id]

    def _services(self, with_controller: bool, node_id: str | None) -> list:
        from csi.node import NodeService

        adds = [lambda s: csi_pb2_grpc.add_IdentityServicer_to_server(IdentityService(with_controller), s)]
        if with_controller:
            assert self.luns is not None
            adds.append(lambda s: csi_pb2_grpc.add_ControllerServicer_to_server(ControllerService(self.luns), s))
            adds.append(lambda s: csi_pb2_grpc.add_GroupControllerServicer_to_server(GroupControllerService(self.luns), s))
        if node_id:
            node = NodeService(node_id, self.opts.max_volumes_per_node, pool_volumes_dirs=[self._volumes_dir()],
                               iscsi=self._initiator(node_id))
            adds.append(lambda s: csi_pb2_grpc.add_NodeServicer_to_server(node, s))
        return adds

    def _stop_after_start(self) -> None:
        """A stop while start-up still runs would close the store and servers it is using (a
        CSI client may call as soon as the socket answers, and stop the daemon at once)."""
        self._start_done.wait()
        self.stop()

    def stop(self) -> None:
        """Stop what was started, newest first; every step runs even when one before it
        failed, so neither a stop nor a failed start leaves the pool mounted behind. Only
        the first call stops (a second SIGTERM waits for it): the store closes once, after
        the threads that use it ended."""
        with self._stop_lock:
            first = not self._stop_called
            self._stop_called = True
        if not first:
            self.stopped.wait()
            return
        steps: list = [self.pool_watch.stop] if self.pool_watch is not None else []
        steps += self._control_plane_stops() if self.ctx is not None else []
        steps += [lambda server=server: server.stop(grace=5).wait(10) for server in self.servers]
        steps += [lambda: serve_record.remove(self.data_dir, self.role), self._remove_pid_file]
        if self.ctx is not None:
            steps.append(self.ctx.store.close)  # checkpoints the WAL into catalog.db
        if self.iscsi is not None:
            steps.append(self.iscsi.stop)  # tgtd ends with pvlun: the next start re-exports
        steps.append(self._remove_empty_iscsi_state)
        if self.catalog is not None:
            steps.append(self.catalog.close)
        steps.append(lambda: self.locks.release(pools_only=True))  # an open pool directory keeps it mounted
        if self.opts.mode in ("all", "controller") and not self.opts.pool:
            steps.append(lambda: release_pool(self.data_dir))
        steps.append(self.locks.release)  # last: another daemon may start now
        for step in steps:
            try:
                step()
            except Exception:
                log.exception("while stopping")
        self.stopped.set()

    def _control_plane_stops(self) -> list:
        """The reconcile loop first (no new work), then the jobs it started (running imports
        give their volumes back), VMs, the upload and metrics servers; the store stays open
        until they all ended (`stop` closes it last)."""
        ctx = self.ctx
        steps = [ctx.stopping.set]
        if self.loop is not None:
            steps.append(self._join_loop)
        steps.append(lambda: ctx.jobs.join_all(10))
        if "vms" in ctx.services:
            steps.append(lambda: ctx.services["vms"].stop_all(grace=10))
        if "upload" in ctx.services:
            steps.append(ctx.services["upload"].stop)
        if ctx.csi is not None:  # export servers end and give their claims back
            from importer.vm_export import stop_all as stop_exports
            steps.append(lambda: stop_exports(ctx))
        if self.metrics_server is not None:
            steps.append(self.metrics_server.shutdown)
        return steps

    def _join_loop(self) -> None:
        if not self.loop.join(10):
            log.warning("a reconcile still runs after 10 s; stopping without it")

    def _remove_empty_iscsi_state(self) -> None:
        """A node's initiator state dir is named for its data dir: once nothing is staged it is
        empty, and would otherwise stay in /run for every data dir ever served."""
        for initiator in self.initiators.values():
            try:
                os.rmdir(initiator.state_dir)
            except OSError:  # gone already, or still holds a staged volume's daemon: kept
                pass

    def _remove_pid_file(self) -> None:
        try:
            os.unlink(self.pid_file)
        except FileNotFoundError:
            pass

    def run_until_signal(self) -> None:
        def on_signal(signum, frame):
            if self._stop_called:
                log.info("signal %d: already stopping", signum)
                return
            log.info("signal %d: stopping", signum)
            threading.Thread(target=self._stop_after_start, daemon=True).start()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        self.start()
        self.stopped.wait()
        # stopped: a later signal has nothing to stop (and must not kill the exit half-way)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
