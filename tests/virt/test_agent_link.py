"""AgentLink, one VM's guest agent as its launcher sees it, against a hostile test agent: a
guest without its port open is never pinged, a late freeze is thawed, a refused report is told
again, and a long command on the channel is no reason to call the agent gone."""

from __future__ import annotations

import os
import threading
import time

import pytest

from kube_fixtures import wait_until
from hostile_agent import answering, hostile, timed  # noqa: F401 - hostile is a fixture
from virt import agent_link
from virt.agent_link import AgentLink
from virt.guest_agent import AgentRefused


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
        wait_until(lambda: "guest-fsfreeze-thaw" in guest.commands)
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
        wait_until(lambda: reports == [True])
        assert "guest-get-osinfo" in guest.commands
    finally:
        link.close()
    assert reports == [True, False]
    assert os.path.exists(agent.path)  # the channel's socket is QEMU's to remove, not the client's


def test_a_report_not_taken_is_told_again(hostile, monkeypatch):
    """A migration's target sees the agent before it is the VMI's launcher: the runtime does not
    take its report, and the link tells it again at a later ping."""
    monkeypatch.setattr(agent_link, "PING_INTERVAL", 0.2)
    guest, agent = hostile(answering(lambda request: b'{"return": {}}\n'))
    taken = threading.Event()
    reports = []

    def report(connected, info):
        reports.append(connected)
        return taken.is_set()

    link = AgentLink(agent.path, report, port_open=None, name="target")
    link.agent = agent
    link.start()
    try:
        wait_until(lambda: len(reports) >= 2)
        assert set(reports) == {True}
        taken.set()
        count = len(reports)
        time.sleep(1)
        assert count <= len(reports) <= count + 1  # told until taken, then not again
    finally:
        link.close()
    assert reports[-1] is False


def test_a_long_command_on_the_channel_is_not_the_agent_gone(hostile, monkeypatch):
    """While a freeze holds the channel the watch's pings find it busy: that is no news, so the
    agent is not reported gone nor its connection dropped."""
    monkeypatch.setattr(agent_link, "PING_INTERVAL", 0.1)
    release = threading.Event()

    def slow_freeze(request: dict) -> bytes:
        if request["execute"] == "guest-fsfreeze-freeze":
            release.wait(10)
            return b'{"return": 1}\n'
        return b'{"return": {}}\n'

    guest, agent = hostile(answering(slow_freeze))
    reports = []
    link = AgentLink(agent.path, lambda c, i: reports.append(c), port_open=True, name="busy")
    link.agent = agent
    link.start()
    try:
        wait_until(lambda: reports == [True])
        threading.Timer(2.5, release.set).start()  # the freeze takes longer than a ping's timeout
        assert link.freeze(10) is True
        assert reports == [True] and len(guest.connections) == 1
        link.thaw()
        assert guest.commands[-1] == "guest-fsfreeze-thaw"
    finally:
        release.set()
        link.close()



def test_a_freeze_nobody_thaws_is_thawed_after_the_auto_thaw_time(hostile, monkeypatch):
    monkeypatch.setattr(agent_link, "AUTO_THAW_SECONDS", 0.3)
    guest, agent = hostile(answering(lambda request: b'{"return": 1}\n'))
    link = AgentLink(agent.path, port_open=True, name="forgotten")
    link.agent = agent
    try:
        assert link.freeze(2) is True and guest.commands[-1] == "guest-fsfreeze-freeze"
        wait_until(lambda: guest.commands[-1] == "guest-fsfreeze-thaw", 5)
        link.thaw()  # already thawed: nothing is sent
        assert guest.commands.count("guest-fsfreeze-thaw") == 1
    finally:
        link.close()
