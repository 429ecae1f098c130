"""Migration hooks: user commands or Python callables run around a live migration.

Events: "pre" (before the target QEMU starts — e.g. publish the VM's volumes on the
target node; a failing pre hook aborts the migration), "post" (after the source QEMU has
quit — e.g. unpublish from the source node) and "failed" (after a failed or cancelled
migration has been cleaned up). Hooks run in registration order.

A command hook is an argv whose words may contain {vm}, {namespace}, {source}, {target}
and {event}; it also gets the context as JSON on stdin.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from typing import Callable, Sequence, Union

from host.command import CommandError, run
from controlplane.user_text import user_text
from controlplane.vm_spec import VmSpec

EVENTS = ("pre", "post", "failed")


@dataclass
class HookContext:
    event: str
    vm: VmSpec
    source_node: str
    target_node: str
    migration: dict = field(default_factory=dict)  # the migration status so far
    error: str | None = None

    def as_json(self) -> dict:
        return {"event": self.event, "vm": {"name": self.vm.name, "namespace": self.vm.namespace},
                "sourceNode": self.source_node, "targetNode": self.target_node,
                "migration": self.migration, "error": self.error}


HookFn = Callable[[HookContext], None]
Hook = Union[HookFn, Sequence[str]]


def hook_flag(text: str) -> tuple[str, str]:
    """`--migration-hook EVENT=COMMAND`, checked before anything runs: a known event and a
    command that splits into words (it runs as an argv, never through a shell)."""
    event, sep, command = text.partition("=")
    if not sep or event not in EVENTS:
        raise ValueError(f"{text[:80]!r} is not EVENT=COMMAND with EVENT one of {', '.join(EVENTS)}")
    try:
        words = shlex.split(command)
    except ValueError as exc:
        raise ValueError(f"the {event} hook {command[:80]!r} does not split into words: {exc}") from None
    if not words:
        raise ValueError(f"the {event} hook has no command")
    return event, command


class HookError(RuntimeError):
    """A hook failed; `hook` names it."""

    def __init__(self, hook: str, message: str):
        self.hook = hook
        super().__init__(f"hook {hook}: {message}")


@dataclass
class _Registered:
    event: str
    name: str
    hook: Hook
    timeout: float


class MigrationHooks:
    """The hooks of one VM (or of a whole node, shared by its VMs)."""

    def __init__(self) -> None:
        self._hooks: list[_Registered] = []
        self.history: list[tuple[str, str, str]] = []  # (event, hook name, "ok" or error)

    def register(self, event: str, hook: Hook, *, name: str | None = None, timeout: float = 120) -> None:
        if event not in EVENTS:
            raise ValueError(f"hook event must be one of {', '.join(EVENTS)}, not {event!r}")
        if not callable(hook) and (isinstance(hook, str) or not hook):
            raise ValueError("a hook is a callable or a non-empty argv list")
        label = name or (getattr(hook, "__name__", None) if callable(hook) else hook[0]) or "hook"
        self._hooks.append(_Registered(event, label, hook, timeout))

    def names(self, event: str) -> list[str]:
        return [h.name for h in self._hooks if h.event == event]

    def run(self, ctx: HookContext, *, stop_on_error: bool) -> list[str]:
        """Run the hooks for ctx.event in order; returns their errors (raises the first if stop_on_error)."""
        errors = []
        for h in [h for h in self._hooks if h.event == ctx.event]:
            try:
                if callable(h.hook):
                    h.hook(ctx)
                else:
                    subst = {"vm": ctx.vm.name, "namespace": ctx.vm.namespace, "source": ctx.source_node,
                             "target": ctx.target_node, "event": ctx.event}
                    argv = [word.format(**subst) for word in h.hook]
                    run(argv, timeout=h.timeout, input=json.dumps(ctx.as_json()).encode())
                self.history.append((ctx.event, h.name, "ok"))
            except (CommandError, Exception) as exc:  # noqa: BLE001 - hooks are user code
                text = user_text(exc)  # it reaches the migration's status: one line, no gRPC repr
                self.history.append((ctx.event, h.name, text))
                errors.append(f"{h.name}: {text}")
                if stop_on_error:
                    raise HookError(h.name, text) from exc
        return errors
