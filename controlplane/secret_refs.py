"""The CSI secrets a StorageClass names, resolved as the external-provisioner and kubelet do.

A StorageClass names a Secret per operation with `csi.storage.k8s.io/<op>-secret-name` and
`-namespace` (<op>: provisioner, controller-publish, node-stage, node-publish,
controller-expand). The provisioner resolves the templates (`${pvc.name}`, `${pvc.namespace}`,
`${pv.name}`, and in names of the per-volume ones `${pvc.annotations['KEY']}`), passes the
provisioner Secret to CreateVolume, and writes the others into the PersistentVolume
(`spec.csi.nodeStageSecretRef`, ...); kubelet and the attacher read them from there. None of
these parameters reaches the driver. A Secret that is named and missing is an error naming
it; values never appear in a message.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Mapping

from controlplane.admission import check_name
from controlplane.store import ObjectStore

PREFIX = "csi.storage.k8s.io/"
# operation -> the PersistentVolume's spec.csi field ("" : only the provisioner uses it)
OPERATIONS = {"provisioner": "", "controller-publish": "controllerPublishSecretRef",
              "node-stage": "nodeStageSecretRef", "node-publish": "nodePublishSecretRef",
              "controller-expand": "controllerExpandSecretRef"}
# the deprecated spellings the external-provisioner still takes: csiNodeStageSecretName, ...
DEPRECATED = {"csi" + op.title().replace("-", "") + "Secret" + part.title(): f"{PREFIX}{op}-secret-{part}"
              for op in ("provisioner", "controller-publish", "node-stage", "node-publish")
              for part in ("name", "namespace")}
_TEMPLATE = re.compile(r"\$\{([^}]*)\}")
_ANNOTATION = re.compile(r"pvc\.annotations\['([^'\]]{1,316})'\]")


class SecretRefError(ValueError):
    """A StorageClass names a secret wrongly, or a named Secret is not there."""


def split_parameters(parameters: Mapping[str, str]) -> tuple[dict[str, str], dict[str, tuple[str, str]]]:
    """The StorageClass's parameters without the secret ones, and those as {operation: (name
    template, namespace template)}."""
    rest, found = {}, {}
    for key, value in parameters.items():
        key = DEPRECATED.get(key, key)
        matched = re.fullmatch(re.escape(PREFIX) + r"([a-z-]+)-secret-(name|namespace)", key)
        if not matched:
            rest[key] = value
            continue
        op, part = matched.groups()
        if op not in OPERATIONS:
            raise SecretRefError(f"storageclass parameter {key!r} names no CSI operation "
                                 f"({', '.join(OPERATIONS)} have secrets)")
        name, ns = found.get(op, ("", ""))
        found[op] = (str(value), ns) if part == "name" else (name, str(value))
    for op, (name, ns) in found.items():
        if not name or not ns:
            missing = "name" if not name else "namespace"
            raise SecretRefError(f"storageclass parameter {PREFIX}{op}-secret-{missing} is missing: "
                                 f"a {op} secret needs both a name and a namespace")
    return rest, found


def _resolve(template: str, what: str, values: Mapping[str, str], annotations: Mapping[str, str] | None) -> str:
    def one(found: re.Match) -> str:
        key = found.group(1)
        if key in values:
            return values[key]
        annotation = _ANNOTATION.fullmatch(key)
        if annotation and annotations is not None:
            if annotation.group(1) not in annotations:
                raise SecretRefError(f"{what}: the claim has no annotation {annotation.group(1)!r}")
            return str(annotations[annotation.group(1)])
        allowed = ", ".join("${" + k + "}" for k in values)
        raise SecretRefError(f"{what}: ${{{key[:60]}}} is not a template it may use ({allowed}"
                             f"{', ${pvc.annotations[KEY]}' if annotations is not None else ''})")

    return _TEMPLATE.sub(one, template)


def resolve(op: str, templates: tuple[str, str], pvc: dict, pv_name: str) -> dict[str, str]:
    """{name, namespace} of the `op` secret for this claim and volume, checked as names."""
    meta = pvc["metadata"]
    names = {"pv.name": pv_name, "pvc.name": meta["name"], "pvc.namespace": meta["namespace"]}
    annotations = None if op == "provisioner" else (meta.get("annotations") or {})
    where = f"storageclass parameter {PREFIX}{op}-secret"
    name = _resolve(templates[0], where + "-name", names, annotations)
    namespace = _resolve(templates[1], where + "-namespace",
                         {"pv.name": pv_name, "pvc.namespace": meta["namespace"]}, None)
    try:
        check_name(name, namespace)
    except ValueError as exc:
        raise SecretRefError(f"{where}-name/-namespace resolve to no Secret name: {exc}") from None
    return {"name": name, "namespace": namespace}


def secret_data(store: ObjectStore, name: str, namespace: str, what: str = "secret") -> dict[str, str]:
    """A Secret's data (decoded) and stringData; SecretRefError names a missing one."""
    obj = store.get("Secret", name, namespace)
    if obj is None:
        raise SecretRefError(f"{what} {namespace}/{name} not found")
    try:
        data = {k: base64.b64decode(v).decode() for k, v in (obj.get("data") or {}).items()}
    except (binascii.Error, UnicodeDecodeError):
        raise SecretRefError(f"{what} {namespace}/{name} has a value that is not base64 of UTF-8 text") from None
    data.update(obj.get("stringData") or {})
    return data


def referenced(store: ObjectStore, ref: Mapping[str, str] | None, what: str) -> dict[str, str]:
    """The data of the Secret a PersistentVolume's `spec.csi.*SecretRef` names ({} for none)."""
    if not ref:
        return {}
    return secret_data(store, str(ref.get("name", "")), str(ref.get("namespace", "")), what)
