"""Another namespace's bytes only with its grant, whatever asks for them: a plain claim whose
dataSourceRef names a claim or snapshot in another namespace, and a DataVolume cloning a
snapshot from one, need what CDI asks of a cross-namespace clone — `create` on
`datavolumes/source` in the source namespace for the target namespace's service account.
Without it nothing is provisioned and the reason names the grant; with it the bytes arrive."""

from __future__ import annotations

from manifests import clone_grant, snapshot

SECRET = b"SECRET-OF-IMAGES" * 256


def claim(name: str, namespace: str, source: dict | None = None) -> str:
    text = f"""apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: {name}
  namespace: {namespace}
spec:
  volumeMode: Block
  accessModes: [ReadWriteOnce]
  resources:
    requests:
      storage: 16Mi
"""
    if source:
        text += "  dataSourceRef:\n" + "".join(f"    {k}: {v}\n" for k, v in source.items())
    return text


def phase(instance, kind: str, name: str, ns: str) -> str:
    return ((instance.get(kind, name, ns) or {}).get("status") or {}).get("phase", "")


def refusal(instance, name: str, ns: str = "default") -> str:
    conds = ((instance.get("PersistentVolumeClaim", name, ns) or {}).get("status") or {}).get("conditions") or []
    return next((c["message"] for c in conds if "insufficient permissions" in c.get("message", "")), "")


def test_claims_and_datavolumes_reading_another_namespace_need_its_grant(instance):
    instance.apply(claim("shared", "vault"))
    instance.wait(lambda: phase(instance, "PersistentVolumeClaim", "shared", "vault") == "Bound", what="shared bound")
    with open(instance.lun_path("shared", "vault"), "r+b") as f:
        f.write(SECRET)
    instance.apply(snapshot("shared-snap", "shared").replace("metadata:\n", "metadata:\n  namespace: vault\n"))
    instance.wait(lambda: ((instance.get("VolumeSnapshot", "shared-snap", "vault") or {}).get("status") or {})
                  .get("readyToUse"), what="the snapshot ready")

    instance.apply(claim("peek", "default", {"kind": "PersistentVolumeClaim", "name": "shared", "namespace": "vault"}))
    instance.apply(claim("peek-snap", "default", {"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot",
                                                   "name": "shared-snap", "namespace": "vault"}))
    instance.apply("""apiVersion: cdi.kubevirt.io/v1beta1
kind: DataVolume
metadata:
  name: peek-dv
spec:
  source:
    snapshot: {name: shared-snap, namespace: vault}
  storage:
    volumeMode: Block
    resources: {requests: {storage: 16Mi}}
""")
    for name in ("peek", "peek-snap"):
        message = instance.wait(lambda: refusal(instance, name), 20, f"{name} refused")
        assert "system:serviceaccount:default:default" in message and "namespace vault" in message
        assert phase(instance, "PersistentVolumeClaim", name, "default") != "Bound"

    def dv_refused():
        status = instance.get("DataVolume", "peek-dv").get("status") or {}
        return status.get("phase") == "Failed" and "insufficient permissions" in str(status.get("conditions"))

    instance.wait(dv_refused, 20, "the DataVolume refused")

    instance.apply(clone_grant("vault", "default"))
    instance.apply(claim("granted", "default", {"kind": "PersistentVolumeClaim", "name": "shared", "namespace": "vault"}))
    instance.wait(lambda: phase(instance, "PersistentVolumeClaim", "granted", "default") == "Bound", 20, "granted bound")
    with open(instance.lun_path("granted"), "rb") as f:
        assert f.read(len(SECRET)) == SECRET
