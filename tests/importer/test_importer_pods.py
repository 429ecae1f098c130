"""The importer's pods are pure functions of the objects (importer/pods.py): whole specs compared
for each kind of DataVolume, every spec checked against the Kubernetes API's own models and its
command line against our CLI, and hostile names, secrets and URLs kept where they belong."""

from __future__ import annotations

import base64
import json
import re

import pytest
from cryptography import x509
from kubernetes.client import ApiClient

from controlplane.dv_spec import claim_spec
from importer.pods import importer_pod, scratch_claim_name, upload_host, upload_pod, upload_secret, upload_service
from importer.upload_server import certificate_pem
from pvlun.cli import build_parser

IMAGE = "localhost/pvlun:0.1.0"
DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")

RESOURCES = {"limits": {"cpu": "750m", "memory": "600M"}, "requests": {"cpu": "100m", "memory": "60M"}}
RESTRICTIONS = {"runAsUser": 0, "runAsNonRoot": False, "readOnlyRootFilesystem": True}
PROFILES = {"seccompProfile": {"type": "RuntimeDefault"}, "appArmorProfile": {"type": "Unconfined"}}
FILESYSTEM_CONTEXT = {**RESTRICTIONS, "capabilities": {"drop": ["ALL"], "add": [
    "CHOWN", "DAC_OVERRIDE", "FOWNER", "NET_ADMIN", "SETGID", "SETUID", "SYS_ADMIN"]}, **PROFILES}
BLOCK_CONTEXT = {**RESTRICTIONS, "capabilities": {"drop": ["ALL"], "add": [
    "CHOWN", "DAC_OVERRIDE", "FOWNER", "MKNOD", "NET_ADMIN", "SETGID", "SETUID", "SYS_ADMIN"]}, **PROFILES}
DEFAULT_ANNOTATIONS = {"sidecar.istio.io/inject": "false", "linkerd.io/inject": "disabled"}
SOURCE_VOLUME = {"name": "pvlun-import-source", "downwardAPI": {"items": [
    {"path": "source.json", "fieldRef": {"fieldPath": "metadata.annotations['pvlun.dev/import-source']"}}]}}
SOURCE_MOUNT = {"name": "pvlun-import-source", "mountPath": "/etc/pvlun/import", "readOnly": True}
POD_SPEC = {"restartPolicy": "OnFailure", "serviceAccountName": "default",
            "automountServiceAccountToken": False, "enableServiceLinks": False}
PORT_METRICS = {"name": "metrics", "containerPort": 8080, "protocol": "TCP"}
TERMINATION = {"terminationMessagePath": "/dev/termination-log", "terminationMessagePolicy": "FallbackToLogsOnError"}


def labels(app: str, dv: str) -> dict:
    return {"app.kubernetes.io/name": app, "app.kubernetes.io/part-of": "pvlun",
            "app.kubernetes.io/managed-by": "pvlun-controller", "pvlun.dev/datavolume": dv}


def owner(name: str, uid: str) -> list[dict]:
    return [{"apiVersion": "v1", "kind": "PersistentVolumeClaim", "name": name, "uid": uid,
             "controller": True, "blockOwnerDeletion": True}]


def datavolume(name: str, source: dict, storage: dict, ns: str = "vms", uid: str = "dv-uid", **spec) -> dict:
    return {"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
            "metadata": {"name": name, "namespace": ns, "uid": uid}, "spec": {"source": source, **storage, **spec}}


def claim(name: str, spec: dict, ns: str = "vms", uid: str = "pvc-uid") -> dict:
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name, "namespace": ns, "uid": uid},
            "spec": spec}


def valid(obj: dict, model: str) -> None:
    """The object is what the API's models describe: every field known, of the right type
    (a misspelled field would be dropped on the way in and missing on the way out)."""
    client = ApiClient()
    assert client.sanitize_for_serialization(client.deserialize(json.dumps(obj), model, "application/json")) == obj


def cli_args(pod: dict):
    container = pod["spec"]["containers"][0]
    assert container["command"] == ["pvlun"]
    return build_parser().parse_args(container["args"])


