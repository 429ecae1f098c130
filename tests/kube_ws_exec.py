"""TEST DOUBLE part: the API server's pods/exec over a websocket, as the kubernetes client
speaks it — the HTTP/1.1 upgrade (RFC 6455 handshake, subprotocol v5.channel.k8s.io or
v4.channel.k8s.io, the first the client offers that we know), then binary frames whose first
byte is the channel: 0 stdin (client → server), 1 stdout, 2 stderr, 3 the error channel
(one metav1.Status: Success, or Failure with reason NonZeroExitCode and the exit code as a
cause of reason ExitCode), and in v5 the close signal [255, channel] (the client's end of
stdin). The server ends with a close frame after the Status, as the API server does.

There is no container: the test says how to play the command (`ExecRunner`: the Pod, the
container, the argv → a local argv, run as a subprocess; None: "executable file not found").
Never imported by the product.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
import subprocess
import threading
from typing import Any, BinaryIO, Callable

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 section 1.3
PROTOCOLS = ("v5.channel.k8s.io", "v4.channel.k8s.io")
STDIN, STDOUT, STDERR, ERROR, CLOSE = 0, 1, 2, 3, 255
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
FRAME_LIMIT = 16 << 20
CLOSE_WAIT = 5.0  # seconds the server waits for the client's close frame

ExecRunner = Callable[[dict, str, list[str]], "list[str] | None"]


def accept_key(key: str) -> str:
    return base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()


def choose_protocol(offered: str) -> str | None:
    wanted = [p.strip() for p in offered.split(",") if p.strip()]
    return next((p for p in wanted if p in PROTOCOLS), None)


def send_frame(out: BinaryIO, opcode: int, payload: bytes) -> None:
    """One unmasked, unfragmented frame (a server's frames are never masked)."""
    head = bytes([0x80 | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([n])
    elif n < 1 << 16:
        head += bytes([126]) + struct.pack("!H", n)
    else:
        head += bytes([127]) + struct.pack("!Q", n)
    out.write(head + payload)
    out.flush()


def _exactly(stream: BinaryIO, n: int) -> bytes:
    data = stream.read(n) if n else b""
    if len(data) != n:
        raise ConnectionError("the client closed the connection")
    return data


def read_message(stream: BinaryIO) -> tuple[int, bytes]:
    """One message from the client: (opcode, payload), continuation frames joined, unmasked.
    A client's frames must be masked (RFC 6455 5.1)."""
    opcode, payload = None, b""
    while True:
        first, second = _exactly(stream, 2)
        fin, op = first & 0x80, first & 0x0F
        if not second & 0x80:
            raise ConnectionError("an unmasked frame from the client")
        n = second & 0x7F
        if n == 126:
            n = struct.unpack("!H", _exactly(stream, 2))[0]
        elif n == 127:
            n = struct.unpack("!Q", _exactly(stream, 8))[0]
        if n > FRAME_LIMIT:
            raise ConnectionError("a frame larger than the double takes")
        mask = _exactly(stream, 4)
        data = bytes(b ^ mask[i % 4] for i, b in enumerate(_exactly(stream, n)))
        if op >= OP_CLOSE:  # control frames may come between fragments
            return op, data
        opcode = op if opcode is None else opcode
        payload += data
        if fin:
            return opcode, payload


def status_success() -> dict:
    return {"metadata": {}, "status": "Success"}


def status_exit(code: int, argv: list[str]) -> dict:
    """What the API server puts on the error channel for a command that exited non-zero."""
    return {"metadata": {}, "status": "Failure", "reason": "NonZeroExitCode",
            "message": f"command terminated with non-zero exit code: error executing command {argv}, "
                       f"exit code {code}",
            "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]}}


def status_not_found(argv: list[str]) -> dict:
    text = (f"error executing command in container: failed to exec in container: exec: \"{argv[0]}\": "
            "executable file not found in $PATH: unknown")
    return {"metadata": {}, "status": "Failure", "reason": "InternalError", "code": 500,
            "message": f"Internal error occurred: {text}", "details": {"causes": [{"message": text}]}}


class ExecSession:
    """One exec stream after the upgrade: the local command's stdio pumped through the channels."""

    def __init__(self, rfile: BinaryIO, wfile: BinaryIO, protocol: str):
        self.rfile, self.wfile, self.protocol = rfile, wfile, protocol
        self._lock = threading.Lock()
        self._closed = threading.Event()  # the client's close frame came (or its connection went)
        self._sent_close = False

    def send(self, opcode: int, payload: bytes) -> None:
        with self._lock:
            if self._sent_close:
                return
            try:
                send_frame(self.wfile, opcode, payload)
            except OSError:
                self._closed.set()
            if opcode == OP_CLOSE:
                self._sent_close = True

    def _pump_out(self, pipe: BinaryIO, channel: int) -> None:
        while chunk := os.read(pipe.fileno(), 65536):
            self.send(OP_BINARY, bytes([channel]) + chunk)

    def _pump_in(self, proc: subprocess.Popen | None) -> None:
        """Client frames: stdin data, v5's close of stdin, pings, the close handshake."""
        try:
            while True:
                opcode, data = read_message(self.rfile)
                if opcode == OP_CLOSE:
                    self.send(OP_CLOSE, data[:2])
                    return
                if opcode == OP_PING:
                    self.send(OP_PONG, data)
                elif opcode in (OP_BINARY, OP_TEXT) and data and proc is not None and proc.stdin is not None:
                    if data[0] == CLOSE and self.protocol.startswith("v5") and data[1:2] == bytes([STDIN]):
                        proc.stdin.close()
                    elif data[0] == STDIN and not proc.stdin.closed:
                        try:
                            proc.stdin.write(data[1:])
                            proc.stdin.flush()
                        except (BrokenPipeError, ValueError):
                            pass
        except (ConnectionError, OSError):
            pass
        finally:
            self._closed.set()
            if proc is not None and proc.poll() is None:
                proc.kill()  # the client went away: nothing reads the command any more

    def run(self, local: list[str] | None, argv: list[str], stdin: bool) -> None:
        proc = None
        if local is not None:
            proc = subprocess.Popen(local, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        reader = threading.Thread(target=self._pump_in, args=(proc,), name="double-exec-in", daemon=True)
        reader.start()
        if proc is None:
            status: dict[str, Any] = status_not_found(argv)
        else:
            pumps = [threading.Thread(target=self._pump_out, args=(pipe, channel), daemon=True)
                     for pipe, channel in ((proc.stdout, STDOUT), (proc.stderr, STDERR))]
            for pump in pumps:
                pump.start()
            code = proc.wait()
            for pump in pumps:
                pump.join()
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                if pipe is not None:
                    try:
                        pipe.close()
                    except OSError:
                        pass
            status = status_success() if code == 0 else status_exit(code if code > 0 else 128 - code, argv)
        self.send(OP_BINARY, bytes([ERROR]) + json.dumps(status).encode())
        self.send(OP_CLOSE, struct.pack("!H", 1000))
        self._closed.wait(CLOSE_WAIT)
