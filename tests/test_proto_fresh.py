"""The committed CSI stubs match proto/csi.proto, and the proto is CSI v1."""

from pathlib import Path

import pytest

from csi.proto import generate


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("csi-proto")
    generate.generate(out)
    return out


@pytest.mark.parametrize("name", generate.GENERATED_FILES)
def test_committed_stub_matches_fresh_generation(regenerated, name):
    committed = generate.PACKAGE_DIR / name
    assert committed.exists(), f"csi/proto/{name} is missing: run make proto"
    assert committed.read_bytes() == (regenerated / name).read_bytes(), (
        f"csi/proto/{name} is stale relative to proto/csi.proto: run make proto"
    )


def test_generation_is_deterministic(regenerated, tmp_path):
    generate.generate(tmp_path)
    for name in generate.GENERATED_FILES:
        assert (tmp_path / name).read_bytes() == (regenerated / name).read_bytes(), name


def test_grpc_module_imports_pb2_from_the_package():
    text = (generate.PACKAGE_DIR / "csi_pb2_grpc.py").read_text()
    assert "from csi.proto import csi_pb2 as" in text


EXPECTED_METHODS = {
    "Identity": ["GetPluginInfo", "GetPluginCapabilities", "Probe"],
    "Controller": [
        "CreateVolume", "DeleteVolume", "ControllerPublishVolume",
        "ControllerUnpublishVolume", "ValidateVolumeCapabilities", "ListVolumes",
        "GetCapacity", "ControllerGetCapabilities", "CreateSnapshot",
        "DeleteSnapshot", "ListSnapshots", "GetSnapshot", "ControllerExpandVolume",
        "ControllerGetVolume", "ControllerModifyVolume",
    ],
    "GroupController": [
        "GroupControllerGetCapabilities", "CreateVolumeGroupSnapshot",
        "DeleteVolumeGroupSnapshot", "GetVolumeGroupSnapshot",
    ],
    "Node": [
        "NodeStageVolume", "NodeUnstageVolume", "NodePublishVolume",
        "NodeUnpublishVolume", "NodeGetVolumeStats", "NodeExpandVolume",
        "NodeGetCapabilities", "NodeGetInfo",
    ],
}


def test_proto_declares_package_csi_v1():
    from csi.proto import csi_pb2

    assert csi_pb2.DESCRIPTOR.package == "csi.v1"
    assert (csi_pb2.DESCRIPTOR.GetOptions().go_package
            == "github.com/container-storage-interface/spec/lib/go/csi")


@pytest.mark.parametrize("service", sorted(EXPECTED_METHODS))
def test_service_has_spec_methods_in_order(service):
    from csi.proto import csi_pb2

    desc = csi_pb2.DESCRIPTOR.services_by_name[service]
    assert desc.full_name == f"csi.v1.{service}"
    assert [m.name for m in desc.methods] == EXPECTED_METHODS[service]


def test_grpc_servicers_and_stubs_exist():
    from csi.proto import csi_pb2_grpc

    for service in EXPECTED_METHODS:
        assert hasattr(csi_pb2_grpc, f"{service}Servicer")
        assert hasattr(csi_pb2_grpc, f"{service}Stub")
        assert hasattr(csi_pb2_grpc, f"add_{service}Servicer_to_server")


def test_capability_enums_carry_newest_values():
    from csi.proto import csi_pb2

    rpc = csi_pb2.ControllerServiceCapability.RPC
    assert rpc.MODIFY_VOLUME == 14
    assert rpc.GET_SNAPSHOT == 15
    assert rpc.GET_VOLUME == 12
    group = csi_pb2.GroupControllerServiceCapability.RPC
    assert group.CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT == 1
    plugin = csi_pb2.PluginCapability.Service
    assert plugin.GROUP_CONTROLLER_SERVICE == 3
    node = csi_pb2.NodeServiceCapability.RPC
    assert node.VOLUME_MOUNT_GROUP == 6


def test_wire_field_numbers_of_key_messages():
    from csi.proto import csi_pb2

    def numbers(message):
        return {f.name: f.number for f in message.DESCRIPTOR.fields}

    assert numbers(csi_pb2.CreateVolumeRequest) == {
        "name": 1, "capacity_range": 2, "volume_capabilities": 3, "parameters": 4,
        "secrets": 5, "volume_content_source": 6, "accessibility_requirements": 7,
        "mutable_parameters": 8,
    }
    assert numbers(csi_pb2.ControllerModifyVolumeRequest) == {
        "volume_id": 1, "secrets": 2, "mutable_parameters": 3,
    }
    assert numbers(csi_pb2.Snapshot) == {
        "size_bytes": 1, "snapshot_id": 2, "source_volume_id": 3,
        "creation_time": 4, "ready_to_use": 5, "group_snapshot_id": 6,
    }
    assert numbers(csi_pb2.NodeGetVolumeStatsResponse) == {"usage": 1, "volume_condition": 2}
    assert numbers(csi_pb2.VolumeCondition) == {"abnormal": 1, "message": 2}


def test_secret_and_alpha_options_are_set():
    from csi.proto import csi_pb2

    secrets = csi_pb2.CreateVolumeRequest.DESCRIPTOR.fields_by_name["secrets"]
    assert secrets.GetOptions().Extensions[csi_pb2.csi_secret] is True
    assert csi_pb2.csi_secret.number == 1059
    for ext in (csi_pb2.alpha_field, csi_pb2.alpha_message, csi_pb2.alpha_method,
                csi_pb2.alpha_service, csi_pb2.alpha_enum, csi_pb2.alpha_enum_value):
        assert ext.number == 1060
    modify = csi_pb2.DESCRIPTOR.services_by_name["Controller"].methods_by_name[
        "ControllerModifyVolume"]
    assert modify.GetOptions().Extensions[csi_pb2.alpha_method] is True
    mutable = csi_pb2.CreateVolumeRequest.DESCRIPTOR.fields_by_name["mutable_parameters"]
    assert mutable.GetOptions().Extensions[csi_pb2.alpha_field] is True
