"""`pvlun vmexport create|delete|download` as `virtctl vmexport` has them.

`download NAME --output FILE` waits for the export to be Ready, picks the volume (--volume,
or the only one), and downloads it over HTTPS trusting the certificate in the export's
status; with --vm/--snapshot/--pvc it creates the export first and deletes it afterwards
unless --keep-vme. Formats: gzip (virtctl's default: the compressed file as served), raw
(resumed with Range when a FILE.part is left from a cut-off run), qcow2 (the raw download
converted in the sandbox).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from pvlun.objects_cli import open_store

KIND = "VirtualMachineExport"
API_VERSION = "export.kubevirt.io/v1beta1"
SOURCES = {"vm": ("kubevirt.io", "VirtualMachine"), "snapshot": ("snapshot.kubevirt.io", "VirtualMachineSnapshot"),
           "pvc": ("", "PersistentVolumeClaim")}


def _source(args: argparse.Namespace) -> tuple[str, str, str] | None:
    given = [(flag, getattr(args, flag)) for flag in SOURCES if getattr(args, flag, None)]
    if len(given) > 1:
        raise SystemExit("error: give one of --vm, --snapshot, --pvc")
    if not given:
        return None
    flag, name = given[0]
    return (*SOURCES[flag], name)


def _admitted(args: argparse.Namespace, source: tuple[str, str, str]) -> dict:
    """The export to create, checked before any store is opened (a bad --ttl is one line)."""
    group, kind, name = source
    spec: dict = {"source": {"apiGroup": group, "kind": kind, "name": name}}
    if getattr(args, "ttl", None):
        spec["ttlDuration"] = args.ttl
    from controlplane.admission import admit

    return admit({"apiVersion": API_VERSION, "kind": KIND,
                  "metadata": {"name": args.name, "namespace": args.namespace}, "spec": spec}, "the export")


def _create(store, args: argparse.Namespace, obj: dict) -> None:
    from controlplane.admission import admit_update

    if store.get(KIND, args.name, args.namespace) is not None:
        raise SystemExit(f"error: VirtualMachineExport {args.namespace}/{args.name} already exists")
    store.apply(obj, admit_update)


def cmd_create(args: argparse.Namespace) -> int:
    source = _source(args)
    if source is None:
        print("error: give the source: --vm, --snapshot or --pvc NAME", file=sys.stderr)
        return 1
    obj = _admitted(args, source)
    _create(open_store(args.data_dir, kubeconfig=args.kubeconfig), args, obj)
    print(f"virtualmachineexport.export.kubevirt.io/{args.name} created")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    store = open_store(args.data_dir, kubeconfig=args.kubeconfig)
    if not store.delete(KIND, args.name, args.namespace):
        print(f"error: VirtualMachineExport {args.namespace}/{args.name} not found", file=sys.stderr)
        return 1
    print(f"virtualmachineexport.export.kubevirt.io/{args.name} deleted")
    return 0


def _wait_ready(store, args: argparse.Namespace) -> dict:
    deadline = time.monotonic() + args.timeout
    while True:
        vme = store.get(KIND, args.name, args.namespace)
        if vme is None:
            raise SystemExit(f"error: VirtualMachineExport {args.namespace}/{args.name} not found")
        status = vme.get("status") or {}
        if status.get("phase") == "Ready" and (status.get("links") or {}):
            return vme
        if status.get("phase") in ("Terminated", "Skipped") or time.monotonic() > deadline:
            conditions = {c.get("type"): c for c in status.get("conditions") or []}
            ready, claims = conditions.get("Ready") or {}, conditions.get("PVCReady") or {}
            why = f"{ready.get('reason', '')}: {ready.get('message') or claims.get('message', '')}".strip(": ")
            raise SystemExit(f"error: VirtualMachineExport {args.namespace}/{args.name} is "
                             f"{status.get('phase') or 'Pending'}, not Ready" + (f" ({why})" if why else ""))
        time.sleep(0.2)


def _token(store, vme: dict) -> str:
    from controlplane.secret_refs import secret_data

    ns = vme["metadata"].get("namespace", "default")
    name = (vme.get("status") or {}).get("tokenSecretRef") or ""
    token = secret_data(store, name, ns, "the export's token secret").get("token", "")
    if not token:
        raise SystemExit(f"error: the export's token secret {ns}/{name} has no 'token' key")
    return token


def _volume_url(link: dict, volume: str | None, fmt: str) -> str:
    volumes = link.get("volumes") or []
    names = [v.get("name") for v in volumes]
    if volume is None:
        if len(volumes) != 1:
            raise SystemExit(f"error: the export has {len(volumes)} volumes ({', '.join(names)}); name one with --volume")
        chosen = volumes[0]
    else:
        chosen = next((v for v in volumes if v.get("name") == volume), None)
        if chosen is None:
            raise SystemExit(f"error: the export has no volume {volume!r} (it has: {', '.join(names)})")
    served = "gzip" if fmt == "gzip" else "raw"
    url = next((f.get("url") for f in chosen.get("formats") or [] if f.get("format") == served), None)
    if not url:
        raise SystemExit(f"error: volume {chosen.get('name')} is not served as {served}")
    return url


def cmd_download(args: argparse.Namespace) -> int:
    from importer.vm_export_client import DownloadFailed, download, raw_to_qcow2

    source = _source(args)
    obj = _admitted(args, source) if source is not None else None
    store = open_store(args.data_dir, kubeconfig=args.kubeconfig)
    if obj is not None:
        _create(store, args, obj)
    try:
        vme = _wait_ready(store, args)
        links = vme["status"]["links"]
        link = links.get("external") or links["internal"]  # on a cluster: the Service's, reachable inside it
        url = _volume_url(link, args.volume, args.format)
        token = _token(store, vme)
        target = args.output + ".raw" if args.format == "qcow2" else args.output
        try:
            size = download(url, token, link.get("cert", ""), target, insecure=args.insecure,
                            resume=args.format != "gzip")
            if args.format == "qcow2":
                raw_to_qcow2(target, args.output)
                size = os.path.getsize(args.output)
        except DownloadFailed as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"downloaded {url.rsplit('/', 3)[-2]} of {args.namespace}/{args.name} to {args.output} "
              f"({args.format}, {size} bytes)")
        return 0
    finally:
        if source is not None and not args.keep_vme:
            store.delete(KIND, args.name, args.namespace)


def cmd_server(args: argparse.Namespace) -> int:
    """An exporter Pod's process: serve the mounted volumes until SIGTERM or the deadline (the
    export's TTL), then end (the Pod Succeeded: the export Terminated)."""
    import signal
    import threading
    from datetime import datetime, timezone

    from importer.vm_export_server import ExportedVolume, ExportServer

    volumes = []
    for given in args.volume:
        name, sep, path = given.partition("=")
        if not sep or not name or "/" in name or not path.startswith("/"):
            print(f"error: --volume {given!r} is not NAME=/PATH", file=sys.stderr)
            return 1
        volumes.append(ExportedVolume(name, path))
    with open(args.token_file) as f:
        token = f.read().strip()
    deadline = datetime.strptime(args.deadline, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    server = ExportServer(volumes, token, (args.address, args.port), tls_files=(args.cert_file, args.key_file)).start()
    done = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: done.set())
    print(f"serving {len(volumes)} volume(s) at {server.url} until {args.deadline}", flush=True)
    done.wait(max(0.0, (deadline - datetime.now(timezone.utc)).total_seconds()))
    server.stop()
    return 0


