"""deploy/full's CRDs: what deploy/crds.py writes (committed, fresh), in CDI's and KubeVirt's
groups, versions, names and printer columns, with structural schemas that take the manifests
users copy from CDI's and KubeVirt's documentation (and pvlun's own) and refuse misspelt ones."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import yaml
from deploy_schema import crd_root_errors, object_errors, structural_errors, validation_errors

from controlplane import object_types
from virt.guest_images import tick_vm_manifest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("deploy_crds", ROOT / "deploy" / "crds.py")
crds = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(crds)


def committed(name: str) -> dict:
    return yaml.safe_load((crds.OUT_DIR / f"{name}.yaml").read_text())


def schema_of(kind: str, version: str = "") -> dict:
    crd = next(c for c in crds.CRDS.values() if c["spec"]["names"]["kind"] == kind)
    served = crd["spec"]["versions"]
    entry = next(v for v in served if v["name"] == version) if version else served[0]
    return entry["schema"]["openAPIV3Schema"]


@pytest.mark.parametrize("name", list(crds.CRDS))
def test_committed_crd_matches_the_generator(name):
    path = crds.OUT_DIR / f"{name}.yaml"
    assert path.exists(), f"{path.relative_to(ROOT)} is missing: run make crds"
    assert path.read_text() == crds.render(name), f"{path.relative_to(ROOT)} is stale: run make crds"


def test_full_overlay_lists_every_generated_crd():
    listed = yaml.safe_load((ROOT / "deploy" / "full" / "kustomization.yaml").read_text())["resources"]
    assert sorted(r for r in listed if r.startswith("crds/")) == sorted(f"crds/{n}.yaml" for n in crds.CRDS)


UPSTREAM = {  # group, kind, plural, short names, versions (stored first), printer columns (name, jsonPath)
    "DataVolume": ("cdi.kubevirt.io", "datavolumes", ["dv", "dvs"], ["v1beta1"],
                   [("Phase", ".status.phase"), ("Progress", ".status.progress"),
                    ("Restarts", ".status.restartCount"), ("Age", ".metadata.creationTimestamp")]),
    "VirtualMachine": ("kubevirt.io", "virtualmachines", ["vm", "vms"], ["v1", "v1alpha3"],
                       [("Age", ".metadata.creationTimestamp"), ("Status", ".status.printableStatus"),
                        ("Ready", ".status.conditions[?(@.type=='Ready')].status")]),
    "VirtualMachineInstance": ("kubevirt.io", "virtualmachineinstances", ["vmi", "vmis"], ["v1", "v1alpha3"],
                               [("Age", ".metadata.creationTimestamp"), ("Phase", ".status.phase"),
                                ("IP", ".status.interfaces[0].ipAddress"), ("NodeName", ".status.nodeName"),
                                ("Ready", ".status.conditions[?(@.type=='Ready')].status"),
                                ("Live-Migratable", ".status.conditions[?(@.type=='LiveMigratable')].status"),
                                ("Paused", ".status.conditions[?(@.type=='Paused')].status")]),
    "VirtualMachineInstanceMigration": ("kubevirt.io", "virtualmachineinstancemigrations", ["vmim", "vmims"],
                                        ["v1", "v1alpha3"], [("Phase", ".status.phase"), ("VMI", ".spec.vmiName")]),
}


@pytest.mark.parametrize("kind", list(UPSTREAM))
def test_crd_has_upstreams_names_versions_columns_and_a_status_subresource(kind):
    group, plural, short, versions, columns = UPSTREAM[kind]
    crd = committed(f"{plural}.{group}")
    spec = crd["spec"]
    assert (spec["group"], spec["scope"]) == (group, "Namespaced")
    assert spec["names"] == {"kind": kind, "listKind": f"{kind}List", "plural": plural, "singular": kind.lower(),
                             "shortNames": short, "categories": ["all"]}
    assert [v["name"] for v in spec["versions"]] == versions
    assert [v["storage"] for v in spec["versions"]] == [True] + [False] * (len(versions) - 1)
    for version in spec["versions"]:
        assert version["served"] is True and version["subresources"] == {"status": {}}
        assert [(c["name"], c["jsonPath"]) for c in version["additionalPrinterColumns"]] == columns
        assert version.get("deprecated", False) == (version["name"] == "v1alpha3")


@pytest.mark.parametrize("name", list(crds.CRDS))
def test_crd_schemas_are_structural(name):
    for version in committed(name)["spec"]["versions"]:
        assert crd_root_errors(version["schema"]["openAPIV3Schema"]) == [], version["name"]


def test_structural_checker_finds_what_apiextensions_refuses():
    bad = {"type": "object", "properties": {
        "untyped": {"description": "no type"},
        "both": {"type": "object", "properties": {"a": {"type": "string"}}, "additionalProperties": {"type": "string"}},
        "list": {"type": "array"},
        "junctor": {"type": "string", "anyOf": [{"type": "string"}]},
        "typo": {"type": "string", "requried": ["x"]},
        "closed": {"type": "object", "x-kubernetes-preserve-unknown-fields": False},
        "missing": {"type": "object", "required": ["gone"]},
    }}
    errors = "\n".join(structural_errors(bad))
    for field in ("untyped", "both", "list", "junctor", "typo", "closed", "missing"):
        assert f".{field}:" in errors, field


def test_every_kubevirt_version_serves_the_same_schema():
    for crd in crds.CRDS.values():
        schemas = [v["schema"] for v in crd["spec"]["versions"]]
        assert all(s == schemas[0] for s in schemas)


def test_a_vm_template_is_a_vmi_spec_and_a_data_volume_template_a_data_volume_spec():
    vm = schema_of("VirtualMachine")["properties"]["spec"]["properties"]
    assert vm["template"]["properties"]["spec"] == schema_of("VirtualMachineInstance")["properties"]["spec"]
    assert vm["dataVolumeTemplates"]["items"]["properties"]["spec"] == schema_of("DataVolume")["properties"]["spec"]


def _field_paths(kind: object_types.Type, schema: dict, path: str) -> list[str]:
    """Fields embedded mode's admission types (object_types) that the CRD schema lacks."""
    if isinstance(kind, object_types.ListOf):
        return _field_paths(kind.item, schema.get("items", {}), f"{path}[]")
    if not isinstance(kind, object_types.Fields) or schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    missing = []
    for name, sub in kind.fields.items():
        if name in schema.get("properties", {}):
            missing += _field_paths(sub, schema["properties"][name], f"{path}.{name}")
        else:
            missing.append(f"{path}.{name}")
    return missing


