"""Attach and detach volumes the way kubelet and the external-attacher would:
ControllerPublish to the node, NodeStage, NodePublish — and the reverse. Each attachment
is recorded as a VolumeAttachment object so that a restart can undo it."""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass

from csi.proto import csi_pb2 as pb
from pvlun.csi_client import CsiClient, capability
from pvlun.store import ObjectStore

log = logging.getLogger("pvlun.kubelet")


class NotReady(Exception):
    """The claim is not bound yet; try again later."""


@dataclass
class Attachment:
    path: str  # a block device file (Block) or a mounted directory (Filesystem)
    volume_id: str
    node_id: str
    block: bool


def _name(volume_id: str, node_id: str, owner: str) -> str:
    return "csi-" + hashlib.sha256(f"{volume_id}/{node_id}/{owner}".encode()).hexdigest()[:40]


def claim_volume(store: ObjectStore, claim: str, namespace: str) -> tuple[dict, dict]:
    pvc = store.get("PersistentVolumeClaim", claim, namespace)
    if not pvc or pvc.get("status", {}).get("phase") != "Bound":
        raise NotReady(f"PersistentVolumeClaim {namespace}/{claim} is not bound")
    pv = store.get("PersistentVolume", pvc["spec"]["volumeName"])
    if not pv:
        raise NotReady(f"PersistentVolume of claim {namespace}/{claim} is missing")
    return pvc, pv


def paths(data_dir: str, node_id: str, volume_id: str, owner: str) -> tuple[str, str]:
    # the data dir's real path: the node refuses staging and target paths through a link
    node_dir = os.path.join(os.path.realpath(data_dir), "nodes", node_id)
    staging = os.path.join(node_dir, "staging", volume_id)
    target = os.path.join(node_dir, "publish", owner.replace("/", "_"), volume_id)
    return staging, target


def attach(store: ObjectStore, csi: CsiClient, data_dir: str, claim: str, namespace: str, node_id: str,
           owner: str, readonly: bool = False, access_mode: str = "") -> Attachment:
    """Make the claim's volume usable on `node_id` for `owner` (a VM, an import)."""
    pvc, pv = claim_volume(store, claim, namespace)
    spec = pv["spec"]
    volume_id = spec["csi"]["volumeHandle"]
    block = spec.get("volumeMode", "Filesystem") == "Block"
    cap = capability(spec.get("volumeMode", "Filesystem"), access_mode or spec["accessModes"][0],
                     spec["csi"].get("fsType", ""), spec.get("mountOptions") or ())
    staging, target = paths(data_dir, node_id, volume_id, owner)
    os.makedirs(staging, exist_ok=True)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    name = _name(volume_id, node_id, owner)
    existed = store.get("VolumeAttachment", name, "") is not None
    store.apply({"apiVersion": "storage.k8s.io/v1", "kind": "VolumeAttachment", "metadata": {"name": name},
                 "spec": {"attacher": "csi.pvlun.dev", "nodeName": node_id,
                          "source": {"persistentVolumeName": pv["metadata"]["name"]},
                          "owner": owner, "stagingPath": staging, "targetPath": target, "volumeId": volume_id}})
    try:
        published = csi.controller.ControllerPublishVolume(pb.ControllerPublishVolumeRequest(
            volume_id=volume_id, node_id=node_id, volume_capability=cap, readonly=readonly,
            volume_context=spec["csi"].get("volumeAttributes", {})))
        context = dict(published.publish_context)
        node = csi.node(node_id)
        node.NodeStageVolume(pb.NodeStageVolumeRequest(
            volume_id=volume_id, publish_context=context, staging_target_path=staging, volume_capability=cap))
        node.NodePublishVolume(pb.NodePublishVolumeRequest(
            volume_id=volume_id, publish_context=context, staging_target_path=staging, target_path=target,
            volume_capability=cap, readonly=readonly))
    except BaseException:
        if not existed:
            _undo(store, csi, volume_id, node_id, owner)  # a failed attach leaves no attachment behind
        raise
    store.update_status("VolumeAttachment", name, "", {"attached": True, "attachmentMetadata": context})
    return Attachment(target, volume_id, node_id, block)


def _undo(store: ObjectStore, csi: CsiClient, volume_id: str, node_id: str, owner: str) -> None:
    try:
        detach(store, csi, volume_id, node_id, owner)
    except Exception as exc:  # the node or controller is unreachable: the record must go all the same
        log.warning("undoing the attachment of %s on %s: %s", volume_id, node_id, exc)
        store.delete("VolumeAttachment", _name(volume_id, node_id, owner), "")


def detach(store: ObjectStore, csi: CsiClient, volume_id: str, node_id: str, owner: str,
           via: str | None = None) -> None:
    """Undo `attach`; unstage and controller-unpublish only when no other owner on the node uses it.
    `via` names the node plugin to call when `node_id` is one this daemon no longer serves (a
    renamed host: every embedded node is this host, so another of its plugins can undo it)."""
    name = _name(volume_id, node_id, owner)
    record = store.get("VolumeAttachment", name, "")
    if record is None:
        return
    staging, target = record["spec"]["stagingPath"], record["spec"]["targetPath"]
    node = csi.node(via or node_id)
    node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=target))
    store.delete("VolumeAttachment", name, "")
    others = [a for a in store.list("VolumeAttachment")
              if a["spec"].get("volumeId") == volume_id and a["spec"].get("nodeName") == node_id]
    if not others:
        node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(volume_id=volume_id, staging_target_path=staging))
        csi.controller.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(
            volume_id=volume_id, node_id=node_id))


def attachments_of(store: ObjectStore, owner: str) -> list[dict]:
    return [a for a in store.list("VolumeAttachment") if a["spec"].get("owner") == owner]