def add_commands(sub, data_dir_arg) -> None:
    server = sub.add_parser("vmexport-server", help="(in an exporter Pod) serve an export's volumes over HTTPS")
    server.add_argument("--volume", action="append", default=[], required=True, help="NAME=PATH, once per volume")
    server.add_argument("--token-file", required=True)
    server.add_argument("--cert-file", required=True)
    server.add_argument("--key-file", required=True)
    server.add_argument("--deadline", required=True, help="when to stop (RFC 3339, UTC): the export's TTL")
    server.add_argument("--address", default="0.0.0.0")
    server.add_argument("--port", type=int, default=8443)
    server.set_defaults(func=cmd_server)

    vmexport = sub.add_parser("vmexport", help="export a VM's, a snapshot's or a claim's volumes (like virtctl vmexport)")
    verbs = vmexport.add_subparsers(dest="verb", required=True)

    def common(parser: argparse.ArgumentParser, sources: bool) -> None:
        parser.add_argument("name", help="the VirtualMachineExport's name")
        parser.add_argument("-n", "--namespace", default="default")
        if sources:
            parser.add_argument("--vm", help="export this VirtualMachine's volumes (it must be stopped)")
            parser.add_argument("--snapshot", help="export this VirtualMachineSnapshot's volumes")
            parser.add_argument("--pvc", help="export this PersistentVolumeClaim")
            parser.add_argument("--ttl", help="how long the export lives, e.g. 1h (default 2h)")
        data_dir_arg(parser)

    create = verbs.add_parser("create", help="create a VirtualMachineExport")
    common(create, True)
    create.set_defaults(func=cmd_create)
    delete = verbs.add_parser("delete", help="delete a VirtualMachineExport")
    common(delete, False)
    delete.set_defaults(func=cmd_delete)
    dl = verbs.add_parser("download", help="download a volume of a VirtualMachineExport")
    common(dl, True)
    dl.add_argument("--output", required=True, help="the file to write")
    dl.add_argument("--volume", help="the volume to download (needed when the export has several)")
    dl.add_argument("--format", choices=["gzip", "raw", "qcow2"], default="gzip",
                    help="gzip (the default, as virtctl), raw (resumable) or qcow2 (converted from raw)")
    dl.add_argument("--raw", dest="format", action="store_const", const="raw", help="the same as --format raw")
    dl.add_argument("--keep-vme", action="store_true", help="keep an export this command created")
    dl.add_argument("--insecure", action="store_true", help="do not verify the export server's certificate")
    dl.add_argument("--timeout", type=float, default=600, help="seconds to wait for the export to be Ready")
    dl.set_defaults(func=cmd_download)