# -- whole specs --------------------------------------------------------------------------
def test_http_filesystem_importer_pod_is_cdis_shape():
    dv = datavolume("fedora", {"http": {"url": "https://example.org/fedora.qcow2"}},
                    {"storage": {"resources": {"requests": {"storage": "10Gi"}}}})
    pvc = claim("fedora", claim_spec("http", {}, 10 << 30, "Filesystem", ["ReadWriteOnce"], None, True, "vms"))
    pod = importer_pod(dv, pvc, IMAGE)
    assert pod == {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "importer-fedora", "namespace": "vms", "labels": labels("pvlun-importer", "fedora"),
                     "annotations": {**DEFAULT_ANNOTATIONS,
                                     "pvlun.dev/import-source": '{"http":{"url":"https://example.org/fedora.qcow2"}}'},
                     "ownerReferences": owner("fedora", "pvc-uid")},
        "spec": {**POD_SPEC,
                 "containers": [{
                     "name": "importer", "image": IMAGE, "imagePullPolicy": "IfNotPresent", "command": ["pvlun"],
                     # spec.storage: the claim was made larger, the disk gets the 10Gi asked for (overhead 0)
                     "args": ["import", "--source-file", "/etc/pvlun/import/source.json",
                              "--target", "/data/disk.img", "--size", "10737418240", "--filesystem-overhead", "0",
                              "--scratch-dir", "/scratch", "--datavolume", "vms/fedora", "--owner-uid", "dv-uid",
                              "--metrics-address", "0.0.0.0:8080", "--termination-log", "/dev/termination-log"],
                     "ports": [PORT_METRICS], "resources": RESOURCES, "securityContext": FILESYSTEM_CONTEXT, **TERMINATION,
                     "volumeMounts": [{"name": "cdi-data-vol", "mountPath": "/data"},
                                      {"name": "cdi-scratch-vol", "mountPath": "/scratch"},
                                      {"name": "tmp", "mountPath": "/tmp"}, SOURCE_MOUNT]}],
                 "volumes": [{"name": "cdi-data-vol", "persistentVolumeClaim": {"claimName": "fedora"}},
                             {"name": "cdi-scratch-vol", "emptyDir": {}}, {"name": "tmp", "emptyDir": {}}, SOURCE_VOLUME],
                 "securityContext": {"fsGroup": 107}}}
    valid(pod, "V1Pod")
    args = cli_args(pod)
    assert (args.command, args.target, args.size, args.filesystem_overhead) == ("import", "/data/disk.img", 10 << 30, 0.0)


