"""deploy/: `kubectl kustomize` renders both overlays (deploy/csi, deploy/full); every object in
them is one the Kubernetes API takes (each built-in kind deserialized into the kubernetes
client's model and serialized back unchanged, so a misspelt field or a wrong type fails; the
snapshot class against the external-snapshotter's fields); every pvlun command line parses with
our CLI; the RBAC grants what the parts need and no more; the image builds from what the
Containerfile copies; and the three defects a real cluster showed stay fixed."""

from __future__ import annotations

import functools
import json
import re
import shlex
import sys
import zipfile
from pathlib import Path

import kubernetes.client
import pytest
import yaml
from deploy_schema import object_errors

from controlplane.admission import Refused, load_documents
from csi import DRIVER_NAME, __version__
from host.command import output, run
from pvlun.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
OVERLAYS = ("csi", "full")
NAMESPACE = "pvlun-system"
IMAGE = f"localhost/pvlun:{__version__}"
# The built-in kinds deploy/ may hold, each in the one apiVersion the kubernetes client models.
BUILT_IN = {
    "Namespace": "v1", "ServiceAccount": "v1",
    "Deployment": "apps/v1", "StatefulSet": "apps/v1", "DaemonSet": "apps/v1",
    "ClusterRole": "rbac.authorization.k8s.io/v1", "ClusterRoleBinding": "rbac.authorization.k8s.io/v1",
    "Role": "rbac.authorization.k8s.io/v1", "RoleBinding": "rbac.authorization.k8s.io/v1",
    "StorageClass": "storage.k8s.io/v1", "CSIDriver": "storage.k8s.io/v1", "VolumeAttributesClass": "storage.k8s.io/v1",
    "CustomResourceDefinition": "apiextensions.k8s.io/v1",
}
# The external-snapshotter's VolumeSnapshotClass (its CRD, not ours: deploy/ does not ship it).
SNAPSHOT_CLASS = {"type": "object", "required": ["driver", "deletionPolicy"], "properties": {
    "apiVersion": {"type": "string", "enum": ["snapshot.storage.k8s.io/v1"]}, "kind": {"type": "string"},
    "metadata": {"type": "object"}, "driver": {"type": "string"},
    "deletionPolicy": {"type": "string", "enum": ["Delete", "Retain"]},
    "parameters": {"type": "object", "additionalProperties": {"type": "string"}}}}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "StorageClass", "CSIDriver",
                  "VolumeAttributesClass", "VolumeSnapshotClass", "CustomResourceDefinition"}


@functools.cache
def rendered(overlay: str) -> tuple[dict, ...]:
    """What `kubectl apply -k deploy/<overlay>` sends, as kustomize renders it."""
    text = output(["kubectl", "kustomize", str(DEPLOY / overlay)], timeout=120)
    return tuple(d for d in yaml.safe_load_all(text) if d)


def find(overlay: str, kind: str, name: str) -> dict:
    return next(d for d in rendered(overlay) if d["kind"] == kind and d["metadata"]["name"] == name)


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def pvlun_containers(overlay: str) -> list[tuple[dict, dict]]:
    return [(d, c) for d in rendered(overlay) if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet")
            for c in pod_spec(d)["containers"] if c["name"] == "pvlun"]


# ---------------------------------------------------------------- rendering and the API's models

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kubectl_kustomize_renders_each_overlay_with_namespaces_where_they_belong(overlay):
    docs = rendered(overlay)
    keys = [(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]) for d in docs]
    assert len(keys) == len(set(keys)), "an object is rendered twice"
    for kind, namespace, name in keys:
        assert namespace == (None if kind in CLUSTER_SCOPED else NAMESPACE), (kind, name)


def round_trip(doc: dict) -> dict:
    """The object as the kubernetes client's model of its kind reads and writes it: a field the
    model does not know is dropped, so it differs from what went in."""
    client = kubernetes.client.ApiClient()
    version = doc["apiVersion"].rsplit("/", 1)[-1]
    model = client.deserialize(json.dumps(doc), version[0].upper() + version[1:] + doc["kind"], "application/json")
    return client.sanitize_for_serialization(model)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_is_one_the_kubernetes_api_takes(overlay):
    for doc in rendered(overlay):
        kind, name = doc["kind"], doc["metadata"]["name"]
        if kind == "VolumeSnapshotClass":
            assert object_errors(doc, SNAPSHOT_CLASS) == [], name
            continue
        assert kind in BUILT_IN, f"{kind} {name}: not a kind this test knows how to check"
        assert doc["apiVersion"] == BUILT_IN[kind], f"{kind} {name}"
        assert round_trip(doc) == doc, f"{kind} {name} has a field its model does not know (or a wrong type)"


