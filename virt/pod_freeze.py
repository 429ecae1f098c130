"""A guest's filesystems frozen for a VM snapshot on a cluster, from inside its launcher Pod.

On a cluster the controller reaches a running guest only through its launcher Pod (pods/exec),
as KubeVirt's virt-controller reaches it through virt-handler and virt-launcher: it runs
`pvlun launch-freeze` in the Pod's `compute` container, which asks the launcher (its order
socket, virt/pod_migration.py's ControlServer) to freeze the guest's filesystems through the
QEMU guest agent (`guest-fsfreeze-freeze`), then creates the VolumeSnapshots, waits until each
is cut, and runs `pvlun launch-freeze --thaw`.

The freeze is always undone: the launcher thaws by itself once `--unfreeze-timeout` seconds
have passed (KubeVirt's unfreezeTimeout, 5 minutes by default), so a controller that dies
between the two commands cannot leave the guest frozen; the guest agent link's own auto-thaw
(virt/agent_link.py) stands behind that. Without an agent nothing is frozen or paused (the
reply says NoGuestAgent, as KubeVirt does: a crash-consistent snapshot), a guest paused by
its user stays paused (Paused), an agent that refuses says QuiesceFailed.
"""

from __future__ import annotations

import json
import threading

from virt.agent_link import AUTO_THAW_SECONDS
from virt.guest_agent import AgentRefused
from virt.launcher import Phase, VmLauncher
from virt.pod_layout import RUN_DIR

DEFAULT_UNFREEZE_TIMEOUT = 300.0  # seconds (KubeVirt's default unfreezeTimeout, 5m)
FREEZE_TIMEOUT = 5.0  # seconds an agent may take to answer the freeze (then: NoGuestAgent)
INDICATIONS = ("GuestAgent", "NoGuestAgent", "QuiesceFailed", "Paused")
REPLY_LIMIT = 4096  # bytes of launch-freeze's output looked at


class Freezer:
    """The launcher's side: one freeze at a time, thawed by `thaw` or by its deadline."""

    def __init__(self, launcher: VmLauncher):
        self.launcher = launcher
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None

    def freeze(self, unfreeze_timeout: float) -> dict:
        """{"frozen": bool, "indication": one of INDICATIONS}."""
        if not 0 < unfreeze_timeout <= AUTO_THAW_SECONDS:
            raise ValueError(f"the unfreeze timeout must be within 0..{AUTO_THAW_SECONDS:g} s")
        with self._lock:
            if self.launcher.phase is Phase.PAUSED:
                return {"frozen": False, "indication": "Paused"}  # nothing writes; the agent cannot answer
            if self.launcher.phase is not Phase.RUNNING:
                raise ValueError(f"the guest is not running (phase {self.launcher.phase.value})")
            try:
                frozen = self.launcher.freeze_filesystems(FREEZE_TIMEOUT)
            except AgentRefused:  # it thawed what it froze
                return {"frozen": False, "indication": "QuiesceFailed"}
            if frozen:
                self._cancel_timer()
                self._timer = threading.Timer(unfreeze_timeout, self.thaw)
                self._timer.daemon = True
                self._timer.start()
            return {"frozen": frozen, "indication": "GuestAgent" if frozen else "NoGuestAgent"}

    def thaw(self) -> dict:
        """Thaw what was frozen (nothing to do otherwise); never raises."""
        with self._lock:
            self._cancel_timer()
            self.launcher.thaw_filesystems()
        return {"thawed": True}

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def order(self, request: dict) -> dict:
        """A `freeze` or `thaw` order of the launcher's order socket, its reply."""
        if request.get("command") == "thaw":
            return self.thaw()
        timeout = request.get("unfreezeTimeout", DEFAULT_UNFREEZE_TIMEOUT)
        if type(timeout) not in (int, float):
            raise ValueError("unfreezeTimeout must be a number of seconds")
        return self.freeze(float(timeout))


def freeze_command(unfreeze_timeout: float = DEFAULT_UNFREEZE_TIMEOUT) -> list[str]:
    """What the controller runs in the launcher Pod to freeze its guest."""
    return ["pvlun", "launch-freeze", "--run-dir", RUN_DIR, "--unfreeze-timeout", f"{unfreeze_timeout:g}"]


def thaw_command() -> list[str]:
    return ["pvlun", "launch-freeze", "--run-dir", RUN_DIR, "--thaw"]


def read_freeze(stdout: bytes) -> tuple[bool, str]:
    """(frozen, indication) from launch-freeze's last line; ValueError when it said nothing usable."""
    lines = stdout[-REPLY_LIMIT:].decode(errors="replace").strip().splitlines()
    try:
        reply = json.loads(lines[-1]) if lines else None
    except ValueError:
        reply = None
    if not isinstance(reply, dict) or type(reply.get("frozen")) is not bool or reply.get("indication") not in INDICATIONS:
        raise ValueError("launch-freeze printed no freeze result")
    return reply["frozen"], reply["indication"]
