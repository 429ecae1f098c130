"""One VM's guest agent as its launcher sees it: is it there, what OS is it, freeze and thaw.

Cheap by design: QEMU tells us (QMP event VSERPORT_CHANGE) when the guest opens or closes the
agent's port, so a guest without an agent costs nothing — one sleeping thread, never a ping.
While the port is open the agent is pinged every PING_INTERVAL seconds (each ping one short
round trip with a deadline), and a change — it answers now, or no longer — is reported once,
with the guest's OS (guest-get-osinfo) when it comes. A migration target starts not knowing
whether the port is open (the guest opened it on the source) and pings until it knows.

Freezing (guest-fsfreeze-freeze) is for a VM snapshot's instant. A guest is never left frozen by
us: a freeze whose reply is late is thawed as soon as the agent takes commands again, and a
freeze nobody thaws is thawed after AUTO_THAW_SECONDS (KubeVirt's launcher does the same).
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from virt.guest_agent import AgentRefused, AgentUnavailable, GuestAgent

log = logging.getLogger("pvlun.virt")
PING_INTERVAL = 10.0  # seconds between pings while the agent answers
RETRY_INTERVAL = 1.0  # while the agent does not answer yet, doubling up to PING_INTERVAL
PING_TIMEOUT = 1.0
THAW_TIMEOUT = 10.0
AUTO_THAW_SECONDS = 300.0

# (connected, guest-get-osinfo's reply or None) — called from the link's own thread; False
# back means "not taken now" (a migration target not yet the VMI's): told again at the next ping
AgentReport = Callable[[bool, "dict | None"], "bool | None"]


class AgentLink:
    def __init__(self, path: str, report: AgentReport | None = None, *, port_open: bool | None = False,
                 name: str = "vm"):
        self.agent = GuestAgent(path)
        self.report = report
        self.name = name
        self._port_open = port_open  # None: not known (a migration target)
        self._connected = False
        self._frozen = False  # frozen by us, or perhaps (a freeze whose reply never came)
        self._thaw_timer: threading.Timer | None = None
        self._freeze_lock = threading.Lock()
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ presence

    def start(self) -> None:
        self._thread = threading.Thread(target=self._watch, name=f"agent-{self.name}", daemon=True)
        self._thread.start()

    def port_changed(self, opened: bool) -> None:
        """From QMP's VSERPORT_CHANGE (the event thread: never blocks)."""
        self._port_open = opened
        self._wake.set()

    def connected(self) -> bool:
        """True when the agent answers guest-ping now (a short round trip; no ping at all when
        the guest has its port closed)."""
        return self._port_open is not False and bool(self.agent.ping(PING_TIMEOUT))

    def close(self) -> None:
        """QEMU is gone: stop watching, report the agent gone, drop the connection."""
        self._stopped.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(PING_TIMEOUT + 5)
        if self._thaw_timer is not None:
            self._thaw_timer.cancel()
        self.agent.close()
        if self._connected:
            self._connected = False
            self._report(False, None)

    def _watch(self) -> None:
        retry = RETRY_INTERVAL
        while not self._stopped.is_set():
            self._wake.clear()  # a change from now on ends the wait below at once
            port = self._port_open
            answers = port is not False and self.agent.ping(PING_TIMEOUT, busy=None)
            if answers is None:  # a freeze or another command holds the channel: no news
                self._wake.wait(PING_TIMEOUT)
                continue
            if self._stopped.is_set():
                return
            if not answers and port is not False:
                self.agent.close()  # our unanswered syncs are not left queued for an agent that comes later
            if answers != self._connected and self._report(answers, self._os_info() if answers else None):
                self._connected = answers
            if answers and self._frozen and self._thaw_timer is None:
                self.thaw()  # a freeze whose reply came too late
            if answers:
                wait, retry = PING_INTERVAL, RETRY_INTERVAL
            else:
                wait, retry = (None if port is False else retry), min(retry * 2, PING_INTERVAL)
            if self._wake.wait(wait):
                retry = RETRY_INTERVAL  # the port opened or closed: look again soon

    def _os_info(self) -> dict | None:
        try:
            info = self.agent.execute("guest-get-osinfo", timeout=2.0)
        except (AgentUnavailable, AgentRefused):
            return None  # an older agent, or a guest that blocks the command
        return info if isinstance(info, dict) else None

    def _report(self, connected: bool, info: dict | None) -> bool:
        """Tell `report`; False when it did not take the news (told again at the next ping)."""
        if self.report is None:
            return True
        try:
            return self.report(connected, info) is not False
        except Exception:  # noqa: BLE001 - a reporting failure must not end the watch
            log.exception("VM %s: reporting the guest agent failed", self.name)
            return False

    # ------------------------------------------------------------ freeze

    def freeze(self, timeout: float) -> bool:
        """Freeze the guest's filesystems: True once the agent says they are frozen, False when no
        agent answers within `timeout` seconds. AgentRefused when the agent answered with an error
        (it thaws what it froze before failing)."""
        with self._freeze_lock:
            try:
                frozen = self.agent.execute("guest-fsfreeze-freeze", timeout=timeout)
            except AgentUnavailable as exc:
                if exc.sent:  # the agent took the command: its late freeze is undone when it answers again
                    self._frozen = True
                    self._wake.set()
                log.info("VM %s: no guest agent froze the filesystems: %s", self.name, exc)
                return False
            if type(frozen) is not int or frozen < 0:
                self._frozen = True
                self._thaw_locked()
                raise AgentRefused("guest-fsfreeze-freeze: the agent's reply is not a count of filesystems")
            self._frozen = True
            self._thaw_timer = threading.Timer(AUTO_THAW_SECONDS, self.thaw)
            self._thaw_timer.daemon = True
            self._thaw_timer.start()
            return True

    def thaw(self) -> None:
        """Thaw what we froze (nothing to do when we froze nothing); never raises."""
        with self._freeze_lock:
            self._thaw_locked()

    def _thaw_locked(self) -> None:
        if self._thaw_timer is not None:
            self._thaw_timer.cancel()
            self._thaw_timer = None
        if not self._frozen:
            return
        try:
            self.agent.execute("guest-fsfreeze-thaw", timeout=THAW_TIMEOUT)
            self._frozen = False
        except AgentRefused as exc:  # not frozen after all
            log.info("VM %s: %s", self.name, exc)
            self._frozen = False
        except AgentUnavailable as exc:  # thawed when the agent answers again (the watch)
            log.warning("VM %s: the guest stays frozen until its agent answers: %s", self.name, exc)
