"""`pvlun vm start|stop|restart|pause|unpause|migrate`, `pvlun logs vm/NAME`,
`pvlun console vm/NAME` (virtctl's verbs). As virtctl, pause, unpause, migrate, logs and
console also take a VirtualMachineInstance applied alone (`vmi/NAME`, or its bare name);
start, stop and restart are a VM's (a VMI alone is deleted to stop it)."""

from __future__ import annotations

import argparse
import os
import select
import socket
import sys
import termios
import time
import tty

from pvlun.objects_cli import embedded_only, open_store
from virt.console_history import history_file

REQUEST = "pvlun.dev/state-change-request"


VM_ONLY = ("start", "stop", "restart")  # virtctl's VM verbs; a VMI alone is deleted to stop it


def _resolve(store, target: str, ns: str) -> tuple[str, str] | None:
    """(kind, name) that `vm/NAME`, `vmi/NAME` or a bare NAME (a VM of that name, else a VMI,
    as virtctl takes them) names; None, said, when nothing does."""
    kind, _, name = target.rpartition("/")
    kinds = {"vm": ("VirtualMachine",), "virtualmachine": ("VirtualMachine",), "vmi": ("VirtualMachineInstance",),
             "virtualmachineinstance": ("VirtualMachineInstance",), "": ("VirtualMachine", "VirtualMachineInstance")}
    for candidate in kinds.get(kind.lower(), ()):
        if store.get(candidate, name, ns) is not None:
            return candidate, name
    what = {"vm": "VirtualMachine", "vmi": "VirtualMachineInstance"}.get(kind.lower(), "VirtualMachine")
    print(f'Error: {what} "{ns}/{name}" not found', file=sys.stderr)
    return None


def cmd_vm(args: argparse.Namespace) -> int:
    store = open_store(args.data_dir, kubeconfig=args.kubeconfig, namespace=args.namespace)
    found = _resolve(store, args.name, args.namespace)
    if found is None:
        return 1
    kind, args.name = found
    if kind == "VirtualMachineInstance" and args.action in VM_ONLY:
        print(f'error: {args.action} acts on a VirtualMachine; VirtualMachineInstance "{args.namespace}/{args.name}" '
              f"has none (pvlun delete vmi {args.name} stops it)", file=sys.stderr)
        return 1
    if args.action == "migrate":
        return _migrate(store, args)
    if args.action == "migrate-cancel":
        return _migrate_cancel(store, args)
    before = _launcher_pid(store, args.name, args.namespace)
    store.annotate(kind, args.name, args.namespace, **{REQUEST: args.action})
    print(f"{'VMI' if kind == 'VirtualMachineInstance' else 'VM'} {args.name} was scheduled to {args.action}")
    if args.wait:
        want = {"start": {"Running"}, "stop": {"Stopped"}, "restart": {"Running"}, "pause": {"Paused"},
                "unpause": {"Running"}}[args.action]
        # a restart is done when a new QEMU runs, not while the old one still does
        new_run = (lambda: _launcher_pid(store, args.name, args.namespace) not in (None, before)) \
            if args.action == "restart" else (lambda: True)
        return _wait_status(store, args, want, new_run, kind)
    return 0


def _printable(obj: dict) -> str:
    """A VM's printableStatus; a VMI's in the same words (Running, Paused, or its phase)."""
    st = obj.get("status") or {}
    if obj.get("kind") != "VirtualMachineInstance":
        return st.get("printableStatus", "")
    return "Paused" if st.get("phase") == "Running" and st.get("paused") else st.get("phase", "")


def _launcher_pid(store, name: str, ns: str) -> int | None:
    vmi = store.get("VirtualMachineInstance", name, ns) or {}
    return ((vmi.get("status") or {}).get("launcher") or {}).get("pid")


def _wait_status(store, args, want: set[str], done=lambda: True, kind: str = "VirtualMachine") -> int:
    deadline = time.monotonic() + args.timeout
    label = "VMI" if kind == "VirtualMachineInstance" else "VM"
    time.sleep(0.3)
    while time.monotonic() < deadline:
        obj = store.get(kind, args.name, args.namespace) or {"metadata": {}}
        status = _printable(obj)
        pending = (obj["metadata"].get("annotations") or {}).get(REQUEST)
        if status in want and not pending and done():
            print(f"{label} {args.name} is {status}")
            return 0
        time.sleep(0.2)
    print(f"error: {label} {args.name} did not become {'/'.join(sorted(want))} in {args.timeout:.0f}s", file=sys.stderr)
    return 1


def _migrate(store, args) -> int:
    name = f"{args.name}-migration-{int(time.time() * 1000) % 10**8}"
    spec: dict = {"vmiName": args.name}
    if args.target_node:
        spec["addedNodeSelector"] = {"kubernetes.io/hostname": args.target_node}
    store.apply({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstanceMigration",
                 "metadata": {"name": name, "namespace": args.namespace}, "spec": spec})
    print(f"VM {args.name} was scheduled to migrate ({name})")
    if not args.wait:
        return 0
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        st = (store.get("VirtualMachineInstanceMigration", name, args.namespace) or {}).get("status") or {}
        if st.get("phase") == "Succeeded":
            print(f"migrated {args.name} from {st.get('sourceNode')} to {st.get('targetNode')} in "
                  f"{st.get('totalTimeMs')} ms (downtime {st.get('downtimeMs')} ms)")
            return 0
        if st.get("phase") == "Failed":
            print(f"error: migration failed: {st.get('error') or st.get('reason')}", file=sys.stderr)
            return 1
        time.sleep(0.2)
    print("error: migration did not finish in time", file=sys.stderr)
    return 1


