"""Cluster mode: one live migration carried out between two launcher Pods, as a job of the
controller (ctx.jobs, keyed `migration:<ns>/<vmi>`), so the reconcile loop never waits on it.

What virt-handler does for KubeVirt, the controller does here through the API server: it runs
the pre hooks, then `pvlun launch-migrate` in the source Pod's `compute` container
(pods/exec, ctx.services["pod_exec"]) with the shared token on its stdin — never in an argv,
a log, an event or a status — and reads the one JSON line it prints. Succeeded: the VMI's
node, address and active Pod become the target's (its `migrationState` completed), the
finished source Pod is deleted, the post hooks run. Failed: the target Pod is deleted, the
source runs on and the VMI stays Running there, the failed hooks run. A cancel (the migration
deleted) aborts the stream in the source (`launch-migrate --cancel`). When the outcome is not
known — the exec broke, the controller restarted mid-stream — the stream is aborted if it
still runs and the Pods say where the guest is: a source launcher that ended while the target
runs means the guest moved; anything else keeps it on the source.

Hooks are the controller's own (`pvlun controller --migration-hook EVENT=COMMAND`, argv, no
shell, run by host/command.py in the controller's container, as virt/hooks.py runs them).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from controlplane.context import Context
from controlplane.kube_kinds import ApiError
from controlplane.store import Conflict, Obj
from controlplane.user_text import one_line, user_text
from controlplane.vm_spec import SpecError
from virt.hooks import HookContext, HookError, MigrationHooks
from virt.live_migration import register_user_hooks
from virt.migration import MigrationFailed
from virt.migration_status import ended_state, phase_fields, read_cancel, read_result, vmi_on_target
from virt.pod_migration import MIGRATION_TIMEOUT
from virt.pod_status import launch_migrate_cancel_command, launch_migrate_command, launcher_status
from virt.pods import CONTAINER, vmi_spec

log = logging.getLogger("pvlun.virt")
VMIM, VMI = "VirtualMachineInstanceMigration", "VirtualMachineInstance"
STREAM_TIMEOUT = MIGRATION_TIMEOUT + 90  # the exec of launch-migrate: the launcher's own limit, and its report
ABORT_TIMEOUT = 20.0
SETTLE_SECONDS = 20.0  # how long a source launcher may take to end after its guest moved


class OutcomeUnknown(RuntimeError):
    """The stream may have run, but nothing said how it ended."""


def job_key(namespace: str, vmi_name: str) -> str:
    return f"migration:{namespace}/{vmi_name}"


def running_jobs(ctx: Context) -> dict[str, str]:
    """Job key → the uid of the migration its job carries out (a VMI migrates once at a time)."""
    return ctx.services.setdefault("pod_migrations", {})


def delete_quietly(ctx: Context, kind: str, name: str, ns: str) -> None:
    """Delete what the migration made; a failure is logged (the ownerReference to the
    migration lets Kubernetes' garbage collector finish it)."""
    try:
        ctx.store.delete(kind, name, ns)
    except ApiError as exc:
        log.warning("cannot delete %s %s/%s: %s", kind, ns, name, exc)


def set_phase(ctx: Context, mig: Obj, phase: str, **fields) -> None:
    meta = mig["metadata"]
    ns = meta.get("namespace", "default")
    current = ctx.store.get(VMIM, meta["name"], ns)
    if current is not None:
        ctx.store.merge_status(VMIM, meta["name"], ns, **phase_fields(current.get("status") or {}, phase,
                                                                       time.time(), **fields))


def _exec(ctx: Context) -> Callable[..., object]:
    pod_exec = ctx.services.get("pod_exec")
    if pod_exec is None:
        raise MigrationFailed("the controller cannot run commands in Pods (no pods/exec client)")
    return pod_exec


def abort(ctx: Context, ns: str, source: str) -> bool:
    """Ask the source launcher to cancel its stream; True when one was running. Best effort:
    the target Pod's deletion ends a stream that could not be reached."""
    try:
        done = _exec(ctx)(ns, source, CONTAINER, launch_migrate_cancel_command(), timeout=ABORT_TIMEOUT)
        said = read_cancel(done.stdout)
        log.info("migration from %s/%s: abort asked, %s", ns, source, "aborted" if said else "none was running")
        return said
    except (ApiError, MigrationFailed, ValueError) as exc:
        log.warning("migration from %s/%s: cannot ask for an abort: %s", ns, source, exc)
        return False


def stream(ctx: Context, ns: str, source: str, address: str, token: str, cancel: threading.Event) -> dict:
    """`launch-migrate` in the source Pod, its result (read_result); a cancel meanwhile asks
    the source to abort. OutcomeUnknown when nothing came back to say how it ended."""
    pod_exec = _exec(ctx)
    argv = launch_migrate_command(address, token_on_stdin=True)
    box: dict = {}

    def run() -> None:
        try:
            box["done"] = pod_exec(ns, source, CONTAINER, argv, stdin=token.encode() + b"\n", timeout=STREAM_TIMEOUT)
        except Exception as exc:  # noqa: BLE001 - handed to the job's thread below
            box["error"] = exc

    thread = threading.Thread(target=run, name=f"exec-{source}"[:15], daemon=True)
    thread.start()
    aborted = False
    while thread.is_alive():
        thread.join(0.2)
        if cancel.is_set() and not aborted:
            aborted = True
            abort(ctx, ns, source)
    if "error" in box:
        raise OutcomeUnknown(user_text(box["error"]))
    said = read_result(box["done"].stdout)
    if said is None:
        text = one_line(box["done"].stderr.decode(errors="replace"), 300) or "no output"
        raise OutcomeUnknown(f"launch-migrate in {source} exited {box['done'].code}: {text}")
    return said


def settle(ctx: Context, ns: str, state: dict, why: str) -> dict:
    """Where the guest is when the stream's end was not seen: a stream the source still sent is
    aborted (Failed); else wait for the source launcher — ended (the guest moved; its QEMU quits
    only then) while the target runs: Succeeded; still running, or the target gone: Failed."""
    source, target = state.get("sourcePod", ""), state.get("targetPod", "")
    if source and abort(ctx, ns, source):
        return {"phase": "Failed", "error": f"{why} (aborted: the guest stays on the source)"}
    deadline = time.monotonic() + SETTLE_SECONDS
    while True:
        src = ctx.store.get("Pod", source, ns) if source else None
        dst = ctx.store.get("Pod", target, ns) if target else None
        src_phase = launcher_status(src)["phase"] if src is not None else "Gone"
        dst_running = dst is not None and launcher_status(dst)["phase"] == "Running"
        if src_phase == "Succeeded" and dst_running:
            return {"phase": "Succeeded"}
        if src_phase != "Running" or not dst_running or time.monotonic() > deadline:
            return {"phase": "Failed", "error": f"{why} (the guest stays on the source)" if src_phase == "Running"
                    else why}
        time.sleep(0.5)


class MigrationRun:
    """One migration's job: `start` from the target Pod ready, or `recover` one the controller
    lost sight of mid-stream; both end in `finish`."""

    def __init__(self, ctx: Context, mig: Obj, vmi: Obj, state: dict):
        self.ctx, self.mig, self.vmi, self.state = ctx, mig, vmi, dict(state)
        self.ns = mig["metadata"].get("namespace", "default")
        self.key = job_key(self.ns, mig["spec"]["vmiName"])
        self.cancel = threading.Event()  # the job's own (ctx.jobs.cancel_event) once it runs
        self.hooks = MigrationHooks()
        register_user_hooks(ctx, self.hooks)

    def _context(self, event: str, error: str | None = None) -> HookContext:
        return HookContext(event, vmi_spec(self.vmi), self.state.get("sourceNode", ""),
                           self.state.get("targetNode", ""), dict(self.state), error)

    def start(self, address: str, token: str, secret: str) -> None:
        """Pre hooks, TargetReady, the stream (Running), then finish; the token Secret goes
        as soon as the stream is over (the target read it when it started)."""
        try:
            self.hooks.run(self._context("pre"), stop_on_error=True)
            if self.cancel.is_set():
                raise MigrationFailed("migration cancelled")
            set_phase(self.ctx, self.mig, "TargetReady", migrationState=self.state,
                      sourceNode=self.state["sourceNode"], targetNode=self.state["targetNode"],
                      targetPod=self.state["targetPod"])
            self.ctx.store.merge_status(VMI, self.vmi["metadata"]["name"], self.ns, migrationState=self.state)
            set_phase(self.ctx, self.mig, "Running")
            result = stream(self.ctx, self.ns, self.state["sourcePod"], address, token, self.cancel)
        except (HookError, MigrationFailed, SpecError) as exc:  # before any stream: the guest never left
            result = {"phase": "Failed", "error": user_text(exc)}
        except (OutcomeUnknown, ApiError, Conflict) as exc:
            result = settle(self.ctx, self.ns, self.state, user_text(exc))
        finally:
            delete_quietly(self.ctx, "Secret", secret, self.ns)
        self.finish(result)

    def recover(self) -> None:
        self.finish(settle(self.ctx, self.ns, self.state, "the controller lost the migration's stream "
                           "(it restarted while the migration ran)"))

    def finish(self, result: dict) -> None:
        if result["phase"] == "Succeeded":
            self._succeeded(result)
        else:
            self._failed(result.get("error") or "the migration failed")

    def _succeeded(self, result: dict) -> None:
        ctx, ns, state = self.ctx, self.ns, self.state
        end = ended_state(state, time.time(), succeeded=True, abort=self.cancel.is_set())
        self.state = end
        target = ctx.store.get("Pod", state["targetPod"], ns) or {"metadata": {"name": state["targetPod"]}}
        ctx.store.merge_status(VMI, self.vmi["metadata"]["name"], ns, **vmi_on_target(self.vmi, target, end))
        ctx.store.add_event(self.vmi, "Normal", "Migrated",
                            f"The VirtualMachineInstance migrated to node {state['targetNode']}.")
        ctx.store.delete("Pod", state["sourcePod"], ns)  # its launcher ended once the target had the guest
        errors = self.hooks.run(self._context("post"), stop_on_error=False)
        numbers = {k: v for k, v in result.items() if k != "phase" and k != "error"}
        fields = dict(numbers, sourceNode=state["sourceNode"], targetNode=state["targetNode"],
                      targetPod=state["targetPod"], migrationState=end)
        if errors:
            fields["error"] = one_line("post hooks failed: " + "; ".join(errors))
            ctx.store.add_event(self.mig, "Warning", "PostHookFailed", fields["error"])
        set_phase(ctx, self.mig, "Succeeded", **fields)
        ctx.store.add_event(self.mig, "Normal", "SuccessfulMigration",
                            f"Source node reported migration succeeded (to {state['targetNode']})")

    def _failed(self, error: str) -> None:
        ctx, ns = self.ctx, self.ns
        end = ended_state(self.state, time.time(), succeeded=False, reason=error, abort=self.cancel.is_set())
        self.state = end
        vmi = ctx.store.get(VMI, self.vmi["metadata"]["name"], ns)
        if vmi is not None and ((vmi.get("status") or {}).get("migrationState") or {}).get("migrationUid") == \
                end["migrationUid"]:
            ctx.store.merge_status(VMI, vmi["metadata"]["name"], ns, migrationState=end)
        if end.get("targetPod"):
            ctx.store.delete("Pod", end["targetPod"], ns)
        self.hooks.run(self._context("failed", error), stop_on_error=False)
        set_phase(ctx, self.mig, "Failed", error=error, migrationState=end)
        ctx.store.add_event(self.mig, "Warning", "FailedMigration", error)