# Kubernetes' own claim type has no dataSource.namespace (a cross-namespace source is a
# dataSourceRef); embedded mode's claim type shares one reference type between the two.
NOT_UPSTREAM = (".dataSource.namespace",)


@pytest.mark.parametrize("kind", ["DataVolume", "VirtualMachine", "VirtualMachineInstanceMigration"])
def test_every_field_embedded_mode_reads_is_in_the_crd(kind):
    """A field `pvlun apply` takes must survive a real API server (which prunes what the schema lacks)."""
    missing = _field_paths(object_types.SPECS[kind], schema_of(kind), kind)
    assert [m for m in missing if not m.endswith(NOT_UPSTREAM)] == []


# ---------------------------------------------------------------- what users apply

def docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


# CDI's documentation's DataVolumes: http import, registry import, upload, clone, blank, snapshot.
CDI_DATA_VOLUMES = """
apiVersion: cdi.kubevirt.io/v1beta1
kind: DataVolume
metadata:
  name: fedora
spec:
  source:
    http:
      url: "https://download.fedoraproject.org/pub/fedora/linux/releases/40/Cloud/x86_64/images/Fedora-Cloud-Base-Generic.x86_64-40-1.14.qcow2"
      certConfigMap: fedora-ca
      secretRef: endpoint-secret
      extraHeaders: ["X-Forwarded-For: 10.0.0.1"]
  storage:
    resources:
      requests:
        storage: 5Gi
---
apiVersion: cdi.kubevirt.io/v1beta1
kind: DataVolume
metadata:
  name: registry-image-datavolume
spec:
  source:
    registry:
      url: "docker://quay.io/containerdisks/fedora:latest"
      pullMethod: pod
  pvc:
    accessModes:
      - ReadWriteOnce
    resources:
      requests:
        storage: 5Gi
---
apiVersion: cdi.kubevirt.io/v1beta1
kind: DataVolume
metadata:
  name: upload-datavolume
spec:
  source:
    upload: {}
  storage:
    volumeMode: Block
    accessModes: [ReadWriteMany]
    resources:
      requests:
        storage: 10Gi
---
apiVersion: cdi.kubevirt.io/v1beta1
kind: DataVolume
metadata:
  name: cloned-datavolume
  namespace: target-ns
spec:
  source:
    pvc:
      namespace: source-ns
      name: source-pvc
  storage: {}
---
apiVersion: cdi.kubevirt.io/v1beta1
kind: DataVolume
metadata:
  name: blank-image-datavolume
spec:
  source:
    blank: {}
  pvc:
    storageClassName: pvlun
    accessModes: [ReadWriteOnce]
    resources:
      requests:
        storage: 500Mi
---
apiVersion: cdi.kubevirt.io/v1beta1
kind: DataVolume
metadata:
  name: restored
spec:
  source:
    snapshot:
      namespace: golden-ns
      name: golden-snap
  contentType: kubevirt
  storage:
    storageClassName: pvlun
---
apiVersion: cdi.kubevirt.io/v1beta1
kind: DataVolume
metadata:
  name: s3-archive
spec:
  contentType: archive
  source:
    s3:
      url: "https://s3.example.com/bucket/disk.tar"
      secretRef: s3-credentials
  storage:
    resources:
      requests:
        storage: 1Gi
"""