def test_the_model_check_catches_a_misspelt_field():
    stateful_set = json.loads(json.dumps(find("csi", "StatefulSet", "pvlun-csi-controller")))
    pod_spec(stateful_set)["serviceAcountName"] = "typo"
    assert round_trip(stateful_set) != stateful_set


def test_full_is_csi_plus_the_control_plane():
    csi = {json.dumps(d, sort_keys=True) for d in rendered("csi")}
    full = {json.dumps(d, sort_keys=True) for d in rendered("full")}
    assert csi < full
    added = sorted((d["kind"], d["metadata"]["name"]) for d in map(json.loads, full - csi))
    assert added == sorted([("ClusterRole", "pvlun-controller"), ("ClusterRoleBinding", "pvlun-controller"),
                            ("Deployment", "pvlun-controller"), ("Role", "pvlun-controller"),
                            ("RoleBinding", "pvlun-controller"), ("ServiceAccount", "pvlun-controller"),
                            ("CustomResourceDefinition", "datavolumes.cdi.kubevirt.io"),
                            ("CustomResourceDefinition", "datasources.cdi.kubevirt.io"),
                            ("CustomResourceDefinition", "dataimportcrons.cdi.kubevirt.io"),
                            ("CustomResourceDefinition", "storageprofiles.cdi.kubevirt.io"),
                            ("CustomResourceDefinition", "virtualmachines.kubevirt.io"),
                            ("CustomResourceDefinition", "virtualmachineinstances.kubevirt.io"),
                            ("CustomResourceDefinition", "virtualmachineinstancemigrations.kubevirt.io"),
                            ("CustomResourceDefinition", "virtualmachineinstancereplicasets.kubevirt.io"),
                            ("CustomResourceDefinition", "virtualmachinepools.pool.kubevirt.io"),
                            ("CustomResourceDefinition", "virtualmachinesnapshots.snapshot.kubevirt.io"),
                            ("CustomResourceDefinition", "virtualmachinesnapshotcontents.snapshot.kubevirt.io"),
                            ("CustomResourceDefinition", "virtualmachinerestores.snapshot.kubevirt.io"),
                            ("CustomResourceDefinition", "virtualmachineexports.export.kubevirt.io"),
                            ("CustomResourceDefinition", "virtualmachineinstancetypes.instancetype.kubevirt.io"),
                            ("CustomResourceDefinition", "virtualmachineclusterinstancetypes.instancetype.kubevirt.io"),
                            ("CustomResourceDefinition", "virtualmachinepreferences.instancetype.kubevirt.io"),
                            ("CustomResourceDefinition", "virtualmachineclusterpreferences.instancetype.kubevirt.io")])


def test_there_is_no_root_kustomization_to_apply_by_mistake():
    """deploy/full's CRDs would replace CDI's and KubeVirt's: the overlay is always chosen by name."""
    assert not (DEPLOY / "kustomization.yaml").exists()


# ---------------------------------------------------------------- the driver

def test_every_manifest_names_our_driver():
    docs = rendered("csi")
    assert find("csi", "CSIDriver", DRIVER_NAME)["spec"]["attachRequired"] is True
    for doc in docs:
        if doc["kind"] == "StorageClass":
            assert doc["provisioner"] == DRIVER_NAME
        if doc["kind"] in ("VolumeSnapshotClass", "VolumeAttributesClass"):
            assert doc.get("driver", doc.get("driverName")) == DRIVER_NAME


def test_registrar_registers_the_socket_the_node_plugin_serves():
    node = pod_spec(find("csi", "DaemonSet", "pvlun-csi-node"))
    registrar = next(c for c in node["containers"] if c["name"] == "node-driver-registrar")
    path = next(a for a in registrar["args"] if a.startswith("--kubelet-registration-path=")).split("=", 1)[1]
    socket_dir = next(v for v in node["volumes"] if v["name"] == "socket-dir")
    assert Path(path).parent == Path(socket_dir["hostPath"]["path"])
    assert DRIVER_NAME in path


