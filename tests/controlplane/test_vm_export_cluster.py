"""VirtualMachineExport on a cluster, on the Kubernetes API server TEST DOUBLE
(tests/kube_api_double.py: no API server runs here): the controller makes KubeVirt's Service,
exporter Pod and Secrets, follows the Pod's readiness (written here as the kubelet would), waits
while a Pod uses the claim, and ends at the TTL. The Pod's own process, `pvlun vmexport-server`,
is run here for real on the files the Pod would mount."""

from __future__ import annotations

import base64
import http.client
import os
import ssl
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone


from importer.upload_server import certificate_pem
from kube_fixtures import wait_until
from test_controller_cluster import IMAGE, NS, cluster  # noqa: F401 - the controller on the double, as a fixture



def bound_claim(double, user, name: str, mode: str = "Block") -> None:
    user.apply({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name, "namespace": NS},
                "spec": {"accessModes": ["ReadWriteOnce"], "volumeMode": mode,
                         "resources": {"requests": {"storage": "8Mi"}}}})
    pvc = user.get("PersistentVolumeClaim", name, NS)
    code, answer = double.call("PUT", f"/api/v1/namespaces/{NS}/persistentvolumeclaims/{name}/status",
                               dict(pvc, status={"phase": "Bound", "capacity": {"storage": "8Mi"}}))
    assert code == 200, answer


def export(user, name: str, claim: str, ttl: str = "1h") -> None:
    user.apply({"apiVersion": "export.kubevirt.io/v1beta1", "kind": "VirtualMachineExport",
                "metadata": {"name": name, "namespace": NS},
                "spec": {"source": {"apiGroup": "", "kind": "PersistentVolumeClaim", "name": claim},
                         "ttlDuration": ttl}})


def status(user, name: str) -> dict:
    return (user.get("VirtualMachineExport", name, NS) or {}).get("status") or {}


def ready_condition(user, name: str) -> dict:
    return next((c for c in status(user, name).get("conditions") or [] if c["type"] == "Ready"), {})


def set_pod_status(double, name: str, st: dict) -> None:
    path = f"/api/v1/namespaces/{NS}/pods/{name}"
    for _ in range(20):
        code, current = double.call("GET", path)
        code, answer = double.call("PUT", path + "/status", dict(current, status=st))
        if code != 409:
            break
    assert code == 200, answer


def test_the_exporter_pod_service_and_secrets_are_kubevirts_and_its_readiness_is_the_exports(cluster, kube_api_double):
    user = cluster
    bound_claim(kube_api_double, user, "disk")
    export(user, "disk-export", "disk")
    pod = wait_until(lambda: user.get("Pod", "virt-export-disk-export", NS), 10)
    vme = user.get("VirtualMachineExport", "disk-export", NS)
    owner = {"apiVersion": "export.kubevirt.io/v1beta1", "kind": "VirtualMachineExport", "name": "disk-export",
             "uid": vme["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}
    service = user.get("Service", "virt-export-disk-export", NS)
    assert service["spec"]["selector"] == {"kubevirt.io.virt-export-service": "disk-export"}
    assert service["spec"]["ports"][0]["port"] == 443 and service["spec"]["ports"][0]["targetPort"] == 8443
    assert pod["metadata"]["labels"]["kubevirt.io.virt-export-service"] == "disk-export"
    assert pod["metadata"]["ownerReferences"] == [owner] and service["metadata"]["ownerReferences"] == [owner]
    spec = pod["spec"]
    [container] = spec["containers"]
    assert container["image"] == IMAGE and container["args"][0] == "vmexport-server"
    assert container["volumeDevices"] == [{"name": "volume0", "devicePath": "/dev/export-volumes/disk"}]
    assert {"name": "volume0", "persistentVolumeClaim": {"claimName": "disk", "readOnly": True}} in spec["volumes"]
    assert "--volume" in container["args"] and "disk=/dev/export-volumes/disk" in container["args"]
    assert container["readinessProbe"]["httpGet"] == {"scheme": "HTTPS", "path": "/exportready", "port": 8443}
    assert spec["securityContext"]["runAsNonRoot"] is True and container["securityContext"]["capabilities"] == {
        "drop": ["ALL"]} and spec["automountServiceAccountToken"] is False
    secrets = {v["name"]: v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v}
    assert secrets["token"] == "export-token-disk-export" and secrets["certificates"].startswith("virt-export-disk-export-")
    assert status(user, "disk-export")["phase"] == "Pending"
    assert wait_until(lambda: ready_condition(user, "disk-export").get("reason") == "PodPending", 10)

    set_pod_status(kube_api_double, pod["metadata"]["name"],
                   {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]})
    wait_until(lambda: status(user, "disk-export").get("phase") == "Ready", 10)
    st = status(user, "disk-export")
    assert st["serviceName"] == "virt-export-disk-export" and st["tokenSecretRef"] == "export-token-disk-export"
    internal = st["links"]["internal"]
    assert internal["cert"] == pod["metadata"]["annotations"]["pvlun.dev/export-cert"]
    assert internal["volumes"] == [{"name": "disk", "formats": [
        {"format": "raw", "url": "https://virt-export-disk-export.vms.svc/volumes/disk/disk.img"},
        {"format": "gzip", "url": "https://virt-export-disk-export.vms.svc/volumes/disk/disk.img.gz"}]}]
    assert "external" not in st["links"]  # no Ingress or Route is made


def test_a_claim_a_pod_uses_gets_no_exporter_until_the_pod_is_gone(cluster, kube_api_double):
    user = cluster
    bound_claim(kube_api_double, user, "busy", mode="Filesystem")
    user.apply({"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": "virt-launcher-busy", "namespace": NS, "labels": {"app.kubernetes.io/managed-by": "pvlun-controller"}},
        "spec": {"containers": [{"name": "compute", "image": IMAGE}],
                 "volumes": [{"name": "root", "persistentVolumeClaim": {"claimName": "busy"}}]}})
    export(user, "busy-export", "busy")
    wait_until(lambda: ready_condition(user, "busy-export").get("reason") == "InUse", 10)
    assert "Pod virt-launcher-busy uses it" in ready_condition(user, "busy-export")["message"]
    time.sleep(1)
    assert user.get("Pod", "virt-export-busy-export", NS) is None
    user.delete("Pod", "virt-launcher-busy", NS)
    pod = wait_until(lambda: user.get("Pod", "virt-export-busy-export", NS), 15)
    mounts = pod["spec"]["containers"][0]["volumeMounts"]
    assert {"name": "volume0", "mountPath": "/export-volumes/busy", "readOnly": True} in mounts