# KubeVirt's documentation's VirtualMachine with a DataVolume template (creationTimestamp: null
# as `virtctl create vm` writes it), a containerDisk VM with cloud-init, a VMI and a migration.
KUBEVIRT_OBJECTS = """
apiVersion: kubevirt.io/v1
kind: VirtualMachine
metadata:
  labels:
    kubevirt.io/vm: vm-fedora-datavolume
  name: vm-fedora-datavolume
spec:
  dataVolumeTemplates:
  - metadata:
      creationTimestamp: null
      name: fedora-dv
    spec:
      pvc:
        accessModes:
        - ReadWriteOnce
        resources:
          requests:
            storage: 10Gi
        storageClassName: local
      source:
        http:
          url: https://download.fedoraproject.org/pub/fedora/linux/releases/40/Cloud/x86_64/images/disk.qcow2
  runStrategy: Always
  template:
    metadata:
      creationTimestamp: null
      labels:
        kubevirt.io/vm: vm-fedora-datavolume
    spec:
      domain:
        devices:
          disks:
          - disk:
              bus: virtio
            name: datavolumedisk1
        machine:
          type: ""
        resources:
          requests:
            memory: 1Gi
      terminationGracePeriodSeconds: 60
      volumes:
      - dataVolume:
          name: fedora-dv
        name: datavolumedisk1
---
apiVersion: kubevirt.io/v1
kind: VirtualMachine
metadata:
  name: testvm
spec:
  running: false
  template:
    metadata:
      labels:
        kubevirt.io/size: small
        kubevirt.io/domain: testvm
    spec:
      domain:
        cpu:
          cores: 2
        devices:
          disks:
            - name: containerdisk
              disk:
                bus: virtio
            - name: cloudinitdisk
              disk:
                bus: virtio
          interfaces:
          - name: default
            masquerade: {}
            ports:
            - name: ssh
              port: 22
        resources:
          requests:
            memory: 64M
        features:
          acpi: {}
        firmware:
          bootloader:
            efi:
              secureBoot: false
      networks:
      - name: default
        pod: {}
      volumes:
        - name: containerdisk
          containerDisk:
            image: quay.io/kubevirt/cirros-container-disk-demo
        - name: cloudinitdisk
          cloudInitNoCloud:
            userDataBase64: SGkuXG4=
---
apiVersion: kubevirt.io/v1
kind: VirtualMachineInstance
metadata:
  name: testvmi-nocloud
spec:
  terminationGracePeriodSeconds: 30
  domain:
    resources:
      requests:
        memory: 1024M
    devices:
      disks:
      - name: emptydisk
        disk:
          bus: virtio
      - name: cloudinitdisk
        cdrom:
          bus: sata
  volumes:
  - name: emptydisk
    emptyDisk:
      capacity: "2Gi"
  - name: cloudinitdisk
    cloudInitNoCloud:
      userData: |-
        #cloud-config
        password: fedora
---
apiVersion: kubevirt.io/v1
kind: VirtualMachineInstanceMigration
metadata:
  name: migration-job
spec:
  vmiName: testvmi-nocloud
"""

