"""The pods that do the importer's work in cluster mode, as pure functions of the objects.

Shaped as CDI's (pkg/controller/import-controller.go, upload-controller.go): one importer pod
`importer-<claim>` per DataVolume import, owned by the claim (its controller), restartPolicy
OnFailure; an upload pod `cdi-upload-<claim>` and a Service of the same name (port 443) for
uploads. The claim is mounted at /data (disk.img inside) or is the block device
/dev/cdi-block-volume, scratch space at /scratch, certConfigMap at /certs, secretExtraHeaders at
/extraheaders/<n>, CDI's volume names and its IMPORTER_ACCESS_KEY_ID / IMPORTER_SECRET_KEY
(secretKeyRef: no credential is ever in a spec). Inside runs `pvlun import`.

The source itself (URL, headers, names of secrets) is the DataVolume's `spec.source` as JSON in
the pod's annotation `pvlun.dev/import-source`, which the downward API hands the container as a
file: no URL is on a command line, whatever characters it holds.

Security context. Every qemu-img, nbdkit and tar on the image runs in host/sandbox.py's
bubblewrap sandbox as `nobody`, no capabilities, no_new_privs, its own mount/pid/net
namespaces. Making that sandbox is what needs privilege, so the container runs as root with
all capabilities dropped but these (measured by running `pvlun import` with each one taken out,
tests/importer/test_import_cli.py runs it with exactly this set):
  SYS_ADMIN   bwrap: new mount/pid namespaces, bind mounts, a fresh /proc
  NET_ADMIN   bwrap: the loopback of a tool's own network namespace
  SETUID, SETGID   setpriv: becoming `nobody`
  CHOWN, FOWNER    handing scratch files and disk.img to `nobody` and taking them back
  DAC_OVERRIDE     working in what `nobody` owns meanwhile (nbdkit's directory, disk.img)
  MKNOD            (Block) a private device node of the volume for the sandbox
No privileged mode, no host namespaces or paths; seccomp RuntimeDefault (it allows these calls
once CAP_SYS_ADMIN is held); AppArmor Unconfined, because the runtimes' default profile forbids
mount(2), which bwrap needs; a read-only root filesystem (/tmp is an emptyDir); no service
account token (the pod never calls the API). allowPrivilegeEscalation stays unset: the API
server refuses `false` together with SYS_ADMIN, and the tools get no_new_privs from setpriv.
bwrap mounts /proc, which works in pods without user namespaces (the default); with
`hostUsers: false` it would need `procMount: Unmasked`. SYS_ADMIN, NET_ADMIN and an unconfined
AppArmor profile are beyond Pod Security's `baseline`: the DataVolume's namespace must allow
`privileged` pods, or the controller's ServiceAccount be exempt in the PodSecurity admission
configuration (CDI's pods pass `restricted` because CDI runs qemu-img unsandboxed in the pod).
"""

from __future__ import annotations

import base64
import copy
import json

from controlplane.admission import check_name
from controlplane.dv_spec import IMPORT_SOURCES, disk_size, validate
from controlplane.names import bounded_name, label_value, service_name
from controlplane.quantity import parse_quantity

from .pod_result import IMPORTER_CONTAINER, UPLOAD_CONTAINER

