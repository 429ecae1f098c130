"""The control plane: objects and their admission, the ObjectStore (SQLite or Kubernetes),
the work queue, attach (the kubelet's role), provisioner, snapshotter, recovery, garbage collection."""