def test_csi_pods_report_the_hosts_name_and_the_controller_stays_on_the_pool():
    """Volumes are reachable from the host holding the pool (topology.csi.pvlun.dev/host, the
    name gethostname() gives): the controller and the node plugins see the host's name only on
    the host's network; the controller, holding the pool, is pinned to the labelled node."""
    controller = pod_spec(find("csi", "StatefulSet", "pvlun-csi-controller"))
    node = pod_spec(find("csi", "DaemonSet", "pvlun-csi-node"))
    assert controller["hostNetwork"] is True and node["hostNetwork"] is True
    assert controller["nodeSelector"] == {"pvlun.dev/pool": "true"}
    assert "kubectl label node" in (ROOT / "README.md").read_text() and "pvlun.dev/pool=true" in (
        ROOT / "README.md").read_text()


def test_provisioner_capacity_owner_level_matches_its_workload():
    """--capacity-ownerref-level counts from the pod: 1 reaches a StatefulSet, 2 a Deployment
    (through its ReplicaSet); a level past the top owner makes csi-provisioner exit."""
    levels = {"StatefulSet": "1", "Deployment": "2"}
    found = 0
    for overlay in OVERLAYS:
        for doc in rendered(overlay):
            if doc["kind"] not in levels:
                continue
            for container in pod_spec(doc)["containers"]:
                args = dict(a.split("=", 1) for a in container.get("args", []) if a.startswith("--capacity-"))
                if "--capacity-ownerref-level" in args:
                    found += 1
                    assert args["--capacity-ownerref-level"] == levels[doc["kind"]], doc["metadata"]["name"]
    assert found == 2  # the provisioner, in each overlay


def test_group_snapshot_rbac_names_the_groupsnapshot_api_group():
    rules = find("csi", "ClusterRole", "pvlun-csi-controller")["rules"]
    granted = {(g, r): set(rule["verbs"]) for rule in rules for g in rule["apiGroups"] for r in rule["resources"]}
    group = "groupsnapshot.storage.k8s.io"
    assert granted[(group, "volumegroupsnapshotclasses")] >= {"get", "list", "watch"}
    assert granted[(group, "volumegroupsnapshotcontents")] >= {"get", "list", "watch", "update", "patch"}
    assert granted[(group, "volumegroupsnapshotcontents/status")] >= {"update", "patch"}
    assert not [r for (g, r) in granted if "group" in r and g != group]


def test_no_storage_v1beta1_in_manifests_or_readme():
    """A VolumeAttributesClass is storage.k8s.io/v1 (GA in Kubernetes 1.34; v1beta1 was never on by default)."""
    texts = [p.read_text() for p in DEPLOY.rglob("*.yaml")] + [(ROOT / "README.md").read_text()]
    texts += [yaml.safe_dump_all(rendered(o)) for o in OVERLAYS]
    assert not [t for t in texts if "storage.k8s.io/v1beta1" in t]
    assert find("csi", "VolumeAttributesClass", "pvlun-limited")["apiVersion"] == "storage.k8s.io/v1"


def test_the_classes_deploy_ships_apply_in_embedded_mode_too():
    docs = load_documents((DEPLOY / "csi" / "storageclass.yaml").read_text())
    assert {(d["kind"], d["apiVersion"]) for d in docs} == {
        ("StorageClass", "storage.k8s.io/v1"), ("VolumeSnapshotClass", "snapshot.storage.k8s.io/v1"),
        ("VolumeAttributesClass", "storage.k8s.io/v1")}


def test_embedded_mode_keeps_taking_v1beta1_attributes_classes_and_refuses_unknown_versions():
    old = "apiVersion: storage.k8s.io/v1beta1\nkind: VolumeAttributesClass\nmetadata: {name: old}\ndriverName: x\n"
    assert load_documents(old)[0]["apiVersion"] == "storage.k8s.io/v1beta1"
    with pytest.raises(Refused, match="no matches for kind 'VolumeAttributesClass' in version 'storage.k8s.io/v1alpha1'"
                                      r".*storage.k8s.io/v1 or storage.k8s.io/v1beta1"):
        load_documents(old.replace("v1beta1", "v1alpha1"))
    with pytest.raises(Refused, match="apiVersion not set"):
        load_documents("kind: ConfigMap\nmetadata: {name: c}\n")


# ---------------------------------------------------------------- pvlun's own containers

def cli_argv(container: dict) -> list[str]:
    """The argv our CLI parses: a `sh -c "exec pvlun ..."` line without its shell."""
    if container.get("command") == ["sh", "-c"]:
        words = shlex.split(container["args"][0].replace('"$NODE_NAME"', "node-1"))
        assert words[:2] == ["exec", "pvlun"]
        return words[2:]
    return container["args"]


