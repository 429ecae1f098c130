"""Attach and detach volumes the way kubelet and the external-attacher would:
ControllerPublish to the node, NodeStage, NodePublish — and the reverse. Each attachment
is recorded as a VolumeAttachment object so that a restart can undo it."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from dataclasses import dataclass, field

import grpc

from csi.proto import csi_pb2 as pb
from controlplane.csi_client import CsiClient, capability
from controlplane.secret_refs import referenced
from controlplane.store import ObjectStore, now
from controlplane.user_text import user_text

log = logging.getLogger("pvlun.kubelet")


class NotReady(Exception):
    """The claim is not bound yet; try again later."""


class NodeFull(Exception):
    """ControllerPublish found the node at its volume limit: wait for a slot, then try again."""


NAME_MAX = 255  # bytes in one path component (Linux)
FINALIZER = "external-attacher/csi-pvlun-dev"  # a VolumeAttachment goes only once it is detached
FIELDS = ("volumeId", "nodeName", "owner", "stagingPath", "targetPath")  # what detaching one needs


@dataclass
class Attachment:
    path: str  # a block device file (Block) or a mounted directory (Filesystem); "" when not staged
    volume_id: str
    node_id: str
    block: bool
    publish_context: dict = field(default_factory=dict)  # ControllerPublish's answer
    staged: bool = True  # False: published to the node only, its user (QEMU) opens the LUN itself
    # the PersistentVolume's node-stage secret: what a QEMU that opens the LUN itself logs in with
    stage_secrets: dict = field(default_factory=dict, repr=False)


# On a VolumeAttachment whose volume was published to the node but neither staged nor published
# there (a QEMU that opens the iSCSI LUN itself): detaching it has no NodeUnpublish to do.
UNSTAGED_ANNOTATION = "pvlun.dev/node-publish"
QEMU_DIRECT_KEY = "qemuDirect"  # publish_context: the controller allows an iSCSI user to log in itself


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


def path_component(text: str, limit: int = NAME_MAX) -> str:
    """`text` as one path component: unchanged when it fits, else a prefix and a hash of the
    whole (owners hold namespace and name: up to 63 + 253 characters and a prefix)."""
    if len(text.encode()) <= limit:
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()[:32]
    return text.encode()[:limit - len(digest) - 1].decode(errors="ignore") + "-" + digest


def paths(data_dir: str, node_id: str, volume_id: str, owner: str) -> tuple[str, str]:
    # the data dir's real path: the node refuses staging and target paths through a link
    node_dir = os.path.join(os.path.realpath(data_dir), "nodes", node_id)
    staging = os.path.join(node_dir, "staging", volume_id)
    target = os.path.join(node_dir, "publish", path_component(owner.replace("/", "_")), volume_id)
    return staging, target


def attach(store: ObjectStore, csi: CsiClient, data_dir: str, claim: str, namespace: str, node_id: str,
           owner: str, readonly: bool = False, access_mode: str = "", direct_ok: bool = False) -> Attachment:
    """Make the claim's volume usable on `node_id` for `owner` (a VM, an import). With
    `direct_ok` (a QEMU, which can open an iSCSI LUN itself) a block volume whose publish_context
    says `qemuDirect: "true"` is only published to the node: no NodeStage/NodePublish."""
    pvc, pv = claim_volume(store, claim, namespace)
    spec = pv["spec"]
    volume_id = spec["csi"]["volumeHandle"]
    block = spec.get("volumeMode", "Filesystem") == "Block"
    cap = capability(spec.get("volumeMode", "Filesystem"), access_mode or spec["accessModes"][0],
                     spec["csi"].get("fsType", ""), spec.get("mountOptions") or ())
    refs = spec["csi"]  # the secrets the class named, as kubelet and the attacher read them (missing: nothing done)
    publish_secrets = referenced(store, refs.get("controllerPublishSecretRef"), "controller-publish secret")
    stage_secrets = referenced(store, refs.get("nodeStageSecretRef"), "node-stage secret")
    node_publish_secrets = referenced(store, refs.get("nodePublishSecretRef"), "node-publish secret")
    staging, target = paths(data_dir, node_id, volume_id, owner)
    os.makedirs(staging, exist_ok=True)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    name = _name(volume_id, node_id, owner)
    record = store.get("VolumeAttachment", name, "")
    if record is not None and record["metadata"].get("deletionTimestamp"):
        detach(store, csi, volume_id, node_id, owner)  # a detach left unfinished goes first (kubelet waits for it)
        record = None
    existed = record is not None
    store.apply({"apiVersion": "storage.k8s.io/v1", "kind": "VolumeAttachment",
                 "metadata": {"name": name, "finalizers": [FINALIZER]},
                 "spec": {"attacher": "csi.pvlun.dev", "nodeName": node_id,
                          "source": {"persistentVolumeName": pv["metadata"]["name"]},
                          "owner": owner, "stagingPath": staging, "targetPath": target, "volumeId": volume_id}})
    try:
        published = csi.controller.ControllerPublishVolume(pb.ControllerPublishVolumeRequest(
            volume_id=volume_id, node_id=node_id, volume_capability=cap, readonly=readonly,
            volume_context=spec["csi"].get("volumeAttributes", {}), secrets=publish_secrets))
        context = dict(published.publish_context)
        if direct_ok and block and context.get(QEMU_DIRECT_KEY) == "true":
            store.annotate("VolumeAttachment", name, "", **{UNSTAGED_ANNOTATION: "skipped"})
            store.update_status("VolumeAttachment", name, "", {"attached": True, "attachmentMetadata": context})
            return Attachment("", volume_id, node_id, block, context, staged=False, stage_secrets=stage_secrets)
        node = csi.node(node_id)
        node.NodeStageVolume(pb.NodeStageVolumeRequest(
            volume_id=volume_id, publish_context=context, staging_target_path=staging, volume_capability=cap,
            secrets=stage_secrets))
        node.NodePublishVolume(pb.NodePublishVolumeRequest(
            volume_id=volume_id, publish_context=context, staging_target_path=staging, target_path=target,
            volume_capability=cap, readonly=readonly, secrets=node_publish_secrets))
    except BaseException as exc:
        if not existed:
            _undo(store, csi, volume_id, node_id, owner)  # a failed attach leaves no attachment behind
        if isinstance(exc, grpc.RpcError) and exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
            raise NodeFull(f"node {node_id} is at its volume limit") from None
        raise
    store.update_status("VolumeAttachment", name, "", {"attached": True, "attachmentMetadata": context})
    return Attachment(target, volume_id, node_id, block, context)


def _undo(store: ObjectStore, csi: CsiClient, volume_id: str, node_id: str, owner: str) -> None:
    try:
        detach(store, csi, volume_id, node_id, owner)
    except Exception as exc:  # its record stays, marked detaching: the attacher retries it (reconcile_attachment)
        log.warning("undoing the attachment of %s on %s: %s", volume_id, node_id, exc)


def detach(store: ObjectStore, csi: CsiClient, volume_id: str, node_id: str, owner: str,
           via: str | None = None) -> None:
    """Undo `attach`: NodeUnpublish, then — when no other owner on the node still uses the
    volume — NodeUnstage and ControllerUnpublish, as kubelet and the external-attacher do.

    The record is marked first (deletionTimestamp: detaching) and removed only when every
    step succeeded, so a step that fails (a staging mount kept busy) or a crash in between
    leaves it for `reconcile_attachment` and start-up repair to finish: a publication never
    outlives its record, and the claim stays protected until it is really detached.
    `via` names the node plugin to call when `node_id` is one this daemon no longer serves
    (a renamed host: every embedded node is this host, so another of its plugins can undo it)."""
    name = _name(volume_id, node_id, owner)
    _begin(name, wait=True)
    try:
        _detach(store, csi, name, via)
    finally:
        _end(name)


def reconcile_attachment(ctx, att: dict) -> float | None:
    """The external-attacher's part: a VolumeAttachment being deleted (a detach that failed
    or was cut off, or `pvlun delete volumeattachment`) is detached; an error raises, and
    the controllers' queue tries again with backoff. One this process is detaching now is
    looked at again a moment later."""
    meta, spec = att["metadata"], att.get("spec") or {}
    if not meta.get("deletionTimestamp"):
        return None
    if not all(isinstance(spec.get(k), str) and spec.get(k) for k in FIELDS):
        ctx.store.patch_metadata("VolumeAttachment", meta["name"], "", finalizers=[])
        ctx.store.delete("VolumeAttachment", meta["name"], "")  # it names nothing that could be undone
        return None
    if not _begin(meta["name"], wait=False):
        return 1.0
    try:
        _detach(ctx.store, ctx.csi, meta["name"], None if spec["nodeName"] in ctx.node_ids else ctx.node_id)
    finally:
        _end(meta["name"])
    return None


_busy: set[str] = set()  # the attachments this process is detaching now
_busy_changed = threading.Condition()


def _begin(name: str, wait: bool) -> bool:
    """Detach one attachment at a time in this process: a late second detach must never
    unstage what an attach made after the first one finished."""
    with _busy_changed:
        while name in _busy:
            if not wait:
                return False
            _busy_changed.wait()
        _busy.add(name)
        return True


def _end(name: str) -> None:
    with _busy_changed:
        _busy.discard(name)
        _busy_changed.notify_all()


def _detach(store: ObjectStore, csi: CsiClient, name: str, via: str | None) -> None:
    record = store.get("VolumeAttachment", name, "")
    if record is None:
        return
    if not record["metadata"].get("deletionTimestamp"):
        store.patch_metadata("VolumeAttachment", name, "", deletionTimestamp=now())
    spec = record["spec"]
    volume_id, node_id = spec["volumeId"], spec["nodeName"]
    node = csi.node(via or node_id)
    unstaged = (record["metadata"].get("annotations") or {}).get(UNSTAGED_ANNOTATION) == "skipped"
    try:
        if not unstaged:
            _retried(node.NodeUnpublishVolume,
                     pb.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=spec["targetPath"]))
        store.merge_status("VolumeAttachment", name, "", detachStage="NodeUnpublished")
        others = [a for a in store.list("VolumeAttachment") if a["metadata"]["name"] != name
                  and (a.get("spec") or {}).get("volumeId") == volume_id and a["spec"].get("nodeName") == node_id
                  and (a.get("status") or {}).get("detachStage") is None]
        if not others:
            _retried(node.NodeUnstageVolume,
                     pb.NodeUnstageVolumeRequest(volume_id=volume_id, staging_target_path=spec["stagingPath"]))
            _retried(csi.controller.ControllerUnpublishVolume, pb.ControllerUnpublishVolumeRequest(
                volume_id=volume_id, node_id=node_id))
    except Exception as exc:
        store.merge_status("VolumeAttachment", name, "", detachError={"time": now(), "message": user_text(exc)})
        raise
    store.patch_metadata("VolumeAttachment", name, "", finalizers=[])
    store.delete("VolumeAttachment", name, "")


RETRY_DELAYS = (0.1, 0.3, 1.0, 2.0)  # a mount can be busy for a moment (a tool started elsewhere still holds it)
FINAL = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION)


def _retried(method, request):
    """A detach step, retried a few times as kubelet would: undoing must not give up at once.
    NOT_FOUND is done: there is nothing of the volume's left to undo there."""
    for delay in RETRY_DELAYS + (None,):
        try:
            return method(request)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            if exc.code() in FINAL or delay is None:
                raise
            time.sleep(delay)


def attachments_of(store: ObjectStore, owner: str) -> list[dict]:
    return [a for a in store.list("VolumeAttachment") if a["spec"].get("owner") == owner]
