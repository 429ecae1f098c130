"""The tick guest's boot sector, assembled here from 16-bit x86 machine code.

A guest that boots in well under a second even under TCG: it prints a marker on COM1 and
then "tick N" about every 165 ms (three BIOS timer ticks, waiting with `hlt` so an idle
guest costs the host almost nothing). A migrated guest keeps counting; a rebooted one
prints the marker again and starts over at 1 — which is what the migration tests check.

No assembler is needed: the few instructions are written as bytes below, and a two-pass
label resolver fills in the relative jumps and absolute addresses.
"""

from __future__ import annotations

from typing import Callable

ORIGIN = 0x7C00
SECTOR = 512
COM1 = 0x3F8


class _Assembler:
    """Just enough of an assembler: raw bytes, labels, rel8/rel16 jumps and imm16 addresses."""

    def __init__(self, origin: int):
        self.origin = origin
        self.items: list[bytes | Callable[[dict[str, int], int], bytes] | tuple[str, int]] = []

    def label(self, name: str) -> None:
        self.items.append((name, 0))

    def raw(self, *data: int | bytes) -> None:
        self.items.append(b"".join(bytes([d]) if isinstance(d, int) else d for d in data))

    def rel8(self, opcode: int, target: str) -> None:
        def enc(labels: dict[str, int], here: int) -> bytes:
            delta = labels.get(target, here) - (here + 2)
            if not -128 <= delta <= 127:
                raise ValueError(f"short jump to {target} out of range")
            return bytes([opcode, delta & 0xFF])

        self.items.append(enc)

    def call(self, target: str) -> None:
        def enc(labels: dict[str, int], here: int) -> bytes:
            delta = labels.get(target, here) - (here + 3)
            return bytes([0xE8]) + (delta & 0xFFFF).to_bytes(2, "little")

        self.items.append(enc)

    def addr16(self, prefix: bytes, target: str) -> None:
        """An instruction whose last two bytes are the absolute address of `target`."""

        def enc(labels: dict[str, int], here: int) -> bytes:
            return prefix + labels.get(target, 0).to_bytes(2, "little")

        self.items.append(enc)

    def assemble(self) -> bytes:
        labels: dict[str, int] = {}
        for _ in range(2):  # pass 1 finds label addresses, pass 2 encodes with them
            out = bytearray()
            for item in self.items:
                here = self.origin + len(out)
                if isinstance(item, tuple):
                    labels[item[0]] = here
                elif isinstance(item, bytes):
                    out += item
                else:
                    out += item(labels, here)
        return bytes(out)


