"""The CSI Node service: stage a LUN on this host, publish it where a workload wants it.

Stateless by design: what is staged or published where is read back from the system
(mountinfo, loop devices) on every call, so a restarted driver picks up where it was.
Each RPC validates its request first (csi/validation_node.py), then calls into the
staging operations (csi/staging.py), which use the host primitives of csi/attach.py
(loop devices, mounts) and csi/filesystems.py.
"""

from __future__ import annotations

import functools
import socket
import logging
import os
import time
from collections.abc import Sequence

import grpc

from csi import attach, node_volume, staging
from csi.iscsi_context import chap_from, is_iscsi, parse_lun
from csi.iscsi_userspace import UserspaceInitiator
from csi.errors import CsiError, invalid, precondition, public_message, shown
from csi.convert import TOPOLOGY_HOST_KEY
from csi.filesystems import DeviceNotBlank
from csi.locks import KeyedLocks
from csi.proto import csi_pb2, csi_pb2_grpc
from csi.validation_node import (
    check_capability, check_path, check_volume_id, check_volume_path, lun_files, lun_path, require,
)
from host.command import CommandError

log = logging.getLogger(__name__)

_Cap = csi_pb2.NodeServiceCapability.RPC.Type
_CAPABILITIES = (
    _Cap.STAGE_UNSTAGE_VOLUME,
    _Cap.GET_VOLUME_STATS,
    _Cap.EXPAND_VOLUME,
    _Cap.VOLUME_CONDITION,
    _Cap.SINGLE_NODE_MULTI_WRITER,
)
_Unit = csi_pb2.VolumeUsage.Unit


def _rpc(method):
    """Turn the errors of a node operation into the gRPC status the CO acts on."""

    @functools.wraps(method)
    def handler(self, request, context):
        start = time.monotonic()
        code = grpc.StatusCode.OK
        try:
            return method(self, request, context)
        except CsiError as exc:
            code, message = exc.code, exc.message
        except DeviceNotBlank as exc:
            code, message = grpc.StatusCode.FAILED_PRECONDITION, str(exc)
        except CommandError as exc:
            code, message = grpc.StatusCode.INTERNAL, str(exc)
        except OSError as exc:
            where = f": {shown(public_message(str(exc.filename)))}" if exc.filename else ""
            code, message = grpc.StatusCode.INTERNAL, f"{exc.strerror or type(exc).__name__}{where}"
        finally:
            log.debug("%s volume=%s %.3fs %s", method.__name__, shown(getattr(request, "volume_id", "")),
                      time.monotonic() - start, code.name)
        context.abort(code, public_message(message))

    return handler


def _published_elsewhere(staged_at: str, target: str) -> list[str]:
    """Targets other than `target` bound from what is staged at `staged_at` (the staging
    mount for a filesystem, the STAGING/lun device bind for a block volume)."""
    source = attach.mount_at(os.path.join(staged_at, staging.BLOCK_NODE)) or attach.mount_at(staged_at)
    if source is None:
        return []
    key = (source.major, source.minor, source.root)
    return [m.mount_point for m in attach.mounts()
            if (m.major, m.minor, m.root) == key and m.mount_point not in (source.mount_point, target)]


