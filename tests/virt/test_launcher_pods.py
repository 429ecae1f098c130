"""Launcher Pod specs as pure functions of the VMI (virt/pods.py), compared whole; hostile VMIs."""

from __future__ import annotations

import copy
import json
import re

import kubernetes.client
import pytest

from controlplane.vm_spec import SpecError
from pvlun.cli import build_parser
from virt.pods import MAX_VMI_BYTES, launcher_pod, migration_target_pod

UID = "6f1a8a5e-1c47-4a3e-9a3b-0d6a1c2b3e4f"
IMAGE = "registry.example/pvlun:1.0"
BLOCK = {"spec": {"volumeMode": "Block", "accessModes": ["ReadWriteMany"]}}
FILESYSTEM = {"spec": {"volumeMode": "Filesystem"}}
SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def vmi(name: str = "tick", volumes: list | None = None, disks: list | None = None, uid: str = UID,
        **spec) -> dict:
    volumes = volumes if volumes is not None else [{"name": "root", "persistentVolumeClaim": {"claimName": "tick"}}]
    disks = disks if disks is not None else [{"name": v["name"], "disk": {"bus": "virtio"}} for v in volumes]
    devices = {"disks": disks, **({} if spec.pop("network", False) else {"autoattachPodInterface": False})}
    return {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
            "metadata": {"name": name, "namespace": "default", "uid": uid, "labels": {"app": "tick"},
                         "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}", "team": "a"}},
            "spec": {"domain": {"memory": {"guest": "64Mi"}, "devices": devices},
                     "volumes": volumes, "terminationGracePeriodSeconds": 5, **spec}}


def annotation(obj: dict) -> str:
    meta = obj["metadata"]
    body = {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
            "metadata": {"labels": meta["labels"], "name": meta["name"], "namespace": "default", "uid": meta["uid"]},
            "spec": obj["spec"]}
    return json.dumps(body, separators=(",", ":"), sort_keys=True)


