"""The manifests in deploy/ are what `kubectl apply -k deploy/` installs: each parses, the
kustomization lists files that exist, and every pvlun command line in them is one our
own CLI accepts (so a renamed flag cannot silently break a deployment)."""

from __future__ import annotations

import os
import shlex

import yaml

from pvlun import DRIVER_NAME
from pvlun.cli import build_parser

DEPLOY = os.path.join(os.path.dirname(__file__), "..", "deploy")


def documents() -> list[dict]:
    kustomization = yaml.safe_load(open(os.path.join(DEPLOY, "kustomization.yaml")))
    docs = []
    for resource in kustomization["resources"]:
        path = os.path.join(DEPLOY, resource)
        assert os.path.isfile(path), f"kustomization lists missing {resource}"
        docs += [d for d in yaml.safe_load_all(open(path)) if d]
    return docs


def pvlun_containers() -> list[dict]:
    out = []
    for doc in documents():
        spec = doc.get("spec", {}).get("template", {}).get("spec", {})
        out += [c for c in spec.get("containers", []) if c.get("image") == "pvlun"]
    return out


def test_every_manifest_parses_and_names_our_driver():
    docs = documents()
    kinds = {d["kind"] for d in docs}
    assert {"CSIDriver", "StatefulSet", "DaemonSet", "StorageClass", "VolumeSnapshotClass"} <= kinds
    assert next(d for d in docs if d["kind"] == "CSIDriver")["metadata"]["name"] == DRIVER_NAME
    for doc in docs:
        if doc["kind"] == "StorageClass":
            assert doc["provisioner"] == DRIVER_NAME
        if doc["kind"] == "VolumeSnapshotClass":
            assert doc["driver"] == DRIVER_NAME


def test_every_pvlun_command_line_in_the_manifests_parses_with_our_cli():
    containers = pvlun_containers()
    assert len(containers) == 2  # controller and node
    modes = set()
    for container in containers:
        argv = container["args"]
        if container.get("command") == ["sh", "-c"]:
            argv = shlex.split(argv[0].replace('"$NODE_NAME"', "node-1"))[2:]  # drop "exec pvlun"
        args = build_parser().parse_args(argv)
        assert args.command == "serve" and args.endpoint.startswith("unix:///csi/")
        modes.add(args.mode)
    assert modes == {"controller", "node"}


def test_registrar_registers_the_socket_the_node_plugin_serves():
    node = next(d for d in documents() if d["kind"] == "DaemonSet")
    registrar = next(c for c in node["spec"]["template"]["spec"]["containers"] if c["name"] == "node-driver-registrar")
    path = next(a for a in registrar["args"] if a.startswith("--kubelet-registration-path=")).split("=", 1)[1]
    socket_dir = next(v for v in node["spec"]["template"]["spec"]["volumes"] if v["name"] == "socket-dir")
    assert os.path.dirname(path) == socket_dir["hostPath"]["path"]
    assert DRIVER_NAME in path