EXAMPLES = docs(CDI_DATA_VOLUMES) + docs(KUBEVIRT_OBJECTS) + docs(tick_vm_manifest("tick", "http://10.0.0.1/tick.img"))


@pytest.mark.parametrize("obj", EXAMPLES, ids=lambda o: f"{o['kind']}-{o['metadata']['name']}")
def test_upstream_examples_validate_against_our_crds(obj):
    assert object_errors(obj, schema_of(obj["kind"])) == []


def test_a_v1alpha3_vm_validates_against_the_served_v1alpha3_schema():
    vm = copy.deepcopy(docs(KUBEVIRT_OBJECTS)[0])
    vm["apiVersion"] = "kubevirt.io/v1alpha3"
    assert object_errors(vm, schema_of("VirtualMachine", "v1alpha3")) == []


def _broken(name: str, path: tuple, value) -> dict:
    obj = copy.deepcopy(next(o for o in EXAMPLES if o["metadata"]["name"] == name))
    node = obj
    for key in path[:-1]:
        node = node[key]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return obj


MISTAKES = [  # (example, path, value, what the error names)
    ("fedora", ("spec", "sorce"), {"blank": {}}, "unknown field 'sorce'"),
    ("fedora", ("spec", "source", "http", "uri"), "https://x", "unknown field 'uri'"),
    ("fedora", ("spec", "source", "http", "url"), KeyError, "url is required"),
    ("fedora", ("spec", "storage", "accessModes"), "ReadWriteOnce", "must be of type array"),
    ("fedora", ("spec", "storage", "resources", "requests", "storage"), "5 gigs", "does not match"),
    ("fedora", ("spec", "contentType"), "iso", "is not one of"),
    ("vm-fedora-datavolume", ("spec", "runStrategy"), "Sometimes", "is not one of"),
    ("vm-fedora-datavolume", ("spec", "template", "spec", "volumes", 0, "dataVolume", "nmae"), "x",
     "unknown field 'nmae'"),
    ("vm-fedora-datavolume", ("spec", "template", "spec", "terminationGracePeriod"), 5, "unknown field"),
    ("vm-fedora-datavolume", ("spec", "dataVolumeTemplates", 0, "spec", "source", "http", "url"), 5,
     "must be of type string"),
    ("testvm", ("spec", "template", "spec", "domain", "cpu", "cores"), "two", "must be of type integer"),
    ("testvm", ("spec", "template", "spec", "networks", 0, "pdo"), {}, "unknown field 'pdo'"),
    ("testvmi-nocloud", ("spec", "volumes", 0, "emptyDisk"), {}, "capacity is required"),
    ("migration-job", ("spec", "vmi"), "x", "unknown field 'vmi'"),
]


