"""`pvlun apply / get / delete / describe / annotate`: kubectl's verbs over the embedded store."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from datetime import datetime, timezone

import yaml

from controlplane.admission import KINDS, REQUEST_KINDS, Refused, admit_update, known_kind, load_documents
from controlplane.data_sources import cycle_message, find_cycle
from controlplane.manifest_yaml import ManifestError, read_manifest
from controlplane.store import CLUSTER_SCOPED, ObjectStore, SQLiteStore
from controlplane.user_text import quoted


class NoDaemon(RuntimeError):
    pass


def daemon_running(data_dir: str) -> bool:
    try:
        with open(os.path.join(data_dir, "serve.pid")) as f:
            pid = int(f.read().strip())
        os.kill(pid, 0)
        return True
    except (OSError, ValueError):
        return False


def open_store(data_dir: str, need_daemon: bool = True, kubeconfig: str | None = None,
               namespace: str | None = None) -> ObjectStore:
    """The objects' store: a cluster's API when a kubeconfig is given (reading `namespace` only,
    when one is given: a user with rights in one namespace can list nothing cluster-wide), else
    the embedded instance's catalog (which a running `pvlun serve` reconciles)."""
    if kubeconfig:
        from controlplane.kube_store import KubeStore

        return KubeStore.from_kubeconfig(kubeconfig, namespace=namespace or "default", watch_namespace=namespace)
    data_dir = os.path.abspath(data_dir)
    if need_daemon and not daemon_running(data_dir):
        raise NoDaemon(f"no pvlun serve is running for data dir {data_dir}; "
                       f"start one with: pvlun serve --data-dir {data_dir}")
    if not os.path.exists(os.path.join(data_dir, "catalog.db")):
        raise NoDaemon(f"{data_dir} is not a pvlun instance (no catalog.db); "
                       f"start one with: pvlun serve --data-dir {data_dir}")
    return SQLiteStore(os.path.join(data_dir, "catalog.db"))


def embedded_only(args: argparse.Namespace, what: str, instead: str) -> None:
    """Commands that read the embedded instance's files refuse a cluster with what to run."""
    if getattr(args, "kubeconfig", None):
        raise NoDaemon(f"pvlun {what} works on an embedded instance only; on a cluster use {instead}")


