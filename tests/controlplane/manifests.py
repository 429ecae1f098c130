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