@pytest.mark.parametrize("name,path,value,error", MISTAKES, ids=[".".join(map(str, m[1])) for m in MISTAKES])
def test_a_mistake_users_make_is_refused_naming_the_field(name, path, value, error):
    obj = _broken(name, path, value)
    errors = object_errors(obj, schema_of(obj["kind"]))
    assert any(error in e for e in errors), errors


# ---------------------------------------------------------------- what the controllers write

STATUSES = {  # what pvlun's reconcilers write (importer/reconcile.py, virt/reconcile.py, virt/runtime.py)
    "DataVolume": {"phase": "ImportInProgress", "progress": "45.10%", "restartCount": 1, "claimName": "fedora",
                   "observedGeneration": 1,
                   "conditions": [{"type": "Running", "status": "True", "reason": "Pending", "message": "",
                                   "lastTransitionTime": "2025-01-01T00:00:00Z",
                                   "lastHeartbeatTime": "2025-01-01T00:00:05Z"}]},
    "VirtualMachine": {"printableStatus": "Running", "ready": True, "created": True, "manualRunning": True,
                       "startRequestedAt": 1735689600.25,
                       "conditions": [{"type": "Ready", "status": "True", "reason": "Running", "message": ""}]},
    "VirtualMachineInstance": {"phase": "Running", "nodeName": "node-1", "reason": "", "paused": False,
                               "launcher": {"pid": 42, "hostPorts": {"ssh": 40022}},
                               "volumeStatus": [{"name": "root", "target": "vda"}],
                               "migrationState": {"sourceNode": "node-1", "targetNode": "node-2", "completed": True},
                               "conditions": [{"type": "Paused", "status": "False", "reason": "", "message": "",
                                               "lastTransitionTime": "2025-01-01T00:00:00Z"}]},
    "VirtualMachineInstanceMigration": {"phase": "Succeeded"},
}


@pytest.mark.parametrize("kind", list(STATUSES))
def test_the_status_our_controllers_write_validates(kind):
    schema = schema_of(kind)["properties"]["status"]
    assert validation_errors(STATUSES[kind], schema, "status") == []
    assert validation_errors({**STATUSES[kind], "conditions": "Ready"}, schema, "status") != []


# ---------------------------------------------------------------- CDI's golden images

GOLDEN = {  # kind: (plural, scope, short names, categories)
    "DataSource": ("datasources", "Namespaced", ["das"], ["all"]),
    "DataImportCron": ("dataimportcrons", "Namespaced", ["dic", "dics"], ["all"]),
    "StorageProfile": ("storageprofiles", "Cluster", None, None),
}
GOLDEN_MANIFESTS = """  # as CDI's doc/os-image-poll-and-update.md writes them, then a DataSource and a StorageProfile
apiVersion: cdi.kubevirt.io/v1beta1
kind: DataImportCron
metadata:
  name: fedora-image-import-cron
  namespace: golden-images
spec:
  template:
    spec:
      source:
        registry:
          url: "docker://quay.io/kubevirt/fedora-cloud-registry-disk-demo:latest"
          pullMethod: node
          certConfigMap: some-certs
      storage:
        resources:
          requests:
            storage: 5Gi
        storageClassName: hostpath-provisioner
  schedule: "30 1 * * 1"
  garbageCollect: Outdated
  importsToKeep: 2
  managedDataSource: fedora
---
apiVersion: cdi.kubevirt.io/v1beta1
kind: DataVolume
metadata:
  name: fedora-ref
  namespace: golden-images
spec:
  sourceRef:
      kind: DataSource
      name: fedora
  storage:
    resources:
      requests:
        storage: 5Gi
    storageClassName: hostpath-provisioner
---
apiVersion: cdi.kubevirt.io/v1beta1
kind: DataSource
metadata:
  name: fedora
  namespace: golden-images
spec:
  source:
    pvc:
      name: fedora-1a2b3c4d5e6f
      namespace: golden-images
---
apiVersion: cdi.kubevirt.io/v1beta1
kind: StorageProfile
metadata:
  name: pvlun
spec:
  claimPropertySets:
  - accessModes: [ReadWriteMany]
    volumeMode: Block
  cloneStrategy: csi-clone
"""


