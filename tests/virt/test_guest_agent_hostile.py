"""A hostile guest agent: a test peer on the agent channel's socket plays the guest (what a
guest writes reaches us through QEMU unchanged). Whatever it writes — nothing, garbage, endless
or huge lines, stale or malformed replies — a call ends by its deadline with AgentUnavailable or
AgentRefused, holds bounded memory, and a guest is never left frozen."""

from __future__ import annotations

import json
import socket

import pytest

from hostile_agent import HostileGuest, answering, flood, hostile, timed  # noqa: F401 - hostile is a fixture
from virt.guest_agent import MAX_LINE, MAX_READ, AgentRefused, AgentUnavailable, GuestAgent, parse_reply


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