def tick_boot_sector(marker: str = "PVLUN-BOOT", ticks_per_line: int = 3, poweroff_after: int = 0) -> bytes:
    """Return the 512-byte boot sector printing `marker` then a tick counter on COM1; with
    `poweroff_after` N, the guest powers itself off (ACPI S5 on q35) after "tick N"."""
    text = marker.encode("ascii")
    if b"\0" in text or not 1 <= len(text) <= 200:
        raise ValueError("marker must be 1-200 printable ASCII characters")
    if not 1 <= ticks_per_line <= 127:
        raise ValueError("ticks_per_line must be within 1..127")
    if not 0 <= poweroff_after <= 0xFFFF:
        raise ValueError("poweroff_after must be within 0..65535")
    a = _Assembler(ORIGIN)
    # Flat real-mode segments, stack below the boot sector, interrupts on (BIOS timer).
    a.raw(0xFA, 0x31, 0xC0, 0x8E, 0xD8, 0x8E, 0xC0, 0x8E, 0xD0, 0xBC, 0x00, 0x7C, 0xFB)
    a.raw(0xFC)  # cld: lodsb walks forward
    # UART: (port low byte, value) pairs from the table, dh = 0x03.
    a.raw(0xB6, 0x03)  # mov dh, 3
    a.addr16(b"\xBE", "uart_table")  # mov si, uart_table
    a.label("uart_loop")
    a.raw(0xAC, 0x84, 0xC0)  # lodsb ; test al, al
    a.rel8(0x74, "uart_done")  # jz
    a.raw(0x88, 0xC2, 0xAC, 0xEE)  # mov dl, al ; lodsb ; out dx, al
    a.rel8(0xEB, "uart_loop")
    a.label("uart_done")
    a.addr16(b"\xBE", "marker")  # mov si, marker
    a.call("puts")
    a.label("tick_loop")
    a.addr16(b"\xBE", "tick_text")  # mov si, "tick "
    a.call("puts")
    a.addr16(b"\xFF\x06", "counter")  # inc word [counter]
    a.addr16(b"\xA1", "counter")  # mov ax, [counter]
    a.call("print_dec")
    a.addr16(b"\xBE", "crlf")
    a.call("puts")
    if poweroff_after:
        a.addr16(b"\xA1", "counter")  # mov ax, [counter]
        a.raw(0x3D, poweroff_after & 0xFF, poweroff_after >> 8)  # cmp ax, n
        a.rel8(0x75, "wait_start")  # jne
        # ICH9 PM1a_CNT (PMBASE 0x600 + 4): SLP_EN with SLP_TYP 0, QEMU's S5
        a.raw(0xBA, 0x04, 0x06, 0xB8, 0x00, 0x20, 0xEF)  # mov dx, 0x604 ; mov ax, 0x2000 ; out dx, ax
        a.label("wait_start")
    # Wait `ticks_per_line` BIOS ticks (18.2 Hz counter at 0040:006C), halting in between.
    a.raw(0x8B, 0x1E, 0x6C, 0x04)  # mov bx, [0x46C]
    a.label("wait")
    a.raw(0xF4, 0xA1, 0x6C, 0x04, 0x29, 0xD8)  # hlt ; mov ax, [0x46C] ; sub ax, bx
    a.raw(0x83, 0xF8, ticks_per_line)  # cmp ax, n
    a.rel8(0x72, "wait")  # jb wait
    a.rel8(0xEB, "tick_loop")
    # puts: print the NUL-terminated string at si.
    a.label("puts")
    a.raw(0xAC, 0x84, 0xC0)  # lodsb ; test al, al
    a.rel8(0x74, "puts_ret")
    a.call("putc")
    a.rel8(0xEB, "puts")
    a.label("puts_ret")
    a.raw(0xC3)
    # putc: wait for the transmitter holding register to be empty, then send al.
    a.label("putc")
    a.raw(0x50, 0xBA, (COM1 + 5) & 0xFF, COM1 >> 8)  # push ax ; mov dx, LSR
    a.label("putc_wait")
    a.raw(0xEC, 0xA8, 0x20)  # in al, dx ; test al, 0x20
    a.rel8(0x74, "putc_wait")
    a.raw(0x58, 0xBA, COM1 & 0xFF, COM1 >> 8, 0xEE, 0xC3)  # pop ax ; mov dx, THR ; out ; ret
    # print_dec: ax as unsigned decimal.
    a.label("print_dec")
    a.raw(0xBB, 0x0A, 0x00, 0x31, 0xC9)  # mov bx, 10 ; xor cx, cx
    a.label("div_loop")
    a.raw(0x31, 0xD2, 0xF7, 0xF3, 0x52, 0x41, 0x85, 0xC0)  # xor dx,dx; div bx; push dx; inc cx; test ax,ax
    a.rel8(0x75, "div_loop")
    a.label("digit_loop")
    a.raw(0x58, 0x04, 0x30)  # pop ax ; add al, '0'
    a.call("putc")
    a.rel8(0xE2, "digit_loop")  # loop
    a.raw(0xC3)
    # Data.
    a.label("uart_table")  # IER off, DLAB, divisor 1 (115200), 8N1, FIFO, DTR|RTS
    a.raw(0xF9, 0x00, 0xFB, 0x80, 0xF8, 0x01, 0xF9, 0x00, 0xFB, 0x03, 0xFA, 0xC7, 0xFC, 0x03, 0x00)
    a.label("counter")
    a.raw(0x00, 0x00)
    a.label("marker")
    a.raw(b"\r\n" + text + b"\r\n\0")
    a.label("tick_text")
    a.raw(b"tick \0")
    a.label("crlf")
    a.raw(b"\r\n\0")
    code = a.assemble()
    if len(code) > SECTOR - 2:
        raise ValueError("marker too long for one boot sector")
    return code.ljust(SECTOR - 2, b"\0") + b"\x55\xAA"
