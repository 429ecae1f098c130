"""A hostile guest agent for tests: a unix socket server standing in for QEMU's end of the agent
channel, behaving as a test tells it (what a guest writes reaches us through QEMU unchanged)."""

from __future__ import annotations

import json
import socket
import threading
import time
from typing import Callable

import pytest

from virt.guest_agent import AgentRefused, AgentUnavailable, GuestAgent

Behaviour = Callable[[socket.socket, "HostileGuest"], None]


class HostileGuest:
    """A unix socket server standing in for QEMU's end of the agent channel; each connection is
    handed to `behaviour` in a thread. Everything ends when the test does."""

    def __init__(self, path: str, behaviour: Behaviour):
        self.behaviour = behaviour
        self.commands: list[str] = []  # what the client asked, in order
        self.stop = threading.Event()
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(path)
        self.server.listen(4)
        self.connections: list[socket.socket] = []
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            if self.stop.is_set():
                conn.close()
                return
            self.connections.append(conn)
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            self.behaviour(conn, self)
        except OSError:
            pass  # the client went away

    def requests(self, conn: socket.socket):
        """The client's requests, parsed (its 0xFF resets dropped), recorded in `commands`."""
        buf = b""
        while not self.stop.is_set():
            data = conn.recv(65536)
            if not data:
                return
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                request = json.loads(line.replace(b"\xff", b""))
                self.commands.append(request["execute"])
                yield request

    def close(self) -> None:
        self.stop.set()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as wake:  # accept() returns, sees stop
            wake.connect(self.server.getsockname())
        self.server.close()
        for conn in self.connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()
        for thread in self.threads:
            thread.join(5)


@pytest.fixture
def hostile(tmp_path):
    made: list[HostileGuest] = []
    path = str(tmp_path / "ga.sock")
    assert len(path.encode()) < 108

    def make(behaviour: Behaviour) -> tuple[HostileGuest, GuestAgent]:
        guest = HostileGuest(path, behaviour)
        agent = GuestAgent(path)
        made.append((guest, agent))
        return guest, agent

    yield make
    for guest, agent in made:
        agent.close()
        guest.close()


def flood(data: bytes) -> Behaviour:
    """Writes `data` over and over, never reading: as fast as the client takes it."""
    def behave(conn: socket.socket, guest: HostileGuest) -> None:
        while not guest.stop.is_set():
            conn.sendall(data)
    return behave


def answering(reply: Callable[[dict], bytes], before_sync: bytes = b"") -> Behaviour:
    """An agent that answers the sync properly (after `before_sync`) and every other command
    with `reply(request)`."""
    def behave(conn: socket.socket, guest: HostileGuest) -> None:
        for request in guest.requests(conn):
            if request["execute"] == "guest-sync-delimited":
                sync = json.dumps({"return": request["arguments"]["id"]}).encode()
                conn.sendall(before_sync + b"\xff" + sync + b"\n")
            else:
                conn.sendall(reply(request))
    return behave


def timed(call, *args, **kwargs):
    started = time.monotonic()
    try:
        return call(*args, **kwargs), time.monotonic() - started
    except (AgentUnavailable, AgentRefused) as exc:
        return exc, time.monotonic() - started