def test_registry_block_pod_takes_credentials_from_the_secret_and_mounts_the_ca():
    dv = datavolume("win", {"registry": {"url": "docker://registry.example.org/disks/win:11",
                                         "secretRef": "registry-creds", "certConfigMap": "registry-ca"}},
                    {"pvc": {"volumeMode": "Block", "accessModes": ["ReadWriteMany"],
                             "resources": {"requests": {"storage": "64Gi"}}}},
                    uid="dv-2", priorityClassName="vm-imports")
    dv["metadata"]["annotations"] = {"k8s.v1.cni.cncf.io/networks": "storage-net", "unrelated": "x"}
    pvc = claim("win", {"volumeMode": "Block", "accessModes": ["ReadWriteMany"],
                        "resources": {"requests": {"storage": "64Gi"}}}, uid="pvc-2")
    placement = {"nodeSelector": {"storage": "fast"},
                 "tolerations": [{"key": "imports", "operator": "Exists", "effect": "NoSchedule"}]}
    pod = importer_pod(dv, pvc, IMAGE, placement=placement, scratch_claim=scratch_claim_name(pvc))
    source = ('{"registry":{"certConfigMap":"registry-ca","secretRef":"registry-creds",'
              '"url":"docker://registry.example.org/disks/win:11"}}')
    assert pod == {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "importer-win", "namespace": "vms", "labels": labels("pvlun-importer", "win"),
                     "annotations": {"k8s.v1.cni.cncf.io/networks": "storage-net", **DEFAULT_ANNOTATIONS,
                                     "pvlun.dev/import-source": source},
                     "ownerReferences": owner("win", "pvc-2")},
        "spec": {**POD_SPEC,
                 "containers": [{
                     "name": "importer", "image": IMAGE, "imagePullPolicy": "IfNotPresent", "command": ["pvlun"],
                     "args": ["import", "--source-file", "/etc/pvlun/import/source.json",
                              "--target", "/dev/cdi-block-volume",
                              "--scratch-dir", "/scratch", "--datavolume", "vms/win", "--owner-uid", "dv-2",
                              "--metrics-address", "0.0.0.0:8080", "--termination-log", "/dev/termination-log",
                              "--cert-dir", "/certs"],
                     "env": [{"name": "IMPORTER_ACCESS_KEY_ID",
                              "valueFrom": {"secretKeyRef": {"name": "registry-creds", "key": "accessKeyId"}}},
                             {"name": "IMPORTER_SECRET_KEY",
                              "valueFrom": {"secretKeyRef": {"name": "registry-creds", "key": "secretKey"}}}],
                     "ports": [PORT_METRICS], "resources": RESOURCES, "securityContext": BLOCK_CONTEXT, **TERMINATION,
                     "volumeMounts": [{"name": "cdi-scratch-vol", "mountPath": "/scratch"},
                                      {"name": "tmp", "mountPath": "/tmp"},
                                      {"name": "cdi-cert-vol", "mountPath": "/certs", "readOnly": True}, SOURCE_MOUNT],
                     "volumeDevices": [{"name": "cdi-data-vol", "devicePath": "/dev/cdi-block-volume"}]}],
                 "volumes": [{"name": "cdi-data-vol", "persistentVolumeClaim": {"claimName": "win"}},
                             {"name": "cdi-scratch-vol", "persistentVolumeClaim": {"claimName": "win-scratch"}},
                             {"name": "tmp", "emptyDir": {}},
                             {"name": "cdi-cert-vol", "configMap": {"name": "registry-ca"}}, SOURCE_VOLUME],
                 **placement, "priorityClassName": "vm-imports", "securityContext": {"fsGroup": 107}}}
    valid(pod, "V1Pod")
    assert cli_args(pod).cert_dir == "/certs"


def test_blank_filesystem_pod_with_spec_pvc_keeps_cdis_overhead_and_headers_secrets_are_mounted():
    dv = datavolume("scratchpad", {"blank": {}}, {"pvc": {"resources": {"requests": {"storage": "2Gi"}}}},
                    preallocation=True)
    pvc = claim("scratchpad", {"volumeMode": "Filesystem", "resources": {"requests": {"storage": "2Gi"}}})
    pod = importer_pod(dv, pvc, IMAGE, service_account="other-sa", pull_policy="Always",
                       resources={"requests": {"cpu": "1"}})
    container = pod["spec"]["containers"][0]
    assert container["args"] == [
        "import", "--source-file", "/etc/pvlun/import/source.json",
        "--target", "/data/disk.img", "--size", str(2 << 30), "--filesystem-overhead", "0.055", "--preallocation",
        "--scratch-dir", "/scratch", "--datavolume", "vms/scratchpad", "--owner-uid", "dv-uid",
        "--metrics-address", "0.0.0.0:8080", "--termination-log", "/dev/termination-log"]
    assert "env" not in container
    assert (container["imagePullPolicy"], container["resources"]) == ("Always", {"requests": {"cpu": "1"}})
    assert pod["spec"]["serviceAccountName"] == "other-sa"
    assert pod["metadata"]["annotations"]["pvlun.dev/import-source"] == '{"blank":{}}'
    valid(pod, "V1Pod")
    assert cli_args(pod).preallocation

    headers = datavolume("h", {"http": {"url": "https://example.org/x", "secretExtraHeaders": ["tok-a", "tok-b"],
                                        "extraHeaders": ["X-Plain: yes"]}},
                         {"pvc": {"resources": {"requests": {"storage": "1Gi"}}}}, contentType="archive")
    pod = importer_pod(headers, claim("h", {"resources": {"requests": {"storage": "1Gi"}}}), IMAGE)
    container = pod["spec"]["containers"][0]
    assert container["volumeMounts"][3:] == [
        {"name": "cdi-secret-extra-headers-vol-0", "mountPath": "/extraheaders/0", "readOnly": True},
        {"name": "cdi-secret-extra-headers-vol-1", "mountPath": "/extraheaders/1", "readOnly": True}, SOURCE_MOUNT]
    assert pod["spec"]["volumes"][3:5] == [
        {"name": "cdi-secret-extra-headers-vol-0", "secret": {"secretName": "tok-a", "defaultMode": 0o400}},
        {"name": "cdi-secret-extra-headers-vol-1", "secret": {"secretName": "tok-b", "defaultMode": 0o400}}]
    assert container["args"][container["args"].index("--content-type") + 1] == "archive"
    assert container["args"][-2:] == ["--extra-headers-dir", "/extraheaders"]
    assert "securityContext" not in pod["spec"]  # no fsGroup for archives, as in CDI
    valid(pod, "V1Pod")


