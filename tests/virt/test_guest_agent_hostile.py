"""A hostile guest agent: a test peer on the agent channel's socket plays the guest (what a
guest writes reaches us through QEMU unchanged). Whatever it writes — nothing, garbage, endless
or huge lines, stale or malformed replies — a call ends by its deadline with AgentUnavailable or
AgentRefused, holds bounded memory, and a guest is never left frozen."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from typing import Callable

import pytest

from virt.agent_link import AgentLink
from virt.guest_agent import MAX_LINE, MAX_READ, AgentRefused, AgentUnavailable, GuestAgent, parse_reply

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
                conn.sendall(before_sync + b"\xff" + json.dumps({"return": request["arguments"]["id"]}).encode() + b"\n")
            else:
                conn.sendall(reply(request))
    return behave


def timed(call, *args, **kwargs):
    started = time.monotonic()
    try:
        return call(*args, **kwargs), time.monotonic() - started
    except (AgentUnavailable, AgentRefused) as exc:
        return exc, time.monotonic() - started


def test_a_silent_guest_times_out(hostile):
    _, agent = hostile(lambda conn, guest: guest.stop.wait())
    result, took = timed(agent.execute, "guest-ping", timeout=0.5)
    assert isinstance(result, AgentUnavailable) and "no reply in time" in str(result) and not result.sent
    assert 0.4 < took < 1.5
    assert agent.ping(0.3) is False


@pytest.mark.parametrize("garbage", [
    bytes(range(256)) * 64,  # binary, 0xFF delimiters in it
    b"\xff{\"return\": 1}\n\xff{\"return\": \"x\"}\n",  # syncs with the wrong id, endlessly
    b"\xff" * 4096,  # delimiters and nothing else
    b"\n" * 4096,  # empty lines
], ids=["binary", "wrong-sync-ids", "delimiters", "empty-lines"])
def test_a_guest_writing_garbage_endlessly_never_holds_a_call_past_its_deadline(hostile, garbage):
    _, agent = hostile(flood(garbage))
    result, took = timed(agent.execute, "guest-ping", timeout=1.0)
    assert isinstance(result, AgentUnavailable) and took < 2.0
    assert len(agent._buf) <= MAX_LINE + 65536


def test_an_endless_line_is_dropped_as_it_arrives_and_the_read_is_bounded(hostile):
    _, agent = hostile(flood(b"\xff" + b"a" * 65536))  # one line that never ends, after a delimiter
    result, took = timed(agent.execute, "guest-ping", timeout=30)
    assert isinstance(result, AgentUnavailable) and f"first {MAX_READ} bytes" in str(result)
    assert took < 10 and len(agent._buf) <= MAX_LINE + 65536


def test_a_huge_reply_line_is_no_reply(hostile):
    huge = json.dumps({"return": "x" * (4 * MAX_LINE)}).encode() + b"\n"
    guest, agent = hostile(answering(lambda request: huge))
    result, took = timed(agent.execute, "guest-info", timeout=5)
    assert isinstance(result, AgentUnavailable) and result.sent and took < 5.5
    assert "not a guest agent reply" in str(result)


@pytest.mark.parametrize("reply", [
    b'{"return": NaN}\n', b'{"return": {}, "return": 1}\n', b'[' * 50_000 + b'\n', b'{"return": "\xc3\x28"}\n',
    b'"just a string"\n', b'{"neither": 1}\n', b'{"return": 1, "error": {}}\n', b'{"return": 1\n',
], ids=["nan", "duplicate-key", "deep-nesting", "not-utf8", "not-an-object", "neither", "both", "cut-short"])
def test_a_malformed_reply_is_no_reply(hostile, reply):
    guest, agent = hostile(answering(lambda request: reply))
    result, took = timed(agent.execute, "guest-ping", timeout=2)
    assert isinstance(result, AgentUnavailable) and "not a guest agent reply" in str(result) and took < 2.5


def test_strict_json_refuses_what_python_would_accept():
    assert parse_reply(b'{"return": {}}') == {"return": {}}
    for line in (b'{"return": Infinity}', b'{"a": 1, "a": 2}', b"[" * 100_000, b"\xff\xfe", b"1", b""):
        assert parse_reply(line) is None


def test_stale_replies_before_the_sync_are_dropped(hostile):
    stale = b'{"return": "a late freeze"}\n{"error": {"class": "x", "desc": "old"}}\npartial garbage'
    guest, agent = hostile(answering(lambda request: json.dumps({"return": {"answer": request["execute"]}}).encode()
                                     + b"\n", before_sync=stale))
    assert agent.execute("guest-info", timeout=2) == {"answer": "guest-info"}
    assert agent.execute("guest-ping", timeout=2) == {"answer": "guest-ping"}
    assert guest.commands == ["guest-sync-delimited", "guest-info", "guest-sync-delimited", "guest-ping"]


def test_an_error_reply_is_refused_with_its_text_bounded_and_printable(hostile):
    desc = "\x1b[31mrm -rf /\x00" + "A" * 10_000
    _, agent = hostile(answering(lambda request: json.dumps({"error": {"class": "GenericError",
                                                                       "desc": desc}}).encode() + b"\n"))
    with pytest.raises(AgentRefused) as refused:
        agent.execute("guest-fsfreeze-freeze", timeout=2)
    text = str(refused.value)
    assert text.startswith("guest-fsfreeze-freeze: ?[31mrm -rf /?AAA") and len(text) < 160 and text.isprintable()


def test_a_guest_that_hangs_up_is_reconnected_to(hostile):
    def hang_up_first(conn: socket.socket, guest: HostileGuest) -> None:
        if len(guest.connections) == 1:
            conn.close()
            return
        answering(lambda request: b'{"return": {}}\n')(conn, guest)

    guest, agent = hostile(hang_up_first)
    result, _ = timed(agent.execute, "guest-ping", timeout=2)
    assert isinstance(result, AgentUnavailable)
    assert agent.execute("guest-ping", timeout=2) == {}
    assert len(guest.connections) == 2


def test_no_agent_socket_at_all_is_unavailable_at_once(tmp_path):
    result, took = timed(GuestAgent(str(tmp_path / "none.sock")).execute, "guest-ping", timeout=5)
    assert isinstance(result, AgentUnavailable) and "no agent channel" in str(result) and took < 0.5


def test_a_freeze_whose_reply_never_comes_is_false_in_time_and_thawed_once_the_agent_answers(hostile):
    """The agent takes guest-fsfreeze-freeze and stalls: freeze_filesystems says False by its
    deadline, and the link thaws the guest as soon as the agent answers again."""
    answered = threading.Event()

    def stalls_on_freeze(request: dict) -> bytes:
        if request["execute"] == "guest-fsfreeze-freeze":
            return b""  # never answered
        answered.set()
        return b'{"return": {}}\n'

    guest, agent = hostile(answering(stalls_on_freeze))
    link = AgentLink(agent.path, port_open=None, name="hostile")
    link.agent = agent
    try:
        result, took = timed(link.freeze, 1.0)
        assert result is False and took < 1.5
        link.start()  # the watch pings; the agent answers; the possible freeze is undone
        deadline = time.monotonic() + 10
        while "guest-fsfreeze-thaw" not in guest.commands and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "guest-fsfreeze-thaw" in guest.commands
        assert guest.commands.index("guest-fsfreeze-thaw") > guest.commands.index("guest-fsfreeze-freeze")
    finally:
        link.close()


def test_a_freeze_answered_with_a_non_count_is_refused_and_thawed(hostile):
    guest, agent = hostile(answering(lambda request: b'{"return": "frozen, trust me"}\n'
                                     if request["execute"] == "guest-fsfreeze-freeze" else b'{"return": 0}\n'))
    link = AgentLink(agent.path, port_open=None, name="hostile")
    link.agent = agent
    with pytest.raises(AgentRefused, match="not a count"):
        link.freeze(2.0)
    assert guest.commands[-1] == "guest-fsfreeze-thaw"
    link.close()


def test_a_guest_without_the_port_open_is_never_pinged(hostile):
    guest, agent = hostile(answering(lambda request: b'{"return": {}}\n'))
    reports = []
    link = AgentLink(agent.path, lambda c, i: reports.append(c), port_open=False, name="closed")
    link.agent = agent
    link.start()
    try:
        time.sleep(0.5)
        assert guest.commands == [] and reports == [] and link.connected() is False
        link.port_changed(True)  # the guest's agent opened the port: pinged at once, reported once
        deadline = time.monotonic() + 5
        while reports != [True] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert reports == [True] and "guest-get-osinfo" in guest.commands
    finally:
        link.close()
    assert reports == [True, False]
    assert os.path.exists(agent.path)  # the channel's socket is QEMU's to remove, not the client's
