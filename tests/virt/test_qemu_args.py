"""build_qemu_argv is pure: these tests compare argv, nothing runs."""

from __future__ import annotations

import json

import pytest

from virt.qemu_args import DiskAttachment, Throttle, build_qemu_argv, mac_address
from virt.spec import parse_virtual_machine


def vm(disks, volumes, interfaces=(), networks=(), **domain):
    return parse_virtual_machine({
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "metadata": {"name": "web", "namespace": "ns1"},
        "spec": {"running": True, "template": {"spec": {
            "domain": {"cpu": {"cores": 2}, "memory": {"guest": "256Mi"},
                       "devices": {"disks": list(disks), "interfaces": list(interfaces),
                                   "autoattachPodInterface": bool(interfaces)}, **domain},
            "networks": list(networks), "volumes": list(volumes)}}}}).template


def option_values(argv, flag):
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def blockdevs(argv):
    return [json.loads(v) for v in option_values(argv, "-blockdev")]


BASIC = vm([{"name": "root", "disk": {"bus": "virtio"}, "bootOrder": 1}],
           [{"name": "root", "persistentVolumeClaim": {"claimName": "root"}}])


def test_minimal_vm_argv_exactly():
    argv = build_qemu_argv(BASIC, {"root": DiskAttachment("/pub/root")}, accel="tcg",
                           qmp_path="/run/vm/qmp.sock", serial_log="/run/vm/serial.log")
    assert argv == [
        "qemu-system-x86_64", "-name", "guest=ns1/web,debug-threads=on",
        "-nodefaults", "-no-user-config", "-display", "none",
        "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny", "-accel", "tcg",
        "-machine", "q35", "-smp", "2,sockets=1,cores=2,threads=1", "-m", "256M", "-rtc", "base=utc",
        "-qmp", "unix:/run/vm/qmp.sock,server=on,wait=off",
        "-chardev", "file,id=serial0,path=/run/vm/serial.log,append=on", "-serial", "chardev:serial0",
        "-blockdev", '{"driver":"host_device","filename":"/pub/root","node-name":"file-root","read-only":false,'
                     '"discard":"unmap","cache":{"direct":true,"no-flush":false},"aio":"native"}',
        "-blockdev", '{"driver":"raw","node-name":"fmt-root","file":"file-root","read-only":false,"discard":"unmap"}',
        "-device", "virtio-blk-pci,drive=fmt-root,id=ua-root,bootindex=1",
        "-boot", "strict=on",
    ]


def test_kvm_uses_host_cpu_and_incoming_defer_is_last():
    argv = build_qemu_argv(BASIC, {"root": DiskAttachment("/pub/root")}, accel="kvm", qmp_path="/q",
                           serial_log="/s", incoming="defer")
    assert option_values(argv, "-cpu") == ["host"] and option_values(argv, "-accel") == ["kvm"]
    assert argv[-2:] == ["-incoming", "defer"]
    with pytest.raises(ValueError, match="accel"):
        build_qemu_argv(BASIC, {"root": DiskAttachment("/p")}, accel="hvf", qmp_path="/q", serial_log="/s")


def test_regular_file_without_direct_io_uses_file_driver_and_no_native_aio():
    argv = build_qemu_argv(BASIC, {"root": DiskAttachment("/seed.iso", readonly=True, block=False, direct_io=False)},
                           accel="tcg", qmp_path="/q", serial_log="/s")
    proto, fmt = blockdevs(argv)
    assert proto["driver"] == "file" and proto["read-only"] is True and "aio" not in proto
    assert proto["cache"] == {"direct": False, "no-flush": False}
    assert fmt["read-only"] is True


def test_throttle_group_from_max_iops_and_mbps():
    throttle = Throttle.from_volume_context({"maxIOPS": "500", "maxMBps": "20", "sizeBytes": "1"})
    argv = build_qemu_argv(BASIC, {"root": DiskAttachment("/pub/root", throttle=throttle)}, accel="tcg",
                           qmp_path="/q", serial_log="/s")
    assert option_values(argv, "-object") == ["throttle-group,id=tg-root,x-iops-total=500,x-bps-total=20971520"]
    top = blockdevs(argv)[-1]
    assert top == {"driver": "throttle", "node-name": "drive-root", "throttle-group": "tg-root",
                   "file": "fmt-root", "read-only": False}
    assert option_values(argv, "-device") == ["virtio-blk-pci,drive=drive-root,id=ua-root,bootindex=1"]


def test_unlimited_throttle_still_gets_a_group_for_live_changes():
    argv = build_qemu_argv(BASIC, {"root": DiskAttachment("/p", throttle=Throttle())}, accel="tcg",
                           qmp_path="/q", serial_log="/s")
    assert option_values(argv, "-object") == ["throttle-group,id=tg-root,x-iops-total=0,x-bps-total=0"]