def expected_block_pod(obj: dict) -> dict:
    """The launcher Pod of the Block-claim VMI, written out in full."""
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": "virt-launcher-tick-xdnsn", "namespace": "default",
            "labels": {"app": "tick", "kubevirt.io": "virt-launcher", "kubevirt.io/created-by": UID,
                       "app.kubernetes.io/managed-by": "pvlun-controller",
                       "vm.kubevirt.io/name": "tick"},
            "annotations": {"team": "a", "kubevirt.io/domain": "tick",
                            "kubectl.kubernetes.io/default-container": "compute",
                            "pvlun.dev/vmi": annotation(obj)},
            "ownerReferences": [{"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance", "name": "tick",
                                 "uid": UID, "controller": True, "blockOwnerDeletion": True}],
        },
        "spec": {
            "hostname": "tick",
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 35,
            "serviceAccountName": "default",
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "containers": [{
                "name": "compute", "image": IMAGE, "imagePullPolicy": "IfNotPresent",
                "command": ["pvlun"],
                "args": ["launch", "--vmi-file", "/var/run/pvlun/vmi/vmi.json",
                         "--run-dir", "/var/run/kubevirt-private/vm",
                         "--disk-dir", "/var/run/kubevirt-ephemeral-disks/disk-data", "--accel", "tcg"],
                "env": [{"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}],
                # 64Mi guest + 96Mi fixed + 8Mi per vCPU + 128Mi TCG + 1/512 of the guest for page tables
                "resources": {"requests": {"cpu": "100m", "memory": "297Mi", "ephemeral-storage": "50M"}},
                "securityContext": {
                    "privileged": False, "runAsUser": 0, "runAsNonRoot": False,
                    "capabilities": {"drop": ["ALL"], "add": ["CHOWN", "KILL", "MKNOD", "NET_ADMIN", "SETGID",
                                                              "SETPCAP", "SETUID", "SYS_ADMIN"]},
                    "appArmorProfile": {"type": "Unconfined"}, "seccompProfile": {"type": "RuntimeDefault"}},
                "volumeMounts": [{"name": "private", "mountPath": "/var/run/kubevirt-private"},
                                 {"name": "ephemeral-disks", "mountPath": "/var/run/kubevirt-ephemeral-disks"},
                                 {"name": "pvlun-vmi", "mountPath": "/var/run/pvlun/vmi", "readOnly": True}],
                "volumeDevices": [{"name": "root", "devicePath": "/dev/pvlun/root"}],
            }],
            "volumes": [{"name": "private", "emptyDir": {}}, {"name": "ephemeral-disks", "emptyDir": {}},
                        {"name": "pvlun-vmi", "downwardAPI": {"items": [
                            {"path": "vmi.json", "fieldRef": {"fieldPath": "metadata.annotations['pvlun.dev/vmi']"}}]}},
                        {"name": "root", "persistentVolumeClaim": {"claimName": "tick"}}],
        },
    }


def assert_valid_pod(pod: dict) -> None:
    """Every field of `pod` is one the kubernetes client's V1Pod model knows, of its type."""
    def walk(value, type_name: str, path: str) -> None:
        if type_name.startswith("List["):
            assert isinstance(value, list), path
            for i, item in enumerate(value):
                walk(item, type_name[5:-1], f"{path}[{i}]")
        elif type_name.startswith("Dict["):
            assert isinstance(value, dict), path
            for key, item in value.items():
                walk(item, type_name[5:-1].split(", ", 1)[1], f"{path}.{key}")
        elif type_name in ("str", "int", "bool", "object"):
            assert type_name == "object" or isinstance(value, {"str": str, "int": int, "bool": bool}[type_name]), path
        else:
            model = getattr(kubernetes.client, type_name)
            names = {json_name: attr for attr, json_name in model.attribute_map.items()}
            assert isinstance(value, dict), path
            for key, item in value.items():
                assert key in names, f"{path}.{key} is not a field of {type_name}"
                walk(item, model.openapi_types[names[key]], f"{path}.{key}")

    walk(pod, "V1Pod", "pod")


def test_block_claim_vmi_renders_the_whole_launcher_pod():
    obj = vmi()
    pod = launcher_pod(obj, {"tick": BLOCK}, IMAGE, namespace="default")
    assert pod == expected_block_pod(obj)
    assert_valid_pod(pod)
    args = build_parser().parse_args(pod["spec"]["containers"][0]["args"])  # what `pvlun` makes of the argv
    assert (args.func.__name__, args.vmi_file, args.accel, args.incoming) == (
        "cmd_launch", "/var/run/pvlun/vmi/vmi.json", "tcg", None)
    assert launcher_pod(obj, {"tick": BLOCK}, IMAGE, namespace="default") == pod  # pure: the same Pod again


def test_filesystem_claim_is_mounted_where_kubevirt_mounts_it():
    volumes = [{"name": "disk0", "dataVolume": {"name": "tick-dv"}},
               {"name": "data", "persistentVolumeClaim": {"claimName": "shared", "readOnly": True}}]
    obj = vmi(volumes=volumes)
    pod = launcher_pod(obj, {"tick-dv": FILESYSTEM, "shared": BLOCK}, IMAGE, namespace="default")
    want = expected_block_pod(obj)
    compute = want["spec"]["containers"][0]
    compute["volumeMounts"].append({"name": "disk0", "mountPath": "/var/run/kubevirt-private/vmi-disks/disk0"})
    compute["volumeDevices"] = [{"name": "data", "devicePath": "/dev/pvlun/data"}]
    want["spec"]["volumes"][3:] = [{"name": "disk0", "persistentVolumeClaim": {"claimName": "tick-dv"}},
                                   {"name": "data", "persistentVolumeClaim": {"claimName": "shared",
                                                                              "readOnly": True}}]
    assert pod == want
    assert_valid_pod(pod)


def test_cloud_init_and_empty_disk_live_in_the_ephemeral_emptydir_and_an_interface_costs_passt():
    volumes = [{"name": "root", "persistentVolumeClaim": {"claimName": "tick"}},
               {"name": "cloudinit", "cloudInitNoCloud": {"userData": "#cloud-config\n"}},
               {"name": "scratch", "emptyDisk": {"capacity": "1Gi"}}]
    obj = vmi(volumes=volumes, network=True)
    pod = launcher_pod(obj, {"tick": BLOCK}, IMAGE, namespace="default")
    want = expected_block_pod(obj)
    want["spec"]["containers"][0]["resources"]["requests"]["memory"] = "313Mi"  # + 16Mi: one passt
    assert pod == want  # no Pod volume of their own: the launcher makes both in ephemeral-disks


def test_kvm_is_a_device_resource_only_when_the_caller_says_the_node_has_it():
    obj = vmi()
    pod = launcher_pod(obj, {"tick": BLOCK}, IMAGE, namespace="default", kvm=True)
    want = expected_block_pod(obj)
    compute = want["spec"]["containers"][0]
    compute["args"][-1] = "kvm"
    compute["resources"] = {"requests": {"cpu": "100m", "memory": "169Mi", "ephemeral-storage": "50M",
                                         "devices.kubevirt.io/kvm": "1"},
                            "limits": {"devices.kubevirt.io/kvm": "1"}}  # no TCG translation cache
    assert pod == want
    assert_valid_pod(pod)


def test_resources_follow_the_vmi_requests_and_limits_plus_overhead():
    obj = vmi()
    obj["spec"]["domain"]["resources"] = {"requests": {"cpu": "2", "memory": "128Mi"},
                                          "limits": {"cpu": "1500m", "memory": "1Gi"}}
    compute = launcher_pod(obj, {"tick": BLOCK}, IMAGE, namespace="default")["spec"]["containers"][0]
    assert compute["resources"] == {"requests": {"cpu": "2", "memory": "361Mi", "ephemeral-storage": "50M"},
                                    "limits": {"cpu": "1500m", "memory": "1257Mi"}}
    obj["spec"]["domain"]["resources"]["limits"]["cpu"] = "1,5"
    with pytest.raises(SpecError, match=r"spec.domain.resources.limits.cpu"):
        launcher_pod(obj, {"tick": BLOCK}, IMAGE, namespace="default")


def test_placement_comes_from_the_vmi():
    obj = vmi(nodeSelector={"disktype": "ssd"},
              tolerations=[{"key": "dedicated", "operator": "Equal", "value": "vms", "effect": "NoSchedule"}],
              affinity={"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                  {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}]}}})
    spec = launcher_pod(obj, {"tick": BLOCK}, IMAGE, namespace="default")["spec"]
    assert spec["nodeSelector"] == {"disktype": "ssd"}
    assert spec["tolerations"] == obj["spec"]["tolerations"] and spec["tolerations"] is not obj["spec"]["tolerations"]
    assert spec["affinity"] == obj["spec"]["affinity"]
    obj["spec"]["nodeSelector"] = {"disktype": 1}
    with pytest.raises(SpecError, match="spec.nodeSelector"):
        launcher_pod(obj, {"tick": BLOCK}, IMAGE, namespace="default")


MIGRATION = {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstanceMigration",
             "metadata": {"name": "move-tick", "namespace": "default", "uid": "0b9e6f3c-5d1e-4c55-9a1b-7d3e2f1a0c9d"},
             "spec": {"vmiName": "tick"}}


def test_migration_target_pod_waits_for_the_stream_off_the_source_node():
    obj = vmi()
    pod = migration_target_pod(obj, MIGRATION, {"tick": BLOCK}, IMAGE, namespace="default", source_node="node-a",
                               token_secret="move-tick-token")
    want = expected_block_pod(obj)
    want["metadata"]["name"] = "virt-launcher-tick-g59gw"
    want["metadata"]["labels"]["kubevirt.io/migrationJobUID"] = MIGRATION["metadata"]["uid"]
    want["metadata"]["annotations"]["kubevirt.io/migrationJobName"] = "move-tick"
    compute = want["spec"]["containers"][0]
    compute["args"] += ["--incoming", "49152", "--token-file", "/var/run/pvlun/migration/token"]
    compute["ports"] = [{"name": "migration", "containerPort": 49152, "protocol": "TCP"}]
    compute["startupProbe"] = {"tcpSocket": {"port": 49152}, "periodSeconds": 1, "timeoutSeconds": 1,
                               "failureThreshold": 300}
    compute["volumeMounts"].append({"name": "pvlun-migration", "mountPath": "/var/run/pvlun/migration",
                                    "readOnly": True})
    want["spec"]["volumes"].insert(3, {"name": "pvlun-migration", "secret": {"secretName": "move-tick-token",
                                                                             "defaultMode": 0o400}})
    want["spec"]["affinity"] = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [
            {"key": "kubernetes.io/hostname", "operator": "NotIn", "values": ["node-a"]}]}]}}}
    assert pod == want
    assert_valid_pod(pod)
    args = build_parser().parse_args(compute["args"])
    assert (args.incoming, args.token_file) == (49152, "/var/run/pvlun/migration/token")
    source = launcher_pod(obj, {"tick": BLOCK}, IMAGE, namespace="default")
    assert pod["metadata"]["name"] != source["metadata"]["name"]