def test_every_pvlun_command_line_parses_with_our_cli():
    seen = []
    for workload, container in pvlun_containers("full"):
        argv = cli_argv(container)
        try:
            args = build_parser().parse_args(argv)
        except SystemExit:
            pytest.fail(f"{workload['metadata']['name']}: `pvlun {' '.join(argv)}` does not parse with pvlun's CLI",
                        pytrace=False)
        seen.append((args.command, getattr(args, "mode", None)))
        if args.command == "serve":
            assert args.endpoint == "unix:///csi/csi.sock"
    assert sorted(seen, key=str) == sorted([("serve", "controller"), ("serve", "node"), ("controller", None)], key=str)


def test_every_pvlun_container_runs_this_versions_image():
    containers = [c for o in OVERLAYS for _w, c in pvlun_containers(o)]
    assert len(containers) == 5 and {c["image"] for c in containers} == {IMAGE}
    assert f"-t {IMAGE} " in (DEPLOY / "Containerfile").read_text()


def test_the_controller_needs_no_host_and_is_probed_where_it_listens():
    deployment = find("full", "Deployment", "pvlun-controller")
    spec = pod_spec(deployment)
    assert deployment["spec"]["replicas"] >= 1
    assert spec["serviceAccountName"] == "pvlun-controller"
    assert not [v for v in spec.get("volumes", []) if "hostPath" in v]
    assert not spec.get("hostNetwork") and spec["securityContext"]["runAsNonRoot"] is True
    (container,) = spec["containers"]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    args = container["args"]
    assert args[0] == "controller" and "--leader-elect" in args
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert args[args.index("--health-address") + 1] == f":{ports['health']}"
    assert args[args.index("--metrics-address") + 1] == f":{ports['metrics']}"
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
    env = {e["name"]: e for e in container["env"]}
    assert env["PVLUN_IMAGE"]["value"] == container["image"]
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"


def test_an_image_set_in_full_is_the_one_the_controller_hands_its_pods(tmp_path):
    """README's way to run another image: an `images:` entry in deploy/full/kustomization.yaml
    renames every pvlun container, and PVLUN_IMAGE (the importer and launcher Pods' image)
    follows the controller's own."""
    copy = tmp_path / "deploy"
    run(["cp", "-r", str(DEPLOY), str(copy)])
    kustomization = copy / "full" / "kustomization.yaml"
    kustomization.write_text(kustomization.read_text() + "images:\n  - {name: localhost/pvlun, "
                             "newName: registry.example/pvlun, newTag: '9'}\n")
    docs = [d for d in yaml.safe_load_all(output(["kubectl", "kustomize", str(copy / "full")], timeout=120)) if d]
    images = {c["image"] for d in docs if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet")
              for c in pod_spec(d)["containers"] if c["name"] == "pvlun"}
    assert images == {"registry.example/pvlun:9"}
    controller = next(d for d in docs if d["kind"] == "Deployment")
    env = {e["name"]: e.get("value") for e in pod_spec(controller)["containers"][0]["env"]}
    assert env["PVLUN_IMAGE"] == "registry.example/pvlun:9"


# ---------------------------------------------------------------- RBAC

def rules_of(overlay: str, kind: str, name: str) -> dict[tuple[str, str], set[str]]:
    rules = find(overlay, kind, name)["rules"]
    out: dict[tuple[str, str], set[str]] = {}
    for rule in rules:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.setdefault((group, resource), set()).update(rule["verbs"])
    return out


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rbac_has_no_wildcards_and_binds_only_pvluns_service_accounts(overlay):
    docs = rendered(overlay)
    roles = {(d["kind"], d["metadata"]["name"]) for d in docs if d["kind"] in ("Role", "ClusterRole")}
    for doc in docs:
        for rule in doc.get("rules", []):
            assert "*" not in rule["apiGroups"] + rule["resources"] + rule["verbs"], doc["metadata"]["name"]
        if doc["kind"] in ("RoleBinding", "ClusterRoleBinding"):
            assert (doc["roleRef"]["kind"], doc["roleRef"]["name"]) in roles
            assert doc["subjects"] == [{"kind": "ServiceAccount", "name": doc["roleRef"]["name"],
                                        "namespace": NAMESPACE}]
    node_account = find(overlay, "ServiceAccount", "pvlun-csi-node")
    assert node_account["automountServiceAccountToken"] is False
    assert pod_spec(find(overlay, "DaemonSet", "pvlun-csi-node"))["automountServiceAccountToken"] is False