def _migrate_cancel(store, args) -> int:
    """Like virtctl migrate-cancel: delete the VM's unfinished migrations; the source keeps running."""
    running = [m for m in store.list("VirtualMachineInstanceMigration", args.namespace)
               if (m.get("spec") or {}).get("vmiName") == args.name
               and ((m.get("status") or {}).get("phase") not in ("Succeeded", "Failed"))]
    if not running:
        print(f"error: VM {args.name} has no migration in progress", file=sys.stderr)
        return 1
    for mig in running:
        store.delete("VirtualMachineInstanceMigration", mig["metadata"]["name"], args.namespace)
        print(f"migration {mig['metadata']['name']} of VM {args.name} cancelled")
    return 0


def _vm_target(text: str) -> str:
    """vm/NAME, vmi/NAME or NAME (virtctl console takes a VMI's name)."""
    kind, _, name = text.rpartition("/")
    if kind not in ("", "vm", "vmi", "virtualmachine", "virtualmachineinstance") or not name:
        raise argparse.ArgumentTypeError("give vm/NAME, vmi/NAME or NAME")
    return text


def _current_run_dir(store, data_dir: str, name: str, ns: str) -> str | None:
    vmi = store.get("VirtualMachineInstance", name, ns)
    node = ((vmi or {}).get("status") or {}).get("nodeName")
    if not node:
        return None
    return os.path.join(data_dir, "vms", ns, name, node)


def cmd_logs(args: argparse.Namespace) -> int:
    """The guest's serial console history (KubeVirt's guest-console-log), across its
    restarts and migrations: kept per VM by whichever launcher ran it (virt/console_history.py)."""
    embedded_only(args, "logs", "kubectl logs on the VM's virt-launcher Pod (its serial console is the Pod's output)")
    store = open_store(args.data_dir, need_daemon=False, kubeconfig=args.kubeconfig)
    found = _resolve(store, args.target, args.namespace)
    if found is None:
        return 1
    args.target = found[1]
    try:
        with open(history_file(os.path.abspath(args.data_dir), args.namespace, args.target), "rb") as f:
            text = f.read().decode(errors="replace")
    except FileNotFoundError:
        print(f"error: VM {args.target} has not run yet: no console output", file=sys.stderr)
        return 1
    sys.stdout.write(text)
    return 0


def cmd_console(args: argparse.Namespace) -> int:
    """An interactive serial console; Ctrl-] leaves it (as virtctl console)."""
    embedded_only(args, "console", "kubectl attach -it on the VM's virt-launcher Pod")
    store = open_store(args.data_dir, kubeconfig=args.kubeconfig)
    args.target = args.target.rpartition("/")[2]  # a VM's VMI has the VM's name
    run_dir = _current_run_dir(store, os.path.abspath(args.data_dir), args.target, args.namespace)
    if run_dir is None:
        print(f"error: VM {args.target} has no running instance", file=sys.stderr)
        return 1
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(os.path.join(run_dir, "console.sock"))
    print("Successfully connected to the console. The escape sequence is ^]", file=sys.stderr)
    interactive = sys.stdin.isatty()
    saved = termios.tcgetattr(sys.stdin) if interactive else None
    try:
        if interactive:
            tty.setraw(sys.stdin)
        while True:
            ready, _, _ = select.select([sock, sys.stdin], [], [])
            if sock in ready:
                data = sock.recv(4096)
                if not data:
                    return 0
                os.write(sys.stdout.fileno(), data)
            if sys.stdin in ready:
                data = os.read(sys.stdin.fileno(), 1024)
                if not data or b"\x1d" in data:
                    return 0
                sock.sendall(data)
    finally:
        if saved is not None:
            termios.tcsetattr(sys.stdin, termios.TCSADRAIN, saved)
        sock.close()


def add_commands(sub, data_dir_arg) -> None:
    vm = sub.add_parser("vm", help="start, stop, restart, pause, unpause, migrate (or migrate-cancel) a VirtualMachine; "
                                   "pause, unpause, migrate a VirtualMachineInstance alone (vmi/NAME)")
    vm.add_argument("action", choices=["start", "stop", "restart", "pause", "unpause", "migrate", "migrate-cancel"])
    vm.add_argument("name", metavar="NAME", help="vm/NAME, vmi/NAME, or NAME: the VM of that name, else the VMI")
    vm.add_argument("-n", "--namespace", default="default")
    vm.add_argument("--target-node", help="migrate: the node to move to (default: another node)")
    vm.add_argument("--wait", action="store_true", help="return when the VM has reached the new state")
    vm.add_argument("--timeout", type=float, default=300)
    data_dir_arg(vm)
    vm.set_defaults(func=cmd_vm)

    logs = sub.add_parser("logs", help="the guest's serial console history, across restarts and migrations (vm/NAME)")
    logs.add_argument("target", type=_vm_target, metavar="vm/NAME|vmi/NAME")
    logs.add_argument("-n", "--namespace", default="default")
    data_dir_arg(logs)
    logs.set_defaults(func=cmd_logs)

    console = sub.add_parser("console", help="an interactive serial console (vm/NAME); ^] to leave")
    console.add_argument("target", type=_vm_target, metavar="vm/NAME|vmi/NAME")
    console.add_argument("-n", "--namespace", default="default")
    data_dir_arg(console)
    console.set_defaults(func=cmd_console)
