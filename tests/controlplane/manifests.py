"""Manifests several control-plane tests apply."""


def snapshot(name: str, claim_name: str) -> str:
    """A VolumeSnapshot of one claim, with the default snapshot class."""
    return f"""apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshot
metadata:
  name: {name}
spec:
  source:
    persistentVolumeClaimName: {claim_name}
"""


def clone_grant(source_ns: str, target_ns: str) -> str:
    """What CDI asks before a clone from `source_ns` into `target_ns`: a ClusterRole granting
    create on datavolumes/source, bound in the source namespace to the target's default
    service account (CDI's documented cross-namespace clone setup)."""
    return f"""apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: datavolume-cloner
rules:
- apiGroups: ["cdi.kubevirt.io"]
  resources: ["datavolumes/source"]
  verbs: ["*"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:
  name: allow-clone-to-{target_ns}
  namespace: {source_ns}
subjects:
- kind: ServiceAccount
  name: default
  namespace: {target_ns}
roleRef:
  kind: ClusterRole
  name: datavolume-cloner
  apiGroup: rbac.authorization.k8s.io
"""