READ, WRITE = {"get", "list", "watch"}, {"get", "list", "watch", "create", "update", "patch", "delete"}
STATUS = {"get", "update", "patch"}
CONTROLLER_RIGHTS = {  # exactly what `pvlun controller` may do, cluster-wide
    ("cdi.kubevirt.io", "datavolumes"): WRITE,
    ("cdi.kubevirt.io", "datavolumes/status"): STATUS,
    ("cdi.kubevirt.io", "datavolumes/finalizers"): {"update"},
    # golden images: the DataSources a DataImportCron manages, a StorageProfile per StorageClass
    ("cdi.kubevirt.io", "datasources"): READ | {"create", "update", "patch"},
    ("cdi.kubevirt.io", "storageprofiles"): READ | {"create", "update", "patch"},
    ("cdi.kubevirt.io", "dataimportcrons"): READ | {"update", "patch"},
    ("cdi.kubevirt.io", "datasources/status"): STATUS,
    ("cdi.kubevirt.io", "dataimportcrons/status"): STATUS,
    ("cdi.kubevirt.io", "storageprofiles/status"): STATUS,
    ("cdi.kubevirt.io", "dataimportcrons/finalizers"): {"update"},
    ("kubevirt.io", "virtualmachineinstances"): WRITE,
    ("kubevirt.io", "virtualmachines"): WRITE,  # a VirtualMachinePool's VMs it makes and removes
    ("kubevirt.io", "virtualmachineinstancemigrations"): READ | {"update", "patch"},
    ("kubevirt.io", "virtualmachines/status"): STATUS,
    ("kubevirt.io", "virtualmachineinstances/status"): STATUS,
    ("kubevirt.io", "virtualmachineinstancemigrations/status"): STATUS,
    ("kubevirt.io", "virtualmachines/finalizers"): {"update"},
    ("kubevirt.io", "virtualmachineinstances/finalizers"): {"update"},
    ("", "persistentvolumeclaims"): WRITE,
    ("", "persistentvolumeclaims/finalizers"): {"update"},  # importer Pods' blockOwnerDeletion
    ("", "pods"): WRITE,
    ("", "services"): WRITE,
    ("", "pods/exec"): {"get", "create"},
    ("", "secrets"): {"create", "delete"},  # a migration's token: made and deleted, never read
    ("", "persistentvolumes"): READ,
    ("", "nodes"): READ,
    ("storage.k8s.io", "storageclasses"): READ,
    ("storage.k8s.io", "volumeattributesclasses"): READ,
    ("snapshot.storage.k8s.io", "volumesnapshots"): READ | {"create", "delete"},  # the snapshot clone strategy's
    ("snapshot.storage.k8s.io", "volumesnapshotclasses"): READ,
    ("events.k8s.io", "events"): READ | {"create", "update", "patch"},
    ("instancetype.kubevirt.io", "virtualmachineinstancetypes"): READ,
    ("instancetype.kubevirt.io", "virtualmachineclusterinstancetypes"): READ,
    ("instancetype.kubevirt.io", "virtualmachinepreferences"): READ,
    ("instancetype.kubevirt.io", "virtualmachineclusterpreferences"): READ,
    # a VM's copies of its instancetype and preference; a pool's templates (unused ones pruned)
    ("apps", "controllerrevisions"): READ | {"create", "delete"},
    # VirtualMachinePools and VirtualMachineInstanceReplicaSets: their status, and their VMs' and VMIs' owner refs
    ("pool.kubevirt.io", "virtualmachinepools"): READ | {"update", "patch"},
    ("pool.kubevirt.io", "virtualmachinepools/status"): STATUS,
    ("pool.kubevirt.io", "virtualmachinepools/finalizers"): {"update"},
    ("kubevirt.io", "virtualmachineinstancereplicasets"): READ | {"update", "patch"},
    ("kubevirt.io", "virtualmachineinstancereplicasets/status"): STATUS,
    ("kubevirt.io", "virtualmachineinstancereplicasets/finalizers"): {"update"},
    # VM snapshots and restores (virt/vm_snapshot_cluster.py): a snapshot's content made, and
    # snapshots and contents deleted (the DELETE after their last finalizer goes)
    ("snapshot.kubevirt.io", "virtualmachinesnapshots"): READ | {"update", "patch", "delete"},
    ("snapshot.kubevirt.io", "virtualmachinesnapshotcontents"): READ | {"create", "update", "patch", "delete"},
    ("snapshot.kubevirt.io", "virtualmachinerestores"): READ | {"update", "patch"},
    **{("snapshot.kubevirt.io", f"{kind}/status"): STATUS
       for kind in ("virtualmachinesnapshots", "virtualmachinesnapshotcontents", "virtualmachinerestores")},
    ("export.kubevirt.io", "virtualmachineexports"): READ | {"delete"},  # deleted once their TTL ran out
    ("export.kubevirt.io", "virtualmachineexports/status"): STATUS,
    ("export.kubevirt.io", "virtualmachineexports/finalizers"): {"update"},  # its exporter Pod's blockOwnerDeletion
}


