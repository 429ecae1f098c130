"""Conformance: the Identity service, the server process itself (socket, logs, --version)
and the second node's socket, against a real `pvlun serve`."""

from __future__ import annotations

import re
import stat
import subprocess

from csi_support import NODE2_ID, NODE_ID, PVLUN, Code, assert_code
from csi.proto import csi_pb2 as pb
from pvlun import __version__

Service = pb.PluginCapability.Service.Type
Expansion = pb.PluginCapability.VolumeExpansion.Type
NAME_RE = re.compile(r"^[a-zA-Z][A-Za-z0-9-\.\_]{0,61}[a-zA-Z]$")  # csi-sanity's check


def test_get_plugin_info_names_the_driver_and_its_version(driver):
    info = driver.identity.GetPluginInfo(pb.GetPluginInfoRequest())
    assert info.name == "csi.pvlun.dev"
    assert NAME_RE.match(info.name)
    assert info.vendor_version == __version__


def test_plugin_capabilities_are_controller_group_controller_and_online_expansion(driver):
    caps = driver.identity.GetPluginCapabilities(pb.GetPluginCapabilitiesRequest()).capabilities
    services = {Service.Name(c.service.type) for c in caps if c.HasField("service")}
    expansion = {Expansion.Name(c.volume_expansion.type) for c in caps if c.HasField("volume_expansion")}
    assert {"CONTROLLER_SERVICE", "GROUP_CONTROLLER_SERVICE"} <= services
    # csi-sanity fails on any value it does not know
    assert services <= {"CONTROLLER_SERVICE", "VOLUME_ACCESSIBILITY_CONSTRAINTS", "GROUP_CONTROLLER_SERVICE"}
    assert expansion == {"ONLINE"}


def test_probe_is_ok_and_ready(driver):
    rsp = driver.identity.Probe(pb.ProbeRequest())
    assert not rsp.HasField("ready") or rsp.ready.value


def test_second_node_socket_serves_identity_and_node_but_no_controller(driver):
    caps = driver.identity2.GetPluginCapabilities(pb.GetPluginCapabilitiesRequest()).capabilities
    assert not any(c.HasField("service") and c.service.type == Service.CONTROLLER_SERVICE for c in caps)
    assert driver.identity2.GetPluginInfo(pb.GetPluginInfoRequest()).name == "csi.pvlun.dev"
    assert driver.node2.NodeGetInfo(pb.NodeGetInfoRequest()).node_id == NODE2_ID
    assert_code(Code.UNIMPLEMENTED, driver.controller2.ControllerGetCapabilities,
                pb.ControllerGetCapabilitiesRequest())


def test_main_socket_is_node_one(driver):
    assert driver.node.NodeGetInfo(pb.NodeGetInfoRequest()).node_id == NODE_ID


def test_sockets_are_mode_0600(driver):
    assert driver.socket_mode == 0o600
    second = driver.data_dir / "nodes" / NODE2_ID / "csi.sock"
    assert stat.S_IMODE(second.stat().st_mode) == 0o600


def test_every_call_logs_one_json_record_with_method_volume_duration_and_code(driver):
    before = len(driver.calls())
    driver.identity.GetPluginInfo(pb.GetPluginInfoRequest())
    driver.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id="fake-vol-id"))
    assert_code(Code.NOT_FOUND, driver.controller.ControllerGetVolume,
                pb.ControllerGetVolumeRequest(volume_id="vol-" + "1" * 32))
    assert_code(Code.INVALID_ARGUMENT, driver.controller.CreateVolume, pb.CreateVolumeRequest())
    records = driver.calls()[before:]
    assert [r["method"] for r in records] == ["GetPluginInfo", "DeleteVolume", "ControllerGetVolume", "CreateVolume"]
    assert [r["code"] for r in records] == ["OK", "OK", "NOT_FOUND", "INVALID_ARGUMENT"]
    assert [r["volume"] for r in records] == ["", "fake-vol-id", "vol-" + "1" * 32, ""]
    for record in records:
        assert isinstance(record["duration_ms"], (int, float)) and record["duration_ms"] >= 0


def test_node_calls_are_logged_with_their_status_too(driver):
    before = len(driver.calls())
    assert_code(Code.INVALID_ARGUMENT, driver.node.NodeStageVolume, pb.NodeStageVolumeRequest())
    records = driver.calls()[before:]
    assert [(r["method"], r["code"]) for r in records] == [("NodeStageVolume", "INVALID_ARGUMENT")]


def test_unknown_rpc_fails_without_killing_the_server(driver):
    channel = driver.channels[0]
    call = channel.unary_unary("/csi.v1.Controller/NoSuchMethod",
                               request_serializer=lambda m: b"", response_deserializer=lambda b: b)
    assert_code(Code.UNIMPLEMENTED, call, None)
    assert driver.identity.Probe(pb.ProbeRequest()) is not None


def test_pvlun_version_prints_the_version():
    out = subprocess.run([PVLUN, "--version"], capture_output=True, text=True, check=True, timeout=30)
    assert out.stdout.strip() == f"pvlun {__version__}"


def test_serve_refuses_a_relative_unix_endpoint(tmp_path):
    out = subprocess.run([PVLUN, "serve", "--data-dir", str(tmp_path), "--endpoint", "unix://relative.sock",
                          "--pool", str(tmp_path / "pool"), "--mode", "controller"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "absolute" in out.stderr


def test_grpc_status_never_carries_a_traceback(driver):
    err = assert_code(Code.INVALID_ARGUMENT, driver.controller.CreateVolume, pb.CreateVolumeRequest(name="x"))
    assert "Traceback" not in err
    assert isinstance(err, str) and err

