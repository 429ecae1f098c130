"""What a person reads when something fails: one bounded line, `CODE: details` for the
driver's refusals, never a traceback, a gRPC object's repr, a daemon path or the whole input."""

from __future__ import annotations

import os
import subprocess
import sys

import grpc

from csi.proto import csi_pb2 as pb
from controlplane.csi_client import CsiClient
from controlplane.user_text import LIMIT, user_text


def assert_readable(text: str, data_dir: str) -> None:
    assert "\n" not in text and len(text) <= LIMIT, text
    for leak in ("Traceback", "_InactiveRpcError", "debug_error_string", "StatusCode.", data_dir):
        assert leak not in text, (leak, text)


def test_driver_refusal_reaches_the_datavolume_as_code_and_details_bounded(instance):
    key = "pvlun-bogus-" + "k" * 1000  # the driver's error names it: the status must not carry all of it
    instance.apply(f"""apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {{name: refusing}}
provisioner: csi.pvlun.dev
parameters: {{{key}: "1"}}
---
apiVersion: cdi.kubevirt.io/v1beta1
kind: DataVolume
metadata: {{name: refused}}
spec:
  source: {{blank: {{}}}}
  storage: {{storageClassName: refusing, resources: {{requests: {{storage: 1Mi}}}}}}
""")
    status = instance.wait(lambda: (instance.get("DataVolume", "refused").get("status") or {}).get("phase") == "Failed"
                           and instance.get("DataVolume", "refused")["status"], 60, "the DataVolume Failed")
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "ProvisioningFailed" and ready["message"].startswith("INVALID_ARGUMENT: "), ready
    assert_readable(ready["message"], instance.data_dir)
    for event in instance.store.events(instance.get("DataVolume", "refused")):
        assert_readable(event["message"], instance.data_dir)
    out = instance.cli("get", "dv", "refused")
    assert "Traceback" not in out.stdout + out.stderr


def test_grpc_error_with_a_huge_echo_becomes_one_bounded_line(instance):
    client = CsiClient(instance.data_dir, instance.nodes()[:1])
    try:
        client.controller.ControllerPublishVolume(pb.ControllerPublishVolumeRequest(
            volume_id="vol-" + "0" * 100_000, node_id=instance.nodes()[0]))
    except grpc.RpcError as exc:
        text = user_text(exc)
    finally:
        client.close()
    assert text.split(":", 1)[0] in {c.name for c in grpc.StatusCode}, text
    assert_readable(text, instance.data_dir)


def test_cli_failure_of_any_kind_is_one_line_without_traceback(tmp_path):
    with open(tmp_path / "catalog.db", "wb") as f:  # not a catalog at all
        f.write(os.urandom(8192))
    out = subprocess.run([sys.executable, "-m", "pvlun.cli", "describe", "dv", "x", "--data-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("error: "), out.stderr
    assert "Traceback" not in out.stderr and str(tmp_path) not in out.stderr