def test_migration_target_keeps_every_node_term_off_the_source_and_adds_the_migration_selector():
    obj = vmi(nodeSelector={"disktype": "ssd"},
              affinity={"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                  {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]},
                  {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n1", "n2"]}]}]}}})
    mig = copy.deepcopy(MIGRATION)
    mig["spec"]["addedNodeSelector"] = {"rack": "r2"}
    spec = migration_target_pod(obj, mig, {"tick": BLOCK}, IMAGE, namespace="default", source_node="n1")["spec"]
    away = {"key": "kubernetes.io/hostname", "operator": "NotIn", "values": ["n1"]}
    terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert terms == [{"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}, away]},
                     {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n1", "n2"]}],
                      "matchExpressions": [away]}]
    assert spec["nodeSelector"] == {"disktype": "ssd", "rack": "r2"}
    assert obj["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"][0]["matchExpressions"] == [{"key": "zone", "operator": "In", "values": ["a"]}]
    mig["spec"]["addedNodeSelector"] = {"disktype": "hdd"}
    with pytest.raises(SpecError, match="spec.addedNodeSelector.disktype"):
        migration_target_pod(obj, mig, {"tick": BLOCK}, IMAGE, namespace="default", source_node="n1")
    with pytest.raises(ValueError, match="not this one"):
        migration_target_pod(vmi("other"), MIGRATION, {"tick": BLOCK}, IMAGE, namespace="default", source_node="n1")


# ---------------------------------------------------------------- hostile VMIs

def test_a_63_character_vmi_name_gives_a_valid_pod_name_and_hostname():
    name = "v" * 62 + "9"
    pods = [launcher_pod(vmi(name, uid=uid), {"tick": BLOCK}, IMAGE, namespace="default")
            for uid in (UID, "another-uid")]
    for pod in pods:
        pod_name = pod["metadata"]["name"]
        assert len(pod_name) == 63 and SUBDOMAIN.fullmatch(pod_name) and LABEL.fullmatch(pod_name)
        assert pod_name.startswith("virt-launcher-vvv")
        assert pod["spec"]["hostname"] == name and pod["metadata"]["labels"]["vm.kubevirt.io/name"] == name
        assert_valid_pod(pod)
    assert pods[0]["metadata"]["name"] != pods[1]["metadata"]["name"]  # the suffix comes from the uid
    dotted = launcher_pod(vmi("web.prod-" + "x" * 40 + ".example"), {"tick": BLOCK}, IMAGE, namespace="default")
    assert dotted["spec"]["hostname"] == "web" and SUBDOMAIN.fullmatch(dotted["metadata"]["name"])


def test_spec_strings_never_reach_the_container_argv():
    volumes = [{"name": "root", "persistentVolumeClaim": {"claimName": "evil--accel-kvm"}},
               {"name": "x-incoming-1", "cloudInitNoCloud": {"userData": "--volume root=/etc/shadow --accel kvm"}}]
    obj = vmi("evil--run-dir", volumes=volumes, hostname="evil--token-file")
    pod = launcher_pod(obj, {"evil--accel-kvm": BLOCK}, IMAGE, namespace="default")
    compute = pod["spec"]["containers"][0]
    argv = compute["command"] + compute["args"]
    assert argv == ["pvlun", "launch", "--vmi-file", "/var/run/pvlun/vmi/vmi.json", "--run-dir",
                    "/var/run/kubevirt-private/vm", "--disk-dir", "/var/run/kubevirt-ephemeral-disks/disk-data",
                    "--accel", "tcg"]
    assert compute["env"] == [{"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}]
    assert json.loads(pod["metadata"]["annotations"]["pvlun.dev/vmi"])["spec"] == obj["spec"]  # the only way in


@pytest.mark.parametrize("name, field", [("Root_Disk", "spec.volumes[0].name"), ("a" * 64, "spec.volumes[0].name"),
                                         ("root.disk", "spec.volumes[0].name"), ("private", "spec.volumes[0].name"),
                                         ("pvlun-vmi", "spec.volumes[0].name")])
def test_a_volume_name_that_is_not_a_free_dns_label_is_refused(name, field):
    obj = vmi(volumes=[{"name": name, "persistentVolumeClaim": {"claimName": "tick"}}])
    with pytest.raises(SpecError) as caught:
        launcher_pod(obj, {"tick": BLOCK}, IMAGE, namespace="default")
    assert caught.value.path == field


def test_refusals_say_what_to_fix():
    claims = {"tick": BLOCK}
    hostile_machine, too_large, too_deep = vmi(), vmi(), vmi()
    deep: dict = {}
    for _ in range(5000):
        deep = {"a": deep}
    too_deep["spec"]["affinity"] = deep
    hostile_machine["spec"]["domain"]["machine"] = {"type": "q35,kernel=/etc/shadow"}
    too_large["spec"]["tolerations"] = [{"key": "k" * 1000}] * (MAX_VMI_BYTES // 1000 + 1)
    cases = [
        (vmi(volumes=[{"name": "root", "containerDisk": {"image": "quay.io/x"}}]), SpecError,
         r"spec.volumes\[0\].containerDisk: containerDisk volumes cannot run in cluster mode yet"),
        (vmi(uid=""), ValueError, "no metadata.uid"),
        (vmi(uid="x" * 64), SpecError, "metadata.uid"),
        (vmi(volumes=[{"name": "root", "dataVolume": {"name": "missing"}}]), ValueError,
         "claim 'missing' of volume 'root' is not known"),
        (hostile_machine, SpecError, "spec.domain.machine.type: 'q35,kernel=/etc/shadow' is not a machine type"),
        (vmi(subdomain="a.b"), SpecError, "spec.subdomain"),
        (too_large, ValueError, "a launcher Pod carries at most"),
        (too_deep, SpecError, "spec: is not plain JSON, or is nested too deeply"),
        ("not a vmi", SpecError, "must be an object"),
    ]
    for obj, error, message in cases:
        with pytest.raises(error, match=message):
            launcher_pod(obj, claims, IMAGE, namespace="default")
    with pytest.raises(ValueError, match="volumeMode"):
        launcher_pod(vmi(), {"tick": {"spec": {"volumeMode": "Tape"}}}, IMAGE, namespace="default")
    with pytest.raises(ValueError, match="not 'other'"):
        launcher_pod(vmi(), claims, IMAGE, namespace="other")
    with pytest.raises(SpecError, match="image"):
        launcher_pod(vmi(), claims, "pvlun:1 --privileged", namespace="default")