def test_upload_pod_service_and_secret():
    dv = datavolume("up", {"upload": {}}, {"storage": {"volumeMode": "Block", "resources": {"requests": {"storage": "1Gi"}}}},
                    uid="dv-3")
    pvc = claim("up", {"volumeMode": "Block", "resources": {"requests": {"storage": "1Gi"}}}, uid="pvc-3")
    pod = upload_pod(dv, pvc, IMAGE)
    assert pod == {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "cdi-upload-up", "namespace": "vms",
                     "labels": {**labels("pvlun-upload-server", "up"), "service": "cdi-upload-up",
                                "cdi.kubevirt.io/uploadTarget": "pvc-3"},
                     "annotations": DEFAULT_ANNOTATIONS, "ownerReferences": owner("up", "pvc-3")},
        "spec": {**POD_SPEC,
                 "containers": [{
                     "name": "cdi-upload-server", "image": IMAGE, "imagePullPolicy": "IfNotPresent",
                     "command": ["pvlun"],
                     "args": ["import", "--upload-address", "0.0.0.0:8443", "--upload-secret-dir", "/etc/pvlun/upload",
                              "--target", "/dev/cdi-block-volume", "--scratch-dir", "/scratch",
                              "--datavolume", "vms/up", "--owner-uid", "dv-3", "--metrics-address", "0.0.0.0:8080",
                              "--termination-log", "/dev/termination-log"],
                     "ports": [{"name": "upload", "containerPort": 8443, "protocol": "TCP"}, PORT_METRICS],
                     "resources": RESOURCES, "securityContext": BLOCK_CONTEXT, **TERMINATION,
                     "volumeMounts": [{"name": "cdi-scratch-vol", "mountPath": "/scratch"},
                                      {"name": "tmp", "mountPath": "/tmp"},
                                      {"name": "pvlun-upload-secret", "mountPath": "/etc/pvlun/upload",
                                       "readOnly": True}],
                     "volumeDevices": [{"name": "cdi-data-vol", "devicePath": "/dev/cdi-block-volume"}],
                     "readinessProbe": {"httpGet": {"path": "/healthz", "port": 8443, "scheme": "HTTPS"},
                                        "initialDelaySeconds": 2, "periodSeconds": 5}}],
                 "volumes": [{"name": "cdi-data-vol", "persistentVolumeClaim": {"claimName": "up"}},
                             {"name": "cdi-scratch-vol", "emptyDir": {}}, {"name": "tmp", "emptyDir": {}},
                             {"name": "pvlun-upload-secret", "secret": {"secretName": "cdi-upload-up", "defaultMode": 0o400}}],
                 "securityContext": {"fsGroup": 107}}}
    valid(pod, "V1Pod")
    args = cli_args(pod)
    assert (args.upload_address, args.datavolume) == (("0.0.0.0", 8443), "vms/up")

    service = upload_service(dv, pvc)
    assert service == {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "cdi-upload-up", "namespace": "vms", "labels": labels("pvlun-upload-server", "up"),
                     "ownerReferences": owner("up", "pvc-3")},
        "spec": {"selector": {"service": "cdi-upload-up"}, "ports": [{"protocol": "TCP", "port": 443, "targetPort": 8443}]}}
    valid(service, "V1Service")
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert upload_host(pvc) == "cdi-upload-up.vms.svc"

    cert, cert_key = certificate_pem((upload_host(pvc),))
    names = x509.load_pem_x509_certificate(cert).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert names.value.get_values_for_type(x509.DNSName) == ["cdi-upload-up.vms.svc"] and b"PRIVATE KEY" in cert_key

    key = bytes(range(32))
    secret = upload_secret(dv, pvc, token_key=key, tls_cert=b"CERT", tls_key=b"KEY")
    assert secret == {
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": "cdi-upload-up", "namespace": "vms", "labels": labels("pvlun-upload-server", "up"),
                     "ownerReferences": owner("up", "pvc-3")},
        "data": {"token.key": base64.b64encode(key).decode(), "tls.crt": "Q0VSVA==", "tls.key": "S0VZ"}}
    valid(secret, "V1Secret")
    assert base64.b64encode(key).decode() not in json.dumps(pod)  # the pod names the Secret, never its data
    with pytest.raises(ValueError, match="at least 32 bytes"):
        upload_secret(dv, pvc, token_key=b"short", tls_cert=b"C", tls_key=b"K")