class NodeService(csi_pb2_grpc.NodeServicer):
    """CSI Node for LUN files reached through loop devices on this host."""

    def __init__(self, node_id: str, max_volumes: int = 256,
                 topology_key: str = "topology.csi.pvlun.dev/node",
                 pool_volumes_dirs: Sequence[str] = (), iscsi: UserspaceInitiator | None = None):
        self.node_id = node_id
        self.max_volumes = max_volumes
        self.topology_key = topology_key
        # The pool's volumes dirs: a volume's LUN is <dir>/<volume_id>.img and nothing else.
        # Only such a LUN is staged, and only mounts of its loop device are unmounted,
        # reported on or grown. With none, the node stages nothing and touches nothing.
        self.pool_volumes_dirs = tuple(pool_volumes_dirs)
        if not self.pool_volumes_dirs:
            log.warning("node %s has no pool volumes dir: it will stage no volume", node_id)
        # Calls for one volume run one at a time; a retry arriving while a long call (mkfs,
        # resize) still runs gets ABORTED, the spec's "operation pending".
        self._locks = KeyedLocks(wait_seconds=30)
        # Volumes of the iscsi backend are reached through it (csi/iscsi_userspace.py): their
        # loop device reads the FUSE file its qemu-storage-daemon exports, not a pool file.
        self.iscsi = iscsi

    def _lock(self, volume_id: str):
        return self._locks.hold(volume_id)

    def _luns(self, volume_id: str) -> tuple[str, ...]:
        """Where volume_id's LUN file may be (real paths); volume_id must be validated."""
        exports = (self.iscsi.export_path(volume_id),) if self.iscsi else ()
        return lun_files(volume_id, self.pool_volumes_dirs) + exports

    @_rpc
    def NodeStageVolume(self, request, context):
        require(request.volume_id, "volume_id")
        require(request.staging_target_path, "staging_target_path")
        require(request.HasField("volume_capability"), "volume_capability")
        access = check_capability(request.volume_capability)
        target = check_path(request.staging_target_path, "staging_target_path")
        check_volume_id(request.volume_id)
        if is_iscsi(request.publish_context):
            self._stage_iscsi(request, target, access)
            return csi_pb2.NodeStageVolumeResponse()
        lun = lun_path(dict(request.publish_context), dict(request.volume_context), request.volume_id,
                       self.pool_volumes_dirs)
        with self._lock(request.volume_id):
            staging.stage(request.volume_id, lun, target, access)
        return csi_pb2.NodeStageVolumeResponse()

    def _stage_iscsi(self, request, target: str, access) -> None:
        """Log in to the LUN publish_context names (CHAP password from the node-stage
        secret), then stage the exported file as any LUN file."""
        lun = parse_lun(request.publish_context, request.volume_id)
        chap = chap_from(lun, request.secrets)
        if self.iscsi is None:
            raise precondition(f"node {self.node_id} has no iSCSI initiator: it cannot stage {lun.describe()}")
        with self._lock(request.volume_id):
            export = self.iscsi.attach(request.volume_id, lun, chap)
            try:
                staging.stage(request.volume_id, export, target, access)
            except BaseException:
                self.iscsi.release(request.volume_id)
                raise

    @_rpc
    def NodeUnstageVolume(self, request, context):
        require(request.volume_id, "volume_id")
        require(request.staging_target_path, "staging_target_path")
        target = check_path(request.staging_target_path, "staging_target_path")
        check_volume_id(request.volume_id)
        with self._lock(request.volume_id):
            staging.unstage(request.volume_id, target, self._luns(request.volume_id))
            if self.iscsi:
                self.iscsi.release(request.volume_id)  # logs out once no staging here reads it
        return csi_pb2.NodeUnstageVolumeResponse()

    @_rpc
    def NodePublishVolume(self, request, context):
        require(request.volume_id, "volume_id")
        require(request.target_path, "target_path")
        require(request.HasField("volume_capability"), "volume_capability")
        access = check_capability(request.volume_capability)
        require(request.staging_target_path, "staging_target_path")
        target = check_path(request.target_path, "target_path")
        staged_at = check_path(request.staging_target_path, "staging_target_path")
        check_volume_id(request.volume_id)
        read_only = request.readonly or access.read_only_mode
        with self._lock(request.volume_id):
            if access.mode == csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_SINGLE_WRITER:
                others = _published_elsewhere(staged_at, target)
                if others:
                    raise CsiError(grpc.StatusCode.FAILED_PRECONDITION,
                                   f"volume {request.volume_id} is SINGLE_NODE_SINGLE_WRITER and already "
                                   f"published at {shown(others[0])}")
            staging.publish(request.volume_id, staged_at, target, access, read_only,
                            self._luns(request.volume_id))
        return csi_pb2.NodePublishVolumeResponse()

    @_rpc
    def NodeUnpublishVolume(self, request, context):
        require(request.volume_id, "volume_id")
        require(request.target_path, "target_path")
        target = check_path(request.target_path, "target_path")
        check_volume_id(request.volume_id)
        with self._lock(request.volume_id):
            staging.unpublish(request.volume_id, target, self._luns(request.volume_id))
        return csi_pb2.NodeUnpublishVolumeResponse()

    @_rpc
    def NodeGetVolumeStats(self, request, context):
        require(request.volume_id, "volume_id")
        require(request.volume_path, "volume_path")
        check_volume_id(request.volume_id)
        path = check_volume_path(request.volume_path, request.volume_id)
        stats = node_volume.volume_stats(request.volume_id, path, self._luns(request.volume_id))
        problem = stats.problem
        if problem is None and self.iscsi and self.iscsi.attached(request.volume_id):
            problem = self.iscsi.problem(request.volume_id)
        if stats.block:
            usage = [csi_pb2.VolumeUsage(unit=_Unit.BYTES, total=stats.size)]
        else:
            u = stats.usage
            usage = [
                csi_pb2.VolumeUsage(unit=_Unit.BYTES, total=u.total_bytes,
                                    available=u.available_bytes, used=u.used_bytes),
                csi_pb2.VolumeUsage(unit=_Unit.INODES, total=u.total_inodes,
                                    available=u.available_inodes, used=u.used_inodes),
            ]
        condition = csi_pb2.VolumeCondition(abnormal=problem is not None, message=problem or "volume is healthy")
        return csi_pb2.NodeGetVolumeStatsResponse(usage=usage, volume_condition=condition)

    @_rpc
    def NodeExpandVolume(self, request, context):
        require(request.volume_id, "volume_id")
        require(request.volume_path, "volume_path")
        if request.HasField("volume_capability"):
            check_capability(request.volume_capability)
        check_volume_id(request.volume_id)
        path = check_volume_path(request.volume_path, request.volume_id)
        cr = request.capacity_range
        if cr.required_bytes < 0 or cr.limit_bytes < 0:
            raise invalid("capacity_range must not be negative")
        with self._lock(request.volume_id):
            if self.iscsi and self.iscsi.attached(request.volume_id):
                self.iscsi.rescan(request.volume_id)  # the target's LUN grew: read its capacity
            size = node_volume.expand(request.volume_id, path, cr.required_bytes, cr.limit_bytes,
                                  self._luns(request.volume_id))
        return csi_pb2.NodeExpandVolumeResponse(capacity_bytes=size)

    @_rpc
    def NodeGetCapabilities(self, request, context):
        return csi_pb2.NodeGetCapabilitiesResponse(capabilities=[
            csi_pb2.NodeServiceCapability(rpc=csi_pb2.NodeServiceCapability.RPC(type=t))
            for t in _CAPABILITIES
        ])

    @_rpc
    def NodeGetInfo(self, request, context):
        return csi_pb2.NodeGetInfoResponse(
            node_id=self.node_id,
            max_volumes_per_node=self.max_volumes,
            # the host key is what volumes are accessible by (every node of this host reaches its
            # pool); the node key lets a workload be pinned to one of the host's nodes.
            accessible_topology=csi_pb2.Topology(segments={self.topology_key: self.node_id,
                                                           TOPOLOGY_HOST_KEY: socket.gethostname()}),
        )