def test_the_controller_may_do_exactly_what_it_manages():
    assert rules_of("full", "ClusterRole", "pvlun-controller") == CONTROLLER_RIGHTS
    lease = rules_of("full", "Role", "pvlun-controller")
    assert lease == {("coordination.k8s.io", "leases"): READ | {"create", "update", "patch"}}
    assert not [r for r in CONTROLLER_RIGHTS if r[1] in ("configmaps", "serviceaccounts")]
    # Secrets: only the migration tokens it makes and deletes (virt/migration_pods.py) — reading one
    # (get, list, watch) would let it read every Secret of every namespace
    assert CONTROLLER_RIGHTS[("", "secrets")] == {"create", "delete"}


def test_the_csi_sidecars_keep_leases_and_capacities_in_their_namespace():
    assert set(rules_of("csi", "Role", "pvlun-csi-controller")) == {
        ("coordination.k8s.io", "leases"), ("storage.k8s.io", "csistoragecapacities")}
    cluster = rules_of("csi", "ClusterRole", "pvlun-csi-controller")
    assert ("coordination.k8s.io", "leases") not in cluster and ("storage.k8s.io", "csistoragecapacities") not in cluster
    assert ("", "pods") in cluster  # the provisioner reads its pod to find the capacities' owner


# ---------------------------------------------------------------- the image

def containerfile_stages() -> list[str]:
    return re.split(r"^FROM ", (DEPLOY / "Containerfile").read_text(), flags=re.M)[1:]


def apt_packages(stage: str) -> set[str]:
    line = re.search(r"apt-get install -y --no-install-recommends(.*?)&&", stage, re.S).group(1)
    return set(line.replace("\\", " ").split())


def test_containerfile_builds_the_wheel_then_installs_it_with_the_runtimes_debian_packages():
    build, runtime = containerfile_stages()
    assert build.startswith("debian:12-slim AS ") and runtime.startswith("debian:12-slim\n")
    makefile = (ROOT / "Makefile").read_text()
    deb = set(re.search(r"^DEB_PACKAGES := (.*?)\n[A-Z]", makefile, re.S | re.M).group(1).replace("\\", " ").split())
    base = {"python3", "python3-venv", "ca-certificates"}
    assert apt_packages(runtime) - base <= deb, "the image installs what `make test` never ran with"
    assert {"qemu-utils", "qemu-system-x86", "qemu-block-extra", "nbdkit", "bubblewrap", "passt", "xfsprogs",
            "e2fsprogs", "util-linux", "ovmf", "genisoimage"} <= apt_packages(runtime)
    assert "pip wheel" in build and "--no-index --find-links /wheels pvlun" in runtime
    assert runtime.rstrip().endswith('ENTRYPOINT ["pvlun"]')


def copied_paths() -> list[str]:
    build = containerfile_stages()[0]
    return [m.group(1) for m in re.finditer(r"^COPY (\S+) ", build, re.M)]


def test_the_wheel_built_from_what_the_containerfile_copies_holds_every_package(tmp_path):
    """What the image's first stage runs, without the network: the copied tree alone makes a
    wheel holding every package pyproject.toml names and the `pvlun` command."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    packages = re.findall(r'"(\w+)\*"', re.search(r"^include = \[(.*?)\]", pyproject, re.M).group(1))
    copied = copied_paths()
    assert sorted(copied) == sorted(["pyproject.toml", *packages])
    src = tmp_path / "src"
    src.mkdir()
    for path in copied:
        run(["cp", "-r", str(ROOT / path), str(src / path)])
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
         "--wheel-dir", str(tmp_path / "wheels"), str(src)], timeout=300)
    (wheel,) = (tmp_path / "wheels").glob("pvlun-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert all(f"{p}/__init__.py" in names for p in packages)
    assert "csi/proto/csi_pb2.py" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "pvlun = pvlun.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