# -- hostile inputs -----------------------------------------------------------------------
def test_names_of_253_characters_give_valid_bounded_names():
    name = "a" * 120 + "." + "b" * 132  # a valid claim/DataVolume name, 253 characters
    assert len(name) == 253
    dv = datavolume(name, {"http": {"url": "https://example.org/x"}}, {"pvc": {"resources": {"requests": {"storage": "1Gi"}}}})
    pvc = claim(name, {"resources": {"requests": {"storage": "1Gi"}}})
    pod = importer_pod(dv, pvc, IMAGE)
    pod_name = pod["metadata"]["name"]
    assert len(pod_name) <= 253 and DNS1123_SUBDOMAIN.fullmatch(pod_name) and pod_name.startswith("importer-aaa")
    assert importer_pod(dv, pvc, IMAGE)["metadata"]["name"] == pod_name  # the same name every time
    other = name[:-1] + "c"
    assert importer_pod(datavolume(other, dv["spec"]["source"], {"pvc": dv["spec"]["pvc"]}), claim(other, pvc["spec"]),
                        IMAGE)["metadata"]["name"] != pod_name
    value = pod["metadata"]["labels"]["pvlun.dev/datavolume"]
    assert len(value) <= 63 and LABEL_VALUE.fullmatch(value)
    valid(pod, "V1Pod")

    up = datavolume(name, {"upload": {}}, {"pvc": {"resources": {"requests": {"storage": "1Gi"}}}})
    upod, service = upload_pod(up, pvc, IMAGE), upload_service(up, pvc)
    assert len(service["metadata"]["name"]) <= 63 and DNS1035_LABEL.fullmatch(service["metadata"]["name"])
    assert service["spec"]["selector"] == {"service": upod["metadata"]["labels"]["service"]}
    assert len(upod["metadata"]["name"]) <= 253 and DNS1123_SUBDOMAIN.fullmatch(upod["metadata"]["name"])
    assert len(scratch_claim_name(pvc)) <= 253
    valid(upod, "V1Pod")
    valid(service, "V1Service")


HOSTILE_URL = "https://example.org/x.img?a=1&b=$(reboot);`rm -rf /`|\"' --target /etc/passwd"