SERVICE_ACCOUNT = "default"  # the namespace's own, without a token: the pods never call the API
# CDI's volume names and paths
DATA_VOLUME, SCRATCH_VOLUME, CERT_VOLUME = "cdi-data-vol", "cdi-scratch-vol", "cdi-cert-vol"
HEADERS_VOLUME = "cdi-secret-extra-headers-vol-{}"
DATA_DIR, DISK_PATH, BLOCK_PATH = "/data", "/data/disk.img", "/dev/cdi-block-volume"
SCRATCH_DIR, CERT_DIR, HEADERS_DIR = "/scratch", "/certs", "/extraheaders"
TERMINATION_LOG = "/dev/termination-log"
ACCESS_KEY_ENV, SECRET_KEY_ENV = "IMPORTER_ACCESS_KEY_ID", "IMPORTER_SECRET_KEY"  # from the secretRef
REGION_ENV = "IMPORTER_REGION"  # s3: the secretRef's optional `region`
# pvlun's own
SOURCE_ANNOTATION = "pvlun.dev/import-source"
SOURCE_DIR, SOURCE_FILE = "/etc/pvlun/import", "/etc/pvlun/import/source.json"
UPLOAD_SECRET_DIR = "/etc/pvlun/upload"
UPLOAD_SECRET_KEYS = ("token.key", "tls.crt", "tls.key")
METRICS_PORT, UPLOAD_PORT = 8080, 8443
DATAVOLUME_LABEL = "pvlun.dev/datavolume"
QEMU_GID = 107  # CDI's fsGroup: KubeVirt's QEMU reads disk.img as this group
DEFAULT_RESOURCES = {"limits": {"cpu": "750m", "memory": "600M"}, "requests": {"cpu": "100m", "memory": "60M"}}  # CDI's
SANDBOX_CAPABILITIES = ("CHOWN", "DAC_OVERRIDE", "FOWNER", "NET_ADMIN", "SETGID", "SETUID", "SYS_ADMIN")
MODE_CAPABILITIES = {"Filesystem": (), "Block": ("MKNOD",)}
# annotations CDI carries from a DataVolume to its pods, with CDI's defaults
POD_ANNOTATIONS = {"k8s.v1.cni.cncf.io/networks": "", "v1.multus-cni.io/default-network": "",
                   "sidecar.istio.io/inject": "false", "linkerd.io/inject": "disabled"}


def importer_pod(dv: dict, pvc: dict, image: str, *, namespace: str | None = None,
                 service_account: str = SERVICE_ACCOUNT, pull_policy: str = "IfNotPresent",
                 scratch_claim: str | None = None, placement: dict | None = None,
                 resources: dict | None = None) -> dict:
    """The importer pod filling `pvc` for DataVolume `dv` (an http, registry, s3 or blank source).

    `scratch_claim` names a claim the controller made for scratch space (else an emptyDir);
    `placement` is CDI's workload placement ({nodeSelector, tolerations, affinity}); `resources`
    the container's requirements (CDI's defaults otherwise). ValueError names a field a pod
    cannot be made from."""
    kind, source, _size, _mode, _access, _sc = validate(dv)
    if kind not in (*IMPORT_SOURCES, "blank"):
        raise ValueError(f"spec.source.{kind}: not imported by an importer pod")
    ns = _namespace(dv, pvc, namespace)
    env, volumes, mounts, source_args = _source_parts(kind, source)
    args = ["import", "--source-file", SOURCE_FILE, *_target_args(dv, pvc), *source_args]
    pod = _pod(dv, pvc, ns, name=bounded_name(f"importer-{pvc['metadata']['name']}"), app="pvlun-importer",
               container=IMPORTER_CONTAINER, image=image, pull_policy=pull_policy, service_account=service_account,
               args=args, env=env, volumes=volumes, mounts=mounts, scratch_claim=scratch_claim, placement=placement,
               resources=resources)
    pod["metadata"]["annotations"][SOURCE_ANNOTATION] = json.dumps({kind: source}, sort_keys=True, separators=(",", ":"))
    spec = pod["spec"]
    spec["volumes"].append({"name": "pvlun-import-source", "downwardAPI": {"items": [
        {"path": "source.json", "fieldRef": {"fieldPath": f"metadata.annotations['{SOURCE_ANNOTATION}']"}}]}})
    spec["containers"][0]["volumeMounts"].append({"name": "pvlun-import-source", "mountPath": SOURCE_DIR,
                                                  "readOnly": True})
    return pod


