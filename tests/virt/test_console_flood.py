"""A guest that floods its serial console cannot fill the host: QEMU's serial log is cut back
once the VM's console history has it, and the history keeps only its limit."""

from __future__ import annotations

import os
import time

from virt.console_history import ConsoleHistory
from virt.qemu_args import DiskAttachment

# mov dx, 0x3f8; again: mov al, 'A'; out dx, al; mov al, '\n'; out dx, al; jmp again
FLOOD = bytes([0xBA, 0xF8, 0x03, 0xB0, 0x41, 0xEE, 0xB0, 0x0A, 0xEE, 0xEB, 0xF8])


def flood_disk(path) -> str:
    path.write_bytes(FLOOD.ljust(510, b"\0") + b"\x55\xaa" + bytes(1 << 20))
    return str(path)


def test_a_guest_flooding_com1_leaves_a_bounded_serial_log_and_history(launchers, make_tick_vm, tmp_path):
    history = ConsoleHistory(tmp_path / "console.log", limit=256 << 10)
    disks = {"root": DiskAttachment.for_path(flood_disk(tmp_path / "flood.img"))}
    vm = launchers(make_tick_vm(), disks, tmp_path / "run", history=history)
    vm.start()
    log = tmp_path / "run" / "serial.log"
    sizes, cuts, deadline = [], 0, time.monotonic() + 60
    while cuts < 3 and time.monotonic() < deadline:
        size = log.stat().st_size
        if sizes and size < sizes[-1]:
            cuts += 1
        sizes.append(size)
        time.sleep(0.05)
    assert cuts >= 3, f"the serial log was never cut back: {sizes[-5:]}"  # the guest wrote well past the bound
    assert max(sizes) < 3 << 20, max(sizes)  # cut back at 1 MiB, plus what a flood writes between looks
    assert os.path.getsize(history.path) <= history.limit + history.limit // 4
    assert history.read().rstrip(b"A\n") == b""  # what it keeps is the guest's output, whole lines
    vm.kill()