def _age(obj: dict) -> str:
    created = obj.get("metadata", {}).get("creationTimestamp")
    if not created:
        return ""
    then = datetime.strptime(created, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    secs = int((datetime.now(timezone.utc) - then).total_seconds())
    return f"{secs}s" if secs < 120 else f"{secs // 60}m" if secs < 7200 else f"{secs // 3600}h"


def _columns(kind: str, obj: dict) -> dict[str, str]:
    st, spec = obj.get("status") or {}, obj.get("spec") or {}
    if kind == "DataVolume":
        return {"PHASE": st.get("phase", ""), "PROGRESS": st.get("progress", ""),
                "RESTARTS": str(st.get("restartCount", 0))}
    if kind == "PersistentVolumeClaim":
        return {"STATUS": st.get("phase", "Pending"), "VOLUME": spec.get("volumeName", ""),
                "CAPACITY": st.get("capacity", {}).get("storage", ""),
                "ACCESS MODES": ",".join(spec.get("accessModes") or []), "STORAGECLASS": spec.get("storageClassName", "")}
    if kind == "PersistentVolume":
        claim = spec.get("claimRef") or {}
        return {"CAPACITY": spec.get("capacity", {}).get("storage", ""), "STATUS": st.get("phase", ""),
                "CLAIM": f"{claim.get('namespace', '')}/{claim.get('name', '')}", "HANDLE": spec.get("csi", {}).get("volumeHandle", "")}
    if kind == "VirtualMachine":
        return {"STATUS": st.get("printableStatus", ""), "READY": str(st.get("ready", False))}
    if kind == "VirtualMachineInstance":
        return {"PHASE": st.get("phase", ""), "NODENAME": st.get("nodeName", "")}
    if kind in ("VirtualMachinePool", "VirtualMachineInstanceReplicaSet"):  # KubeVirt's printer columns
        return {"DESIRED": str(spec.get("replicas", 1)), "CURRENT": str(st.get("replicas", 0)),
                "READY": str(st.get("readyReplicas", 0))}
    if kind == "VirtualMachineInstanceMigration":
        return {"PHASE": st.get("phase", ""), "VMI": spec.get("vmiName", "")}
    if kind == "VirtualMachineExport":
        source = spec.get("source") or {}
        return {"SOURCEKIND": source.get("kind", ""), "SOURCENAME": source.get("name", ""), "PHASE": st.get("phase", "")}
    if kind == "VolumeAttachment":
        return {"NODE": spec.get("nodeName", ""), "PV": spec.get("source", {}).get("persistentVolumeName", ""),
                "ATTACHED": str(st.get("attached", False))}
    if kind == "StorageClass":
        return {"PROVISIONER": obj.get("provisioner", "")}
    if kind == "VolumeSnapshotContent":
        ref = spec.get("volumeSnapshotRef") or {}
        return {"READYTOUSE": str(st.get("readyToUse", False)).lower(), "RESTORESIZE": str(st.get("restoreSize", "")),
                "DELETIONPOLICY": spec.get("deletionPolicy", ""), "DRIVER": spec.get("driver", ""),
                "SOURCEVOLUMEMODE": spec.get("sourceVolumeMode", "<unknown>"),
                "VOLUMESNAPSHOT": f"{ref.get('namespace', '')}/{ref.get('name', '')}"}
    if kind in ("VirtualMachineSnapshot", "VirtualMachineSnapshotContent", "VirtualMachineRestore"):
        return _snapshot_columns(kind, spec, st)
    return {}


def _snapshot_columns(kind: str, spec: dict, st: dict) -> dict[str, str]:
    """KubeVirt's printer columns of its snapshot.kubevirt.io kinds."""
    error = (st.get("error") or {}).get("message", "")
    if kind == "VirtualMachineSnapshot":
        source = spec.get("source") or {}
        return {"SOURCEKIND": source.get("kind", ""), "SOURCENAME": source.get("name", ""),
                "PHASE": st.get("phase", ""), "READYTOUSE": str(st.get("readyToUse", False)).lower(),
                "CREATIONTIME": st.get("creationTime", ""), "ERROR": error}
    if kind == "VirtualMachineSnapshotContent":
        return {"READYTOUSE": str(st.get("readyToUse", False)).lower(), "CREATIONTIME": st.get("creationTime", ""),
                "ERROR": error}
    target = spec.get("target") or {}
    failure = next((c.get("message", "") for c in st.get("conditions") or [] if c.get("type") == "Failure"), "")
    return {"TARGETKIND": target.get("kind", ""), "TARGETNAME": target.get("name", ""),
            "COMPLETE": str(st.get("complete", False)).lower(), "RESTORETIME": st.get("restoreTime", ""),
            "ERROR": failure}


def print_table(kind: str, objs: list[dict], out=sys.stdout) -> None:
    if not objs:
        print(f"No {kind} found.", file=sys.stderr)
        return
    rows = []
    for obj in objs:
        row = {"NAME": obj["metadata"]["name"]}
        if kind not in CLUSTER_SCOPED:
            row = {"NAMESPACE": obj["metadata"].get("namespace", "default"), **row}
        row.update(_columns(kind, obj))
        row["AGE"] = _age(obj)
        rows.append(row)
    widths = {k: max(len(k), *(len(r[k]) for r in rows)) for k in rows[0]}
    print("   ".join(k.ljust(widths[k]) for k in rows[0]).rstrip(), file=out)
    for r in rows:
        print("   ".join(r[k].ljust(widths[k]) for k in r).rstrip(), file=out)


def check_references(store: ObjectStore, docs: list[dict], default_ns: str) -> None:
    """A VirtualMachine may only name DataVolumes that exist, come in the same apply, or
    are in its own dataVolumeTemplates; otherwise the field is named and nothing is stored."""
    def ns_of(doc: dict) -> str:
        return (doc.get("metadata") or {}).get("namespace") or default_ns

    coming = {(ns_of(d), d["metadata"]["name"]) for d in docs if d["kind"] == "DataVolume"}
    for doc in docs:
        if doc["kind"] != "VirtualMachine":
            continue
        ns = ns_of(doc)
        spec = doc.get("spec") or {}
        templates = {(t.get("metadata") or {}).get("name") for t in spec.get("dataVolumeTemplates") or []}
        volumes = ((spec.get("template") or {}).get("spec") or {}).get("volumes") or []
        for i, volume in enumerate(volumes):
            name = (volume.get("dataVolume") or {}).get("name")
            if name and name not in templates and (ns, name) not in coming and store.get("DataVolume", name, ns) is None:
                raise Refused(f"VirtualMachine {doc['metadata']['name']!r} is invalid: "
                              f"spec.template.spec.volumes[{i}].dataVolume.name: DataVolume {name!r} does not exist "
                              f"in namespace {ns} (create it, or add it to spec.dataVolumeTemplates)")
        check_instancetype_refs(store, doc, ns, docs)


def check_instancetype_refs(store: ObjectStore, vm: dict, ns: str, docs: list[dict]) -> None:
    """The instancetype and preference a VM names exist (come in the same apply, or are the
    copies it already runs with), and the VM expands with them: no field of its conflicts, the
    preference's requirements are met. Else the field is named and nothing is stored."""
    from controlplane.instancetype_revisions import recorded_copy
    from controlplane.instancetypes import expand, matchers_of
    from controlplane.vm_spec import SpecError

    label = f"VirtualMachine {vm['metadata']['name']!r} is invalid"
    stored_vm = store.get("VirtualMachine", vm["metadata"]["name"], ns)
    objects: list[dict | None] = []
    for matcher in matchers_of(vm):
        if matcher is None:
            objects.append(None)
            continue
        where = matcher.namespace(ns)
        obj = next((d for d in docs if d["kind"] == matcher.kind and d["metadata"]["name"] == matcher.name
                    and (not where or (d["metadata"].get("namespace") or ns) == where)), None)
        obj = obj or (stored_vm and recorded_copy(store, stored_vm, matcher)) or \
            store.get(matcher.kind, matcher.name, where or "default")
        if obj is None:
            place = f"in namespace {where}" if where else "in the cluster"
            raise Refused(f"{label}: {matcher.field}.name: {matcher.kind} {matcher.name!r} does not exist {place}")
        objects.append(obj)
    try:
        expand(vm, *objects)
    except SpecError as exc:
        raise Refused(f"{label}: {exc}") from None


def check_update_rules(store: ObjectStore, docs: list[dict]) -> None:
    """Every document checked against what exists before anything is stored: a refused
    update (an immutable field, a cycle of sources) leaves the whole manifest unapplied."""
    found = find_cycle(docs, lambda kind, name, ns: store.get(kind, name, ns))
    if found is not None:
        doc, chain = found
        raise Refused(f"{doc['kind']} {quoted(doc['metadata']['name'])} is invalid: {cycle_message(doc, chain)}")
    for doc in docs:
        old = store.get(doc["kind"], doc["metadata"]["name"], doc["metadata"].get("namespace", "default"))
        if old is not None:
            admit_update(old, doc)


def cmd_apply(args: argparse.Namespace) -> int:
    try:
        docs = load_documents(read_manifest(args.filename))
    except (Refused, ManifestError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    requests = [doc for doc in docs if doc["kind"] in REQUEST_KINDS]  # answered, never stored
    docs = [doc for doc in docs if doc["kind"] not in REQUEST_KINDS]
    if requests and args.kubeconfig:  # before anything is stored: a manifest is applied whole or not at all
        print("error: UploadTokenRequest is answered on an embedded instance only; on a cluster CDI's API "
              "server answers it", file=sys.stderr)
        return 1
    store = open_store(args.data_dir, kubeconfig=args.kubeconfig)
    for doc in docs:
        if args.namespace and doc["kind"] not in CLUSTER_SCOPED:
            doc.setdefault("metadata", {}).setdefault("namespace", args.namespace)
    try:
        check_references(store, docs, args.namespace or "default")
        check_update_rules(store, docs)
        for doc in docs:
            old = store.get(doc["kind"], doc["metadata"]["name"], doc["metadata"].get("namespace", "default"))
            new = store.apply(doc, merge=admit_update)  # checked again, in the write's transaction
            verb = "created" if old is None else "unchanged" if new == old else "configured"
            print(f"{doc['kind'].lower()}/{doc['metadata']['name']} {verb}")
    except Refused as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    from pvlun.transfer_cli import answer_token_requests

    if answer_token_requests(args, requests):
        return 1
    if args.wait:
        return wait_for(store, docs, args.timeout)
    return 0


def wait_for(store: ObjectStore, docs: list[dict], timeout: float) -> int:
    """Wait until every DataVolume, VirtualMachine and VirtualMachineInstance applied is done (a
    VMI: Running, or ended); show DataVolume progress.
    Only objects the store says changed are read again (a crowd of 1,000 costs no more per turn)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    watched = [d for d in docs if d["kind"] in ("DataVolume", "VirtualMachine", "VirtualMachineInstance",
                                                "PersistentVolumeClaim", *REPLICATING)]
    deadline = time.monotonic() + timeout
    failed = False
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[phase]}"),
                  TimeElapsedColumn(), transient=False, disable=not sys.stderr.isatty(),
                  console=None) as bar:
        tasks = {id(d): bar.add_task(f"{d['kind'].lower()}/{d['metadata']['name']}", total=100, phase="")
                 for d in watched}
        pending = {_key(d): d for d in watched}
        version, changed = store.version(), None  # None: look at every pending object
        while pending and time.monotonic() < deadline:
            for key in list(pending) if changed is None else [k for k in changed if k in pending]:
                doc = pending[key]
                obj = store.get(key[0], key[2], key[1]) or {}
                done, ok, phase, pct = _done(obj)
                bar.update(tasks[id(doc)], completed=pct, phase=phase)
                if done:
                    del pending[key]
                    failed |= not ok
                    _report(store, obj, ok, phase)
            if pending:
                store.wait_for_change(version, timeout=min(0.5, max(0.0, deadline - time.monotonic())))
                version, changed = store.changes_since(version)
    if pending:
        names = ", ".join(f"{d['kind'].lower()}/{d['metadata']['name']}" for d in list(pending.values())[:5])
        more = f" and {len(pending) - 5} more" if len(pending) > 5 else ""
        print(f"error: timed out after {timeout:.0f}s waiting for {names}{more}", file=sys.stderr)
        return 1
    return 1 if failed else 0


REPLICATING = ("VirtualMachinePool", "VirtualMachineInstanceReplicaSet")


def _key(doc: dict) -> tuple[str, str, str]:
    ns = "" if doc["kind"] in CLUSTER_SCOPED else doc["metadata"].get("namespace") or "default"
    return doc["kind"], ns, doc["metadata"]["name"]


def _done(obj: dict) -> tuple[bool, bool, str, float]:
    st = obj.get("status") or {}
    kind = obj.get("kind")
    if kind == "DataVolume":
        phase = st.get("phase", "")
        try:
            pct = float(st.get("progress", "0").rstrip("%"))
        except ValueError:
            pct = 0.0
        return phase in ("Succeeded", "Failed"), phase == "Succeeded", phase, 100.0 if phase == "Succeeded" else pct
    if kind == "VirtualMachine":
        phase = st.get("printableStatus", "")
        bad = phase in ("CrashLoopBackOff", "ErrorUnschedulable", "DataVolumeError", "ErrorPvcNotFound")
        return phase in ("Running", "Stopped") or bad, not bad, phase, 100.0 if phase == "Running" else 0.0
    if kind in REPLICATING:  # as `kubectl wait`: every replica ready (a paused one waits no longer)
        want = (obj.get("spec") or {}).get("replicas", 1)
        ready, failed = st.get("readyReplicas", 0), any(c.get("type") == "ReplicaFailure"
                                                          for c in st.get("conditions") or [])
        done = failed or (obj.get("spec") or {}).get("paused", False) or (st.get("replicas") == want == ready)
        return done, not failed, f"{ready}/{want} ready", 100.0 * ready / want if want else 100.0
    if kind == "VirtualMachineInstance":  # applied alone: it runs, or ends
        phase = st.get("phase", "")
        return phase in ("Running", "Succeeded", "Failed"), phase != "Failed", phase, \
            100.0 if phase in ("Running", "Succeeded") else 0.0
    phase = st.get("phase", "")
    return phase == "Bound", True, phase, 100.0 if phase == "Bound" else 0.0


def _report(store: ObjectStore, obj: dict, ok: bool, phase: str) -> None:
    name = f"{obj['kind'].lower()}/{obj['metadata']['name']}"
    if ok:
        print(f"{name} {phase}")
        return
    reason = next((f"{c.get('reason')}: {c.get('message')}" for c in (obj.get("status") or {}).get("conditions", [])
                   if c["type"] in ("Running", "Ready", "Failure", "ReplicaFailure") and c.get("message")),
                  (obj.get("status") or {}).get("reason", ""))  # a VMI says why it failed in its reason
    print(f"{name} {phase}: {reason}", file=sys.stderr)


def cmd_get(args: argparse.Namespace) -> int:
    store = open_store(args.data_dir, need_daemon=False, kubeconfig=args.kubeconfig,
                       namespace=None if args.all_namespaces else args.namespace)
    kind = known_kind(args.kind)
    ns = None if args.all_namespaces else args.namespace
    if args.name:
        obj = store.get(kind, args.name, ns or "default")
        if obj is None:
            print(f'Error from server (NotFound): {args.kind} "{args.name}" not found', file=sys.stderr)
            return 1
        objs = [obj]
    else:
        objs = store.list(kind, ns)
    if args.output == "yaml":
        print(yaml.safe_dump(objs[0] if args.name else {"apiVersion": "v1", "kind": "List", "items": objs},
                             sort_keys=False), end="")
    elif args.output == "json":
        print(json.dumps(objs[0] if args.name else {"apiVersion": "v1", "kind": "List", "items": objs}, indent=2))
    else:
        print_table(kind, objs)
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    store = open_store(args.data_dir, kubeconfig=args.kubeconfig,
                       namespace=args.namespace)
    kind = known_kind(args.kind)
    if kind == "Namespace" and not args.kubeconfig:  # an API server would delete what is in it; pvlun serve does not
        held = [k for k in KINDS if k not in CLUSTER_SCOPED and store.list(k, args.name)]
        if held:
            print(f"error: namespace {args.name} still holds {', '.join(k.lower() for k in held)} objects: delete "
                  "them first (pvlun serve does not delete a namespace's contents with it)", file=sys.stderr)
            return 1
    if not store.delete(kind, args.name, args.namespace):
        print(f'Error from server (NotFound): {args.kind} "{args.name}" not found', file=sys.stderr)
        return 1
    print(f'{kind.lower()} "{args.name}" deleted')
    return 0


def cmd_describe(args: argparse.Namespace) -> int:
    store = open_store(args.data_dir, need_daemon=False, kubeconfig=args.kubeconfig,
                       namespace=args.namespace)
    kind = known_kind(args.kind)
    obj = store.get(kind, args.name, args.namespace)
    if obj is None:
        print(f'Error from server (NotFound): {args.kind} "{args.name}" not found', file=sys.stderr)
        return 1
    meta, st = obj["metadata"], obj.get("status") or {}
    print(f"Name:         {meta['name']}")
    if kind not in CLUSTER_SCOPED:
        print(f"Namespace:    {meta.get('namespace', 'default')}")
    print(f"Kind:         {kind}")
    print(f"Created:      {meta.get('creationTimestamp', '')}")
    for key in ("phase", "printableStatus", "progress", "claimName", "restartCount", "nodeName", "readyToUse",
                "indications", "complete", "restoreTime"):
        if key in st:
            value = ", ".join(map(str, st[key])) if isinstance(st[key], list) else st[key]
            print(f"{key[0].upper() + key[1:] + ':':<14}{value}")
    if obj.get("spec"):
        print("Spec:")
        print("  " + yaml.safe_dump(obj["spec"], sort_keys=False).rstrip().replace("\n", "\n  "))
    conditions = st.get("conditions") or []
    if conditions:
        print("Conditions:")
        print(f"  {'Type':<12}{'Status':<8}{'Reason':<24}Message")
        for c in conditions:
            print(f"  {c['type']:<12}{c['status']:<8}{c.get('reason', ''):<24}{c.get('message', '')}")
    events = store.events(obj)
    print("Events:" if events else "Events:       <none>")
    for e in events[-20:]:  # repeated events are one line with their count, as kubectl shows them
        seen = f"  (x{e['count']} since {e['firstTime']})" if e.get("count", 1) > 1 else ""
        print(f"  {e['time']}  {e['type']:<8}{e['reason']:<24}{e['message']}{seen}")
    return 0


# An annotation key as Kubernetes takes it: an optional DNS-subdomain prefix and "/", then a name.
_ANNOTATION_KEY = re.compile(r"(?:[a-z0-9](?:[-a-z0-9]*[a-z0-9])?(?:\.[a-z0-9](?:[-a-z0-9]*[a-z0-9])?)*/)?"
                             r"[A-Za-z0-9](?:[-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")


def cmd_annotate(args: argparse.Namespace) -> int:
    """`pvlun annotate KIND NAME KEY=VALUE... | KEY-`, as kubectl annotate (always overwriting)."""
    changes: dict[str, str | None] = {}
    for item in args.annotations:
        key, sep, value = item.partition("=")
        remove = not sep and key.endswith("-")
        key = key[:-1] if remove else key
        if not (sep or remove) or len(key) > 317 or not _ANNOTATION_KEY.fullmatch(key):
            print(f"error: {item[:80]!r} is not KEY=VALUE or KEY- with a valid annotation key", file=sys.stderr)
            return 1
        changes[key] = None if remove else value
    store = open_store(args.data_dir, kubeconfig=args.kubeconfig,
                       namespace=args.namespace)
    kind = known_kind(args.kind)
    if store.annotate(kind, args.name, args.namespace, **changes) is None:
        print(f'Error from server (NotFound): {args.kind} "{args.name}" not found', file=sys.stderr)
        return 1
    print(f"{kind.lower()}/{args.name} annotated")
    return 0


def add_commands(sub, data_dir_arg) -> None:
    apply = sub.add_parser("apply", help="create or update objects from YAML (like kubectl apply)")
    apply.add_argument("-f", "--filename", required=True, help="YAML file, or - for stdin")
    apply.add_argument("-n", "--namespace", default="")
    apply.add_argument("--wait", action="store_true", help="return when DataVolumes/VMs are done")
    apply.add_argument("--timeout", type=float, default=1800)
    data_dir_arg(apply)
    apply.set_defaults(func=cmd_apply)

    get = sub.add_parser("get", help="list or show objects")
    get.add_argument("kind")
    get.add_argument("name", nargs="?")
    get.add_argument("-n", "--namespace", default="default")
    get.add_argument("-A", "--all-namespaces", action="store_true")
    get.add_argument("-o", "--output", choices=["yaml", "json", "table"], default="table")
    data_dir_arg(get)
    get.set_defaults(func=cmd_get)

    delete = sub.add_parser("delete", help="delete an object")
    delete.add_argument("kind")
    delete.add_argument("name")
    delete.add_argument("-n", "--namespace", default="default")
    data_dir_arg(delete)
    delete.set_defaults(func=cmd_delete)

    describe = sub.add_parser("describe", help="show an object with its conditions and events")
    describe.add_argument("kind")
    describe.add_argument("name")
    describe.add_argument("-n", "--namespace", default="default")
    data_dir_arg(describe)
    describe.set_defaults(func=cmd_describe)

    annotate = sub.add_parser("annotate", help="set (KEY=VALUE) or remove (KEY-) annotations of an object")
    annotate.add_argument("kind")
    annotate.add_argument("name")
    annotate.add_argument("annotations", nargs="+", metavar="KEY=VALUE")
    annotate.add_argument("-n", "--namespace", default="default")
    data_dir_arg(annotate)
    annotate.set_defaults(func=cmd_annotate)
