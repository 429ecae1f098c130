"""The exporter Pod, its Service and its certificate Secret of a VirtualMachineExport on a
cluster, as pure functions, shaped as KubeVirt's (pkg/storage/export/export/export.go):

- Service `virt-export-NAME` (port 443 → 8443, selector `kubevirt.io.virt-export-service: NAME`),
  owned by the export; the internal links name `virt-export-NAME.NS.svc`;
- Pod `virt-export-NAME` with that label, each claim read-only at /export-volumes/VOLUME
  (Filesystem) or /dev/export-volumes/VOLUME (Block), the token Secret at /token and the
  serving certificate's Secret at /cert, a readiness probe on HTTPS /exportready:8443, as
  non-root (uid/fsGroup 107, KubeVirt's `kvm`), no capabilities, seccomp RuntimeDefault, no
  service account token. Inside runs `pvlun vmexport-server`, the server embedded mode runs in
  `pvlun serve`. The certificate's PEM is on the Pod too (annotation), so the controller, which
  may create Secrets but never read them, can still put it in the export's status.
"""

from __future__ import annotations

import base64

from controlplane.names import bounded_name, label_value, service_name

SERVICE_LABEL = "kubevirt.io.virt-export-service"  # KubeVirt's exportServiceLabel
APP_LABEL = "kubevirt.io"  # KubeVirt's AppLabel, value virt-exporter
CERT_ANNOTATION = "pvlun.dev/export-cert"
CONTAINER = "exporter"
PORT, SERVICE_PORT = 8443, 443
FS_DIR, BLOCK_DIR = "/export-volumes", "/dev/export-volumes"
TOKEN_DIR, CERT_DIR = "/token", "/cert"
KVM_GID = 107
RESOURCES = {"limits": {"cpu": "1", "memory": "1Gi"}, "requests": {"cpu": "100m", "memory": "200M"}}  # KubeVirt's


def exporter_name(vme: dict) -> str:
    """virt-export-NAME, bounded as a Service name (KubeVirt: a DNS-1035 label)."""
    return service_name(f"virt-export-{vme['metadata']['name']}")


def internal_host(vme: dict) -> str:
    return f"{exporter_name(vme)}.{vme['metadata'].get('namespace', 'default')}.svc"


def _owner(vme: dict) -> dict:
    meta = vme["metadata"]
    return {"apiVersion": "export.kubevirt.io/v1beta1", "kind": "VirtualMachineExport", "name": meta["name"],
            "uid": meta["uid"], "controller": True, "blockOwnerDeletion": True}


def _meta(vme: dict, name: str) -> dict:
    return {"name": name, "namespace": vme["metadata"].get("namespace", "default"),
            "labels": {APP_LABEL: "virt-exporter", "app.kubernetes.io/managed-by": "pvlun-controller",
                       SERVICE_LABEL: label_value(vme["metadata"]["name"])},
            "ownerReferences": [_owner(vme)]}


def exporter_service(vme: dict) -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(vme, exporter_name(vme)),
            "spec": {"ports": [{"protocol": "TCP", "port": SERVICE_PORT, "targetPort": PORT}],
                     "selector": {SERVICE_LABEL: label_value(vme["metadata"]["name"])}}}


def cert_secret(vme: dict, name: str, cert: bytes, key: bytes) -> dict:
    """The serving certificate the Pod mounts (tls.crt, tls.key), owned by the export."""
    return {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls", "immutable": True,
            "metadata": _meta(vme, bounded_name(name)),
            "data": {"tls.crt": base64.b64encode(cert).decode(), "tls.key": base64.b64encode(key).decode()}}


def volume_path(pvc: dict, volume: str) -> str:
    block = (pvc.get("spec") or {}).get("volumeMode") == "Block"
    return f"{BLOCK_DIR if block else FS_DIR}/{volume}"


def exporter_pod(vme: dict, claims: list[tuple[str, dict]], *, image: str, token_secret: str, cert_secret_name: str,
                 cert_pem: str, deadline: str, pull_policy: str = "IfNotPresent") -> dict:
    """The Pod serving `claims` ([(volume name, claim)]) until `deadline` (RFC 3339: the TTL)."""
    volumes, mounts, devices, args = [], [], [], ["vmexport-server", "--port", str(PORT), "--deadline", deadline,
                                                  "--token-file", f"{TOKEN_DIR}/token",
                                                  "--cert-file", f"{CERT_DIR}/tls.crt",
                                                  "--key-file", f"{CERT_DIR}/tls.key"]
    for i, (volume, pvc) in enumerate(claims):
        pod_volume = f"volume{i}"
        volumes.append({"name": pod_volume, "persistentVolumeClaim": {"claimName": pvc["metadata"]["name"],
                                                                      "readOnly": True}})
        path = volume_path(pvc, volume)
        if path.startswith(BLOCK_DIR):
            devices.append({"name": pod_volume, "devicePath": path})
        else:
            mounts.append({"name": pod_volume, "mountPath": path, "readOnly": True})
        args += ["--volume", f"{volume}={path}"]
    volumes += [{"name": "token", "secret": {"secretName": token_secret}},
                {"name": "certificates", "secret": {"secretName": cert_secret_name}}]
    mounts += [{"name": "token", "mountPath": TOKEN_DIR, "readOnly": True},
               {"name": "certificates", "mountPath": CERT_DIR, "readOnly": True}]
    container = {
        "name": CONTAINER, "image": image, "imagePullPolicy": pull_policy, "command": ["pvlun"], "args": args,
        "ports": [{"name": "export", "containerPort": PORT, "protocol": "TCP"}],
        "readinessProbe": {"httpGet": {"scheme": "HTTPS", "path": "/exportready", "port": PORT},
                           "initialDelaySeconds": 5, "periodSeconds": 5},
        "resources": RESOURCES,
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": mounts,
    }
    if devices:
        container["volumeDevices"] = devices
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": _meta(vme, exporter_name(vme)),
           "spec": {"restartPolicy": "Never", "automountServiceAccountToken": False, "enableServiceLinks": False,
                    "securityContext": {"runAsNonRoot": True, "runAsUser": KVM_GID, "runAsGroup": KVM_GID,
                                        "fsGroup": KVM_GID, "seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [container], "volumes": volumes}}
    pod["metadata"]["annotations"] = {CERT_ANNOTATION: cert_pem}
    return pod
