"""TEST STAND-IN for the CSI sidecars on the Kubernetes API server TEST DOUBLE (no cluster,
no external-snapshotter, no external-provisioner run here): what they write back, through the
double's REST, for the objects of one namespace —

- a VolumeSnapshot with no status is cut: status.boundVolumeSnapshotContentName, creationTime,
  readyToUse and restoreSize, as the external-snapshotter sets them once the CSI driver
  answered CreateSnapshot (while `holding` is set they stay uncut);
- a claim with no phase is Bound (the external-provisioner's CreateVolume), one restored from
  a VolumeSnapshot only once that snapshot is ready to use; with `consumed` a set of names,
  only those (the others wait for a first consumer, Pending, as a WaitForFirstConsumer class's).

`cut` and `bound` list what it did, in order."""

from __future__ import annotations

import sys
import threading
import time


class CsiSidecarsDouble:
    def __init__(self, double, namespace: str, size: str = "8Mi"):
        self.double, self.ns, self.size = double, namespace, size
        self.cut: list[str] = []
        self.bound: list[str] = []
        self.holding = threading.Event()
        self.consumed: set[str] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="csi-sidecars", daemon=True)

    def start(self) -> "CsiSidecarsDouble":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _loop(self) -> None:
        while not self._stop.wait(0.05):
            try:
                self.step()
            except Exception as exc:  # noqa: BLE001 - a test helper: say it, keep playing
                print(f"csi sidecars: {exc!r}", file=sys.stderr)

    def _items(self, path: str) -> list[dict]:
        code, body = self.double.call("GET", path)
        return body.get("items") or [] if code == 200 else []

    def step(self) -> None:
        base = f"/apis/snapshot.storage.k8s.io/v1/namespaces/{self.ns}/volumesnapshots"
        ready = set()
        for vs in self._items(base):
            name = vs["metadata"]["name"]
            if (vs.get("status") or {}).get("readyToUse"):
                ready.add(name)
            elif not self.holding.is_set():
                status = {"boundVolumeSnapshotContentName": f"snapcontent-{vs['metadata']['uid']}",
                          "creationTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                          "readyToUse": True, "restoreSize": self.size}
                if self.double.call("PUT", f"{base}/{name}/status", dict(vs, status=status))[0] == 200:
                    self.cut.append(name)
        claims = f"/api/v1/namespaces/{self.ns}/persistentvolumeclaims"
        for pvc in self._items(claims):
            source = (pvc.get("spec") or {}).get("dataSource") or {}
            phase = (pvc.get("status") or {}).get("phase")
            if phase == "Bound" or (source.get("kind") == "VolumeSnapshot" and source.get("name") not in ready):
                continue
            if self.consumed is not None and pvc["metadata"]["name"] not in self.consumed:
                if not phase:
                    self.double.call("PUT", f"{claims}/{pvc['metadata']['name']}/status",
                                     dict(pvc, status={"phase": "Pending"}))
                continue
            status = {"phase": "Bound", "accessModes": pvc["spec"].get("accessModes") or [],
                      "capacity": {"storage": self.size}}
            if self.double.call("PUT", f"{claims}/{pvc['metadata']['name']}/status", dict(pvc, status=status))[0] == 200:
                self.bound.append(pvc["metadata"]["name"])
