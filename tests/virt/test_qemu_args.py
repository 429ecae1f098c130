"""build_qemu_argv is pure: these tests compare argv, nothing runs."""

from __future__ import annotations

import json

import pytest

from virt.guest_network import build_passt_argv
from virt.qemu_args import DiskAttachment, Throttle, build_qemu_argv, guest_device_names, mac_address
from controlplane.vm_spec import parse_virtual_machine


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
                           qmp_fd=3, serial_fd=4)
    assert argv == [
        "qemu-system-x86_64", "-name", "guest=ns1/web,debug-threads=on",
        "-nodefaults", "-no-user-config", "-display", "none",
        "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny", "-accel", "tcg",
        "-machine", "q35", "-smp", "2,sockets=1,cores=2,threads=1", "-m", "256M", "-rtc", "base=utc",
        "-chardev", "socket,id=qmp,fd=3,server=on,wait=off", "-mon", "chardev=qmp,mode=control",
        "-add-fd", "fd=4,set=4", "-chardev", "file,id=serial0,path=/dev/fdset/4,append=on",
        "-serial", "chardev:serial0",
        "-blockdev", '{"driver":"host_device","filename":"/pub/root","node-name":"file-root","read-only":false,'
                     '"discard":"unmap","cache":{"direct":true,"no-flush":false},"aio":"native"}',
        "-blockdev", '{"driver":"raw","node-name":"fmt-root","file":"file-root","read-only":false,"discard":"unmap"}',
        "-device", "virtio-blk-pci,drive=fmt-root,id=ua-root,bootindex=1",
        "-boot", "strict=on",
    ]


def test_guest_agent_channel_is_kubevirts_virtio_serial_port_on_an_inherited_socket():
    plain = build_qemu_argv(BASIC, {"root": DiskAttachment("/pub/root")}, accel="tcg", qmp_fd=3, serial_fd=4)
    argv = build_qemu_argv(BASIC, {"root": DiskAttachment("/pub/root")}, accel="tcg", qmp_fd=3, serial_fd=4,
                           agent_fd=7)
    at = argv.index("chardev:serial0") + 1
    assert argv[at:at + 6] == [
        "-chardev", "socket,id=charchannel0,fd=7,server=on,wait=off",
        "-device", "virtio-serial-pci,id=virtio-serial0",
        "-device", "virtserialport,bus=virtio-serial0.0,nr=1,chardev=charchannel0,id=channel0,"
                   "name=org.qemu.guest_agent.0",
    ]
    assert argv[:at] + argv[at + 6:] == plain  # nothing else changes; -sandbox stays
    assert "-sandbox" in argv


def test_kvm_uses_host_cpu_and_incoming_defer_is_last():
    argv = build_qemu_argv(BASIC, {"root": DiskAttachment("/pub/root")}, accel="kvm", qmp_fd=3,
                           serial_fd=4, incoming="defer")
    assert option_values(argv, "-cpu") == ["host"] and option_values(argv, "-accel") == ["kvm"]
    assert argv[-2:] == ["-incoming", "defer"]
    with pytest.raises(ValueError, match="accel"):
        build_qemu_argv(BASIC, {"root": DiskAttachment("/p")}, accel="hvf", qmp_fd=3, serial_fd=4)


def test_regular_file_without_direct_io_uses_file_driver_and_no_native_aio():
    argv = build_qemu_argv(BASIC, {"root": DiskAttachment("/seed.iso", readonly=True, block=False, direct_io=False)},
                           accel="tcg", qmp_fd=3, serial_fd=4)
    proto, fmt = blockdevs(argv)
    assert proto["driver"] == "file" and proto["read-only"] is True and "aio" not in proto
    assert proto["cache"] == {"direct": False, "no-flush": False}
    assert fmt["read-only"] is True


def test_throttle_group_from_max_iops_and_mbps():
    throttle = Throttle.from_volume_context({"maxIOPS": "500", "maxMBps": "20", "sizeBytes": "1"})
    argv = build_qemu_argv(BASIC, {"root": DiskAttachment("/pub/root", throttle=throttle)}, accel="tcg",
                           qmp_fd=3, serial_fd=4)
    assert option_values(argv, "-object") == ["throttle-group,id=tg-root,x-iops-total=500,x-bps-total=20971520"]
    top = blockdevs(argv)[-1]
    assert top == {"driver": "throttle", "node-name": "drive-root", "throttle-group": "tg-root",
                   "file": "fmt-root", "read-only": False}
    assert option_values(argv, "-device") == ["virtio-blk-pci,drive=drive-root,id=ua-root,bootindex=1"]


def test_unlimited_throttle_still_gets_a_group_for_live_changes():
    argv = build_qemu_argv(BASIC, {"root": DiskAttachment("/p", throttle=Throttle())}, accel="tcg",
                           qmp_fd=3, serial_fd=4)
    assert option_values(argv, "-object") == ["throttle-group,id=tg-root,x-iops-total=0,x-bps-total=0"]


def test_buses_cdrom_bootorder_serial_and_one_blockdev_stack_per_volume():
    spec = vm([{"name": "root", "disk": {"bus": "sata"}, "bootOrder": 2},
               {"name": "data", "disk": {"bus": "scsi"}, "serial": "D1"},
               {"name": "iso", "cdrom": {"bus": "sata"}, "bootOrder": 1},
               {"name": "logs", "disk": {"bus": "scsi"}}],
              [{"name": n, "persistentVolumeClaim": {"claimName": n}} for n in ("root", "data", "iso", "logs")])
    att = {n: DiskAttachment(f"/pub/{n}") for n in ("root", "data", "iso", "logs")}
    argv = build_qemu_argv(spec, att, accel="tcg", qmp_fd=3, serial_fd=4)
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