def test_at_the_ttl_the_export_terminates_and_is_deleted(cluster, kube_api_double):
    user = cluster
    bound_claim(kube_api_double, user, "brief")
    export(user, "brief-export", "brief", ttl="3s")
    wait_until(lambda: user.get("Pod", "virt-export-brief-export", NS), 10)
    seen = wait_until(lambda: status(user, "brief-export").get("phase") in ("Terminated",)
                      or user.get("VirtualMachineExport", "brief-export", NS) is None, 15)
    assert seen
    wait_until(lambda: user.get("VirtualMachineExport", "brief-export", NS) is None, 15)
    assert user.get("Pod", "virt-export-brief-export", NS) is None


def test_the_exporter_pods_process_serves_the_mounted_volumes_until_its_deadline(tmp_path):
    disk = tmp_path / "disk"
    data = os.urandom(200_000)
    disk.write_bytes(data)
    (tmp_path / "token").write_text("tok-123\n")
    cert, key = certificate_pem(("127.0.0.1",))
    (tmp_path / "tls.crt").write_bytes(cert)
    (tmp_path / "tls.key").write_bytes(key)
    deadline = (datetime.now(timezone.utc) + timedelta(seconds=4)).strftime("%Y-%m-%dT%H:%M:%SZ")
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pvlun.cli", "vmexport-server", "--volume", f"disk={disk}",
                             "--token-file", str(tmp_path / "token"), "--cert-file", str(tmp_path / "tls.crt"),
                             "--key-file", str(tmp_path / "tls.key"), "--deadline", deadline,
                             "--address", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert "serving 1 volume(s)" in proc.stdout.readline()
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=ssl.create_default_context(cadata=cert.decode()))
        conn.request("GET", "/volumes/disk/disk.img", headers={"x-kubevirt-export-token": "tok-123"})
        resp = conn.getresponse()
        assert resp.status == 200 and resp.read() == data
        conn.close()
        assert proc.wait(15) == 0  # ended at its deadline: the Pod Succeeded
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_token_secret_made_is_the_export_s_and_holds_a_token(cluster, kube_api_double):
    user = cluster
    bound_claim(kube_api_double, user, "tok")
    export(user, "tok-export", "tok")
    wait_until(lambda: user.get("Pod", "virt-export-tok-export", NS), 10)
    code, secret = kube_api_double.call("GET", f"/api/v1/namespaces/{NS}/secrets/export-token-tok-export")
    assert code == 200 and len(base64.b64decode(secret["data"]["token"])) == 20
    assert secret["metadata"]["ownerReferences"][0]["kind"] == "VirtualMachineExport"