@pytest.mark.parametrize("kind", list(GOLDEN))
def test_golden_image_crds_have_cdis_names_and_scope(kind):
    plural, scope, short, categories = GOLDEN[kind]
    spec = committed(f"{plural}.cdi.kubevirt.io")["spec"]
    assert (spec["group"], spec["scope"], [v["name"] for v in spec["versions"]]) == ("cdi.kubevirt.io", scope, ["v1beta1"])
    assert (spec["names"].get("shortNames"), spec["names"].get("categories")) == (short, categories)
    assert spec["versions"][0]["subresources"] == {"status": {}}
    missing = _field_paths(object_types.SPECS[kind], schema_of(kind), kind)
    assert [m for m in missing if not m.endswith(NOT_UPSTREAM)] == []


def test_golden_image_manifests_as_cdi_documents_them_validate():
    for obj in docs(GOLDEN_MANIFESTS):
        assert object_errors(obj, schema_of(obj["kind"])) == [], obj["kind"]
    bad = docs(GOLDEN_MANIFESTS)[3]
    bad["spec"]["cloneStrategy"] = "teleport"
    assert object_errors(bad, schema_of("StorageProfile")) != []


INSTANCETYPE_KINDS = {  # kind: plural, short names, scope (KubeVirt's own CRDs for them)
    "VirtualMachineInstancetype": ("virtualmachineinstancetypes", ["vminstancetype", "vminstancetypes", "vmf", "vmfs"],
                                   "Namespaced"),
    "VirtualMachineClusterInstancetype": ("virtualmachineclusterinstancetypes",
                                          ["vmclusterinstancetype", "vmclusterinstancetypes", "vmcf", "vmcfs"],
                                          "Cluster"),
    "VirtualMachinePreference": ("virtualmachinepreferences", ["vmpref", "vmprefs", "vmp", "vmps"], "Namespaced"),
    "VirtualMachineClusterPreference": ("virtualmachineclusterpreferences", ["vmcp", "vmcps"], "Cluster"),
}


@pytest.mark.parametrize("kind", list(INSTANCETYPE_KINDS))
def test_instancetype_crds_have_kubevirts_names_scopes_and_versions(kind):
    plural, short, scope = INSTANCETYPE_KINDS[kind]
    spec = committed(f"{plural}.instancetype.kubevirt.io")["spec"]
    assert (spec["group"], spec["scope"], spec["names"]["kind"], spec["names"]["shortNames"]) == \
        ("instancetype.kubevirt.io", scope, kind, short)
    assert spec["names"].get("categories") == (["all"] if scope == "Namespaced" else None)
    assert [(v["name"], v["storage"], v.get("deprecated", False)) for v in spec["versions"]] == [
        ("v1beta1", True, False), ("v1alpha2", False, True), ("v1alpha1", False, True)]
    assert all("subresources" not in v for v in spec["versions"])  # no status: nothing writes one


def test_the_shipped_instancetypes_and_preferences_pass_the_crd_schemas():
    docs = list(yaml.safe_load_all((ROOT / "deploy" / "instancetypes" / "common.yaml").read_text()))
    assert len(docs) > 30
    for doc in docs:
        errors = object_errors(doc, schema_of(doc["kind"]))
        assert errors == [], (doc["metadata"]["name"], errors)
    bad = copy.deepcopy(next(d for d in docs if d["kind"] == "VirtualMachineClusterInstancetype"))
    del bad["spec"]["cpu"]["guest"]
    assert object_errors(bad, schema_of("VirtualMachineClusterInstancetype")) != []