def upload_pod(dv: dict, pvc: dict, image: str, *, secret_name: str | None = None, namespace: str | None = None,
               service_account: str = SERVICE_ACCOUNT, pull_policy: str = "IfNotPresent",
               scratch_claim: str | None = None, placement: dict | None = None,
               resources: dict | None = None) -> dict:
    """The upload pod of DataVolume `dv` (spec.source.upload): `pvlun import` serving one HTTPS
    upload on port 8443 into `pvc`, behind `upload_service`. `secret_name` (default
    `upload_name(pvc)`, as `upload_secret` names it) is the Secret holding the token signing key
    and the serving certificate."""
    kind, _source, _size, _mode, _access, _sc = validate(dv)
    if kind != "upload":
        raise ValueError(f"spec.source.{kind}: not an upload DataVolume")
    ns = _namespace(dv, pvc, namespace)
    name = upload_name(pvc)
    secret_name = _check_ref(secret_name or name, "the upload Secret")
    args = ["import", "--upload-address", f"0.0.0.0:{UPLOAD_PORT}", "--upload-secret-dir", UPLOAD_SECRET_DIR,
            *_target_args(dv, pvc)]
    volumes = [{"name": "pvlun-upload-secret", "secret": {"secretName": secret_name, "defaultMode": 0o400}}]
    mounts = [{"name": "pvlun-upload-secret", "mountPath": UPLOAD_SECRET_DIR, "readOnly": True}]
    pod = _pod(dv, pvc, ns, name=name, app="pvlun-upload-server", container=UPLOAD_CONTAINER, image=image,
               pull_policy=pull_policy, service_account=service_account, args=args, env=[], volumes=volumes,
               mounts=mounts, scratch_claim=scratch_claim, placement=placement, resources=resources)
    pod["metadata"]["labels"].update({"service": service_name(name),
                                      "cdi.kubevirt.io/uploadTarget": pvc["metadata"]["uid"]})
    container = pod["spec"]["containers"][0]
    container["ports"].insert(0, {"name": "upload", "containerPort": UPLOAD_PORT, "protocol": "TCP"})
    container["readinessProbe"] = {"httpGet": {"path": "/healthz", "port": UPLOAD_PORT, "scheme": "HTTPS"},
                                   "initialDelaySeconds": 2, "periodSeconds": 5}
    return pod


def upload_service(dv: dict, pvc: dict, *, namespace: str | None = None) -> dict:
    """The Service in front of the upload pod: port 443 to its 8443, named as CDI names it."""
    ns = _namespace(dv, pvc, namespace)
    name = service_name(upload_name(pvc))
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": ns, "labels": _labels(dv, "pvlun-upload-server"),
                         "ownerReferences": [_owner(pvc)]},
            "spec": {"selector": {"service": name},
                     "ports": [{"protocol": "TCP", "port": 443, "targetPort": UPLOAD_PORT}]}}


def upload_secret(dv: dict, pvc: dict, *, token_key: bytes, tls_cert: bytes, tls_key: bytes,
                  namespace: str | None = None) -> dict:
    """The Secret the upload pod reads: `token.key` (the HMAC key upload tokens are signed with,
    at least 32 random bytes: importer/upload_server.py), `tls.crt` and `tls.key` (its serving
    certificate, for `upload_host(pvc)`). The caller makes them, e.g. `secrets.token_bytes(32)`
    and `upload_server.certificate_pem((upload_host(pvc),))`; a client that may read the Secret
    mints tokens with `issue_token(key, "<namespace>/<dv name>")`."""
    from .upload_server import KEY_BYTES

    if len(token_key) < KEY_BYTES:
        raise ValueError(f"the upload token key must hold at least {KEY_BYTES} bytes")
    ns = _namespace(dv, pvc, namespace)
    values = dict(zip(UPLOAD_SECRET_KEYS, (token_key, tls_cert, tls_key)))
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": upload_name(pvc), "namespace": ns, "labels": _labels(dv, "pvlun-upload-server"),
                         "ownerReferences": [_owner(pvc)]},
            "data": {k: base64.b64encode(v).decode() for k, v in values.items()}}


def upload_name(pvc: dict) -> str:
    """`cdi-upload-<claim>`: the upload pod's and Secret's name (the Service's, as a label)."""
    return bounded_name(f"cdi-upload-{pvc['metadata']['name']}")


def upload_host(pvc: dict) -> str:
    """The upload Service's host name inside the cluster (what its certificate must name)."""
    return f"{service_name(upload_name(pvc))}.{pvc['metadata'].get('namespace', 'default')}.svc"


def scratch_claim_name(pvc: dict) -> str:
    """CDI's name for a claim's scratch claim: `<claim>-scratch`."""
    return bounded_name(f"{pvc['metadata']['name']}-scratch")