def test_masquerade_interface_is_a_stream_socket_and_mac_is_stable():
    spec = vm([{"name": "root", "disk": {}}], [{"name": "root", "dataVolume": {"name": "dv"}}],
              interfaces=[{"name": "default", "masquerade": {}, "ports": [{"port": 80}, {"port": 53, "protocol": "UDP"}]}],
              networks=[{"name": "default", "pod": {}}])
    argv = build_qemu_argv(spec, {"root": DiskAttachment("/p")}, accel="tcg", qmp_fd=3, serial_fd=4,
                           net_fds={"default": 7})
    assert option_values(argv, "-netdev") == ["stream,id=net-default,server=off,addr.type=fd,addr.str=7"]
    mac = mac_address(spec, "default")
    assert option_values(argv, "-device")[-1] == f"virtio-net-pci,netdev=net-default,id=ua-default,mac={mac},romfile="
    assert mac == mac_address(spec, "default") and mac.startswith("52:54:00:")
    assert "-boot" not in argv
    with pytest.raises(ValueError, match="no network socket for interface default"):
        build_qemu_argv(spec, {"root": DiskAttachment("/p")}, accel="tcg", qmp_fd=3, serial_fd=4)


def test_forwarded_ports_are_passts_on_host_loopback_and_it_never_maps_the_gateway_to_the_host():
    spec = vm([{"name": "root", "disk": {}}], [{"name": "root", "dataVolume": {"name": "dv"}}],
              interfaces=[{"name": "default", "masquerade": {}, "ports": [{"port": 80}, {"port": 53, "protocol": "UDP"}]}],
              networks=[{"name": "default", "pod": {}}])
    argv = build_passt_argv(spec.interfaces[0], 9, {("TCP", 80): 18080, ("UDP", 53): 15353}, "/run/vm/passt.log")
    assert argv[0] == "passt" and "--no-map-gw" in argv and "--ipv4-only" in argv
    assert argv[argv.index("--fd") + 1] == "9" and argv[argv.index("--address") + 1] == "10.0.2.2"
    assert option_values(argv, "--tcp-ports") == ["127.0.0.1/18080:80"]
    assert option_values(argv, "--udp-ports") == ["127.0.0.1/15353:53"]
    with pytest.raises(ValueError, match="no host port for TCP 80"):
        build_passt_argv(spec.interfaces[0], 9, {}, "/run/vm/passt.log")


def test_guest_device_names_follow_kubevirts_volume_status_targets():
    spec = vm([{"name": n, "disk": {"bus": b}} for n, b in
               [("a", "virtio"), ("b", "sata"), ("c", "virtio"), ("d", "scsi")]] +
              [{"name": f"v{i}", "disk": {"bus": "virtio"}} for i in range(26)],
              [{"name": n, "persistentVolumeClaim": {"claimName": n}} for n in "abcd"] +
              [{"name": f"v{i}", "persistentVolumeClaim": {"claimName": f"v{i}"}} for i in range(26)])
    names = guest_device_names(spec)
    assert [names[n] for n in "abcd"] == ["vda", "sda", "vdb", "sdb"]
    assert names["v23"] == "vdz" and names["v24"] == "vdaa" and names["v25"] == "vdab"


def test_efi_secure_boot_and_console_socket():
    spec = vm([{"name": "root", "disk": {}}], [{"name": "root", "dataVolume": {"name": "dv"}}],
              firmware={"bootloader": {"efi": {}}})
    argv = build_qemu_argv(spec, {"root": DiskAttachment("/p")}, accel="tcg", qmp_fd=3, serial_fd=4, console_fd=5,
                           ovmf_code="/code.fd", ovmf_vars_fd=6, labels={4: "/run/vm,1/serial.log", 6: "/run/vm/vars"})
    assert option_values(argv, "-machine") == ["q35,pflash0=pflash0,pflash1=pflash1,smm=on"]
    assert {"driver": "file", "filename": "/code.fd", "node-name": "pflash0", "read-only": True} in blockdevs(argv)
    assert {"driver": "file", "filename": "/dev/fdset/6", "node-name": "pflash1", "read-only": False} in blockdevs(argv)
    assert "driver=cfi.pflash01,property=secure,value=on" in option_values(argv, "-global")
    assert option_values(argv, "-add-fd") == ["fd=6,set=6,opaque=/run/vm/vars", "fd=4,set=4,opaque=/run/vm,,1/serial.log"]
    assert option_values(argv, "-chardev")[1] == \
        "socket,id=serial0,fd=5,server=on,wait=off,logfile=/dev/fdset/4,logappend=on"
    with pytest.raises(ValueError, match="ovmf"):
        build_qemu_argv(spec, {"root": DiskAttachment("/p")}, accel="tcg", qmp_fd=3, serial_fd=4)


def test_missing_attachment_is_an_error():
    with pytest.raises(ValueError, match="no attachment for volume"):
        build_qemu_argv(BASIC, {}, accel="tcg", qmp_fd=3, serial_fd=4)
