"""What a command run in a Pod's container (the API server's pods/exec) gives back, without
the client that ran it: the controller reaches a launcher this way, as virt-handler reaches
its virt-launcher, and the reconcile functions see only `PodExec` (ctx.services["pod_exec"],
KubeStore.exec on a cluster) — never the kubernetes client.

The exit code travels as a metav1.Status on the exec stream's error channel (3): "Success",
or "Failure" with reason NonZeroExitCode and a cause of reason ExitCode whose message is the
number. Any other Failure (no such executable, the container gone) is the API server's
refusal, not the command's answer. Output is kept to a bound: a command in a Pod is another
party, and what it prints must not fill the controller's memory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Protocol

from controlplane.kube_kinds import ApiError
from controlplane.user_text import one_line

OUTPUT_LIMIT = 1 << 20  # bytes kept of each of stdout and stderr
EXEC_TIMEOUT = 60.0


@dataclass(frozen=True)
class ExecResult:
    code: int  # the command's exit code
    stdout: bytes
    stderr: bytes
    truncated: bool = False  # output beyond OUTPUT_LIMIT was dropped


class PodExec(Protocol):
    def __call__(self, namespace: str, pod: str, container: str, argv: list[str], stdin: bytes | None = None,
                 timeout: float = EXEC_TIMEOUT) -> ExecResult: ...


class BoundedOutput:
    """One output stream of a command, kept up to `limit` bytes."""

    def __init__(self, limit: int = OUTPUT_LIMIT):
        self.limit, self.data, self.dropped = limit, bytearray(), False

    def add(self, chunk: bytes) -> None:
        room = self.limit - len(self.data)
        if len(chunk) > room:
            self.dropped = True
        self.data += chunk[:max(room, 0)]


def exit_code(raw: bytes | str, where: str) -> int:
    """The exit code a pods/exec error-channel Status says; ApiError when it is no exit code
    (the API server or the kubelet refused to run the command), one line naming `where`."""
    try:
        status = json.loads(raw)
    except ValueError:
        status = None
    if not isinstance(status, dict):
        raise ApiError(0, "NoStatus", f"exec in {where}: the stream ended without an exit status")
    if status.get("status") == "Success":
        return 0
    causes = (status.get("details") or {}).get("causes") if isinstance(status.get("details"), dict) else None
    for cause in causes if isinstance(causes, list) else []:
        text = cause.get("message") if isinstance(cause, dict) and cause.get("reason") == "ExitCode" else None
        if isinstance(text, str) and text.isascii() and text.isdigit() and len(text) <= 3:
            return int(text)
    message = status.get("message") if isinstance(status.get("message"), str) else "no message"
    reason = status.get("reason") if isinstance(status.get("reason"), str) else "Failure"
    code = status.get("code") if isinstance(status.get("code"), int) else 500
    raise ApiError(code, one_line(reason, 64), f"exec in {where}: {one_line(message, 300)}")