# -- parts --------------------------------------------------------------------------------
def _namespace(dv: dict, pvc: dict, namespace: str | None) -> str:
    ns = namespace or pvc["metadata"].get("namespace") or "default"
    for obj, what in ((dv, "DataVolume"), (pvc, "claim")):
        check_name(obj["metadata"].get("name"), obj["metadata"].get("namespace") or ns)
        if (obj["metadata"].get("namespace") or ns) != ns:
            raise ValueError(f"the {what} is in namespace {obj['metadata'].get('namespace')}, not {ns}")
        if not obj["metadata"].get("uid"):
            raise ValueError(f"the {what} has no metadata.uid (pass the stored object)")
    return ns


def _check_ref(name: object, field: str) -> str:
    """A Secret's or ConfigMap's name as it goes into a pod spec: a DNS-1123 subdomain."""
    try:
        check_name(name, None)
    except ValueError as exc:
        raise ValueError(str(exc).replace("metadata.name", field)) from None
    return str(name)


def _source_parts(kind: str, source: dict) -> tuple[list, list, list, list]:
    """(env, volumes, mounts, args) that hand the source's secrets and CA certificates over."""
    env: list[dict] = []
    volumes: list[dict] = []
    mounts: list[dict] = []
    args: list[str] = []
    field = f"spec.source.{kind}"
    if source.get("secretRef"):
        secret = _check_ref(source["secretRef"], f"{field}.secretRef")
        env += [_secret_env(ACCESS_KEY_ENV, secret, "accessKeyId"), _secret_env(SECRET_KEY_ENV, secret, "secretKey")]
        if kind == "s3":
            env.append(_secret_env(REGION_ENV, secret, "region", optional=True))
    if source.get("certConfigMap"):
        config_map = _check_ref(source["certConfigMap"], f"{field}.certConfigMap")
        volumes.append({"name": CERT_VOLUME, "configMap": {"name": config_map}})
        mounts.append({"name": CERT_VOLUME, "mountPath": CERT_DIR, "readOnly": True})
        args += ["--cert-dir", CERT_DIR]
    headers = source.get("secretExtraHeaders") or []
    if not isinstance(headers, list):
        raise ValueError(f"{field}.secretExtraHeaders must be a list of Secret names")
    for index, name in enumerate(headers):
        secret = _check_ref(name, f"{field}.secretExtraHeaders[{index}]")
        volumes.append({"name": HEADERS_VOLUME.format(index), "secret": {"secretName": secret, "defaultMode": 0o400}})
        mounts.append({"name": HEADERS_VOLUME.format(index), "mountPath": f"{HEADERS_DIR}/{index}", "readOnly": True})
    if headers:
        args += ["--extra-headers-dir", HEADERS_DIR]
    return env, volumes, mounts, args


def _secret_env(name: str, secret: str, key: str, optional: bool = False) -> dict:
    ref: dict = {"name": secret, "key": key}
    if optional:
        ref["optional"] = True
    return {"name": name, "valueFrom": {"secretKeyRef": ref}}


def _volume_mode(pvc: dict) -> str:
    mode = (pvc.get("spec") or {}).get("volumeMode") or "Filesystem"
    if mode not in MODE_CAPABILITIES:
        raise ValueError(f"the claim's spec.volumeMode {str(mode)[:40]!r} is not Filesystem or Block")
    return mode


def _target_args(dv: dict, pvc: dict) -> list[str]:
    """Where and how big the disk is: the block device, or disk.img sized as DataVolumes size it."""
    spec = dv.get("spec") or {}
    args: list[str] = []
    if _volume_mode(pvc) == "Block":
        args += ["--target", BLOCK_PATH]  # the whole device
    else:
        request = ((pvc.get("spec") or {}).get("resources") or {}).get("requests", {}).get("storage")
        if request is None:
            raise ValueError("the claim has no spec.resources.requests.storage")
        size, overhead = disk_size(dv, parse_quantity(request), False)
        args += ["--target", DISK_PATH, "--size", str(size), "--filesystem-overhead", f"{overhead:g}"]
    if spec.get("contentType", "kubevirt") == "archive":
        args += ["--content-type", "archive"]
    if spec.get("preallocation") is True:
        args.append("--preallocation")
    meta = dv["metadata"]
    return args + ["--scratch-dir", SCRATCH_DIR, "--datavolume", f"{meta.get('namespace') or 'default'}/{meta['name']}",
                   "--owner-uid", meta["uid"], "--metrics-address", f"0.0.0.0:{METRICS_PORT}",
                   "--termination-log", TERMINATION_LOG]