def test_a_url_with_shell_metacharacters_stays_one_json_value_and_never_reaches_argv():
    dv = datavolume("evil", {"http": {"url": HOSTILE_URL, "secretRef": "creds"}},
                    {"pvc": {"resources": {"requests": {"storage": "1Gi"}}}})
    pod = importer_pod(dv, claim("evil", {"resources": {"requests": {"storage": "1Gi"}}}), IMAGE)
    container = pod["spec"]["containers"][0]
    assert json.loads(pod["metadata"]["annotations"]["pvlun.dev/import-source"]) == {
        "http": {"url": HOSTILE_URL, "secretRef": "creds"}}
    assert not any("example.org" in a or "reboot" in a for a in container["args"])
    assert cli_args(pod).target == "/data/disk.img"  # the URL's "--target" went nowhere near the command line
    # credentials only ever as references to the Secret: no literal value in the environment
    assert all(set(e) == {"name", "valueFrom"} and set(e["valueFrom"]) == {"secretKeyRef"} for e in container["env"])
    valid(pod, "V1Pod")
    with pytest.raises(ValueError, match="spec.source.http.url: must not hold control characters"):
        importer_pod(datavolume("evil", {"http": {"url": HOSTILE_URL + "\n"}}, {"pvc": {"resources": {"requests": {
            "storage": "1Gi"}}}}), claim("evil", {"resources": {"requests": {"storage": "1Gi"}}}), IMAGE)


@pytest.mark.parametrize("field, value, message", [
    ("secretRef", "../../etc/shadow", "spec.source.http.secretRef"),
    ("certConfigMap", "CA Bundle", "spec.source.http.certConfigMap"),
    ("secretExtraHeaders", ["ok", "not/ok"], r"spec.source.http.secretExtraHeaders\[1\]"),
    ("secretExtraHeaders", "tok", "must be a list"),
])
def test_names_that_reach_the_spec_are_checked_naming_the_field(field, value, message):
    dv = datavolume("x", {"http": {"url": "https://example.org/x", field: value}},
                    {"pvc": {"resources": {"requests": {"storage": "1Gi"}}}})
    with pytest.raises(ValueError, match=message):
        importer_pod(dv, claim("x", {"resources": {"requests": {"storage": "1Gi"}}}), IMAGE)


def test_objects_a_pod_cannot_be_made_from_are_refused():
    source = {"http": {"url": "https://example.org/x"}}
    storage = {"pvc": {"resources": {"requests": {"storage": "1Gi"}}}}
    good_pvc = claim("x", {"resources": {"requests": {"storage": "1Gi"}}})
    cases = [
        (datavolume("x", source, storage), claim("x", {"volumeMode": "Tape", "resources": {"requests": {"storage": "1Gi"}}}),
         "volumeMode"),
        (datavolume("x", source, storage), claim("x", {"resources": {"requests": {"storage": "1Gi"}}}, uid=""), "uid"),
        (datavolume("x", source, storage), claim("x", {"resources": {"requests": {"storage": "1Gi"}}}, ns="other"),
         "namespace"),
        (datavolume("x", {"pvc": {"name": "src"}}, storage), good_pvc, "not imported by an importer pod"),
        (datavolume("x", {"upload": {}}, storage), good_pvc, "not imported by an importer pod"),
        (datavolume("x", source, storage, priorityClassName="No Such Class"), good_pvc, "spec.priorityClassName"),
    ]
    for dv, pvc, message in cases:
        with pytest.raises(ValueError, match=message):
            importer_pod(dv, pvc, IMAGE)
    with pytest.raises(ValueError, match="not an upload DataVolume"):
        upload_pod(datavolume("x", source, storage), good_pvc, IMAGE)
    with pytest.raises(ValueError, match="placement.tolerations"):
        importer_pod(datavolume("x", source, storage), good_pvc, IMAGE, placement={"tolerations": {"key": "x"}})


def test_bounded_names_are_cdis_fnv1a_shortening():
    from controlplane.names import bounded_name, fnv1a_32, service_name

    assert (fnv1a_32(""), fnv1a_32("a"), fnv1a_32("foobar")) == ("811c9dc5", "e40c292c", "bf9cf968")  # FNV-1a test vectors
    assert bounded_name("importer-short") == "importer-short"
    long = "importer-" + "x" * 250 + ".y"
    assert bounded_name(long) == "importer-" + "x" * 235 + "-" + fnv1a_32(long)
    assert bounded_name("a" * 60 + "." + "b" * 10, 63) == "a" * 54 + "-" + fnv1a_32("a" * 60 + "." + "b" * 10)
    assert service_name("cdi-upload-a.b") == "cdi-upload-a-b"