def test_buses_cdrom_bootorder_serial_and_one_blockdev_stack_per_volume():
    spec = vm([{"name": "root", "disk": {"bus": "sata"}, "bootOrder": 2},
               {"name": "data", "disk": {"bus": "scsi"}, "serial": "D1"},
               {"name": "iso", "cdrom": {"bus": "sata"}, "bootOrder": 1},
               {"name": "logs", "disk": {"bus": "scsi"}}],
              [{"name": n, "persistentVolumeClaim": {"claimName": n}} for n in ("root", "data", "iso", "logs")])
    att = {n: DiskAttachment(f"/pub/{n}") for n in ("root", "data", "iso", "logs")}
    argv = build_qemu_argv(spec, att, accel="tcg", qmp_path="/q", serial_log="/s")
    assert option_values(argv, "-device") == [
        "ich9-ahci,id=sata0", "virtio-scsi-pci,id=scsi0",
        "ide-hd,bus=sata0.0,drive=fmt-root,id=ua-root,bootindex=2",
        "scsi-hd,bus=scsi0.0,channel=0,scsi-id=0,lun=0,drive=fmt-data,id=ua-data,serial=D1",
        "ide-cd,bus=sata0.1,drive=fmt-iso,id=ua-iso,bootindex=1",
        "scsi-hd,bus=scsi0.0,channel=0,scsi-id=0,lun=1,drive=fmt-logs,id=ua-logs",
    ]
    nodes = blockdevs(argv)
    assert len(nodes) == 8
    assert [n["filename"] for n in nodes if "filename" in n] == ["/pub/root", "/pub/data", "/pub/iso", "/pub/logs"]
    iso = next(n for n in nodes if n.get("node-name") == "file-iso")
    assert iso["read-only"] is True  # a cdrom is read-only by default


def test_masquerade_ports_become_hostfwd_and_mac_is_stable():
    spec = vm([{"name": "root", "disk": {}}], [{"name": "root", "dataVolume": {"name": "dv"}}],
              interfaces=[{"name": "default", "masquerade": {}, "ports": [{"port": 80}, {"port": 53, "protocol": "UDP"}]}],
              networks=[{"name": "default", "pod": {}}])
    argv = build_qemu_argv(spec, {"root": DiskAttachment("/p")}, accel="tcg", qmp_path="/q", serial_log="/s",
                           host_ports={("TCP", 80): 18080, ("UDP", 53): 15353})
    assert option_values(argv, "-netdev") == [
        "user,id=net-default,net=10.0.2.0/24,host=10.0.2.1,dhcpstart=10.0.2.2,hostname=web,"
        "hostfwd=tcp:127.0.0.1:18080-:80,hostfwd=udp:127.0.0.1:15353-:53"]
    mac = mac_address(spec, "default")
    assert option_values(argv, "-device")[-1] == f"virtio-net-pci,netdev=net-default,id=ua-default,mac={mac},romfile="
    assert mac == mac_address(spec, "default") and mac.startswith("52:54:00:")
    assert "-boot" not in argv
    with pytest.raises(ValueError, match="no host port for TCP 80"):
        build_qemu_argv(spec, {"root": DiskAttachment("/p")}, accel="tcg", qmp_path="/q", serial_log="/s")


def test_efi_secure_boot_and_console_socket():
    spec = vm([{"name": "root", "disk": {}}], [{"name": "root", "dataVolume": {"name": "dv"}}],
              firmware={"bootloader": {"efi": {}}})
    argv = build_qemu_argv(spec, {"root": DiskAttachment("/p")}, accel="tcg", qmp_path="/q", serial_log="/s,1",
                           console_socket="/c.sock", ovmf_code="/code.fd", ovmf_vars="/vars.fd")
    assert option_values(argv, "-machine") == ["q35,pflash0=pflash0,pflash1=pflash1,smm=on"]
    assert {"driver": "file", "filename": "/code.fd", "node-name": "pflash0", "read-only": True} in blockdevs(argv)
    assert "driver=cfi.pflash01,property=secure,value=on" in option_values(argv, "-global")
    assert option_values(argv, "-chardev") == [
        "socket,id=serial0,path=/c.sock,server=on,wait=off,logfile=/s,,1,logappend=on"]
    with pytest.raises(ValueError, match="ovmf"):
        build_qemu_argv(spec, {"root": DiskAttachment("/p")}, accel="tcg", qmp_path="/q", serial_log="/s")


def test_missing_attachment_is_an_error():
    with pytest.raises(ValueError, match="no attachment for volume"):
        build_qemu_argv(BASIC, {}, accel="tcg", qmp_path="/q", serial_log="/s")