def _labels(dv: dict, app: str) -> dict:
    return {"app.kubernetes.io/name": app, "app.kubernetes.io/part-of": "pvlun",
            "app.kubernetes.io/managed-by": "pvlun-controller", DATAVOLUME_LABEL: label_value(dv["metadata"]["name"])}


def _owner(pvc: dict) -> dict:
    """The claim owns (and controls) what is made for it, as in CDI: deleting it deletes them."""
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "name": pvc["metadata"]["name"],
            "uid": pvc["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}


def _annotations(dv: dict, pvc: dict) -> dict:
    given = {**((dv["metadata"].get("annotations")) or {}), **((pvc["metadata"].get("annotations")) or {})}
    out = {}
    for key, default in POD_ANNOTATIONS.items():
        value = given.get(key, default)
        if isinstance(value, str) and value:
            out[key] = value
    return out


def _security_context(mode: str) -> dict:
    return {"runAsUser": 0, "runAsNonRoot": False, "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"], "add": sorted(SANDBOX_CAPABILITIES + MODE_CAPABILITIES[mode])},
            "seccompProfile": {"type": "RuntimeDefault"}, "appArmorProfile": {"type": "Unconfined"}}


def _placement(placement: dict | None) -> dict:
    """CDI's NodePlacement: nodeSelector, tolerations and affinity, copied as given."""
    out = {}
    for key, kind in (("nodeSelector", dict), ("tolerations", list), ("affinity", dict)):
        value = (placement or {}).get(key)
        if value:
            if not isinstance(value, kind):
                raise ValueError(f"placement.{key} must be a {'map' if kind is dict else 'list'}")
            out[key] = copy.deepcopy(value)
    return out


def _pod(dv: dict, pvc: dict, ns: str, *, name: str, app: str, container: str, image: str, pull_policy: str,
         service_account: str, args: list[str], env: list[dict], volumes: list[dict], mounts: list[dict],
         scratch_claim: str | None, placement: dict | None, resources: dict | None) -> dict:
    mode = _volume_mode(pvc)
    _check_ref(service_account, "the ServiceAccount")
    scratch = ({"persistentVolumeClaim": {"claimName": _check_ref(scratch_claim, "the scratch claim")}}
               if scratch_claim else {"emptyDir": {}})
    main = {
        "name": container, "image": image, "imagePullPolicy": pull_policy,
        "command": ["pvlun"], "args": args, **({"env": env} if env else {}),
        "ports": [{"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}],
        "resources": copy.deepcopy(resources if resources is not None else DEFAULT_RESOURCES),
        "securityContext": _security_context(mode),
        "terminationMessagePath": TERMINATION_LOG, "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": [{"name": SCRATCH_VOLUME, "mountPath": SCRATCH_DIR}, {"name": "tmp", "mountPath": "/tmp"},
                         *mounts],
    }
    if mode == "Block":
        main["volumeDevices"] = [{"name": DATA_VOLUME, "devicePath": BLOCK_PATH}]
    else:
        main["volumeMounts"].insert(0, {"name": DATA_VOLUME, "mountPath": DATA_DIR})
    spec: dict = {
        "restartPolicy": "OnFailure",
        "serviceAccountName": service_account,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "containers": [main],
        "volumes": [{"name": DATA_VOLUME, "persistentVolumeClaim": {"claimName": pvc["metadata"]["name"]}},
                    {"name": SCRATCH_VOLUME, **scratch}, {"name": "tmp", "emptyDir": {}}, *volumes],
        **_placement(placement),
    }
    priority = (dv.get("spec") or {}).get("priorityClassName")
    if priority:
        spec["priorityClassName"] = _check_ref(priority, "spec.priorityClassName")
    if (dv.get("spec") or {}).get("contentType", "kubevirt") == "kubevirt":
        spec["securityContext"] = {"fsGroup": QEMU_GID}
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": _labels(dv, app),
                         "annotations": _annotations(dv, pvc), "ownerReferences": [_owner(pvc)]},
            "spec": spec}
