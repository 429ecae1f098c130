"""`pvlun image-upload` (like virtctl image-upload) and `pvlun export` (like virtctl vmexport download)."""

from __future__ import annotations

import argparse
import os
import sys
import time

from pvlun.objects_cli import embedded_only, open_store


def _bar(description: str):
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn(description), BarColumn(), TextColumn("{task.percentage:>5.1f}%"), TimeElapsedColumn(),
                    disable=not sys.stderr.isatty())


def cmd_image_upload(args: argparse.Namespace) -> int:
    """Upload into a DataVolume (made first when --size is given); a DataVolume this command
    made is deleted again when the upload fails, so a failed command leaves nothing behind."""
    embedded_only(args, "image-upload", "virtctl image-upload through CDI's upload proxy")
    if not os.path.isfile(args.image_path):
        print(f"error: {args.image_path} is not a file", file=sys.stderr)
        return 1
    store = open_store(args.data_dir, kubeconfig=args.kubeconfig)
    ns, name = args.namespace, args.dv
    created = False
    if store.get("DataVolume", name, ns) is None:
        if not args.size:
            print(f"error: DataVolume {ns}/{name} does not exist; give --size to create it", file=sys.stderr)
            return 1
        storage = {"resources": {"requests": {"storage": args.size}}, "accessModes": [args.access_mode],
                   "volumeMode": "Block" if args.block_volume else "Filesystem"}
        if args.storage_class:
            storage["storageClassName"] = args.storage_class
        store.apply({"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
                     "metadata": {"name": name, "namespace": ns},
                     "spec": {"source": {"upload": {}}, "storage": storage}})
        created = True
        print(f"DataVolume {ns}/{name} created")
    rc = 1
    try:
        rc = _upload(store, args, ns, name)
        return rc
    finally:
        if created and rc != 0:
            store.delete("DataVolume", name, ns)  # its claim and volume go with it
            print(f"DataVolume {ns}/{name} deleted again")


def _upload(store, args: argparse.Namespace, ns: str, name: str) -> int:
    from importer.errors import ImportFailed
    from importer.upload_client import upload_image
    from importer.upload_gateway import endpoint, mint_token

    deadline = time.monotonic() + args.timeout
    while True:
        phase = ((store.get("DataVolume", name, ns) or {}).get("status") or {}).get("phase")
        if phase == "UploadReady":
            break
        if phase in ("Succeeded", "Failed") or time.monotonic() > deadline:
            print(f"error: DataVolume {ns}/{name} is {phase or 'not ready'}, not UploadReady", file=sys.stderr)
            return 1
        time.sleep(0.2)
    try:
        url, ca = endpoint(os.path.abspath(args.data_dir))
    except LookupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    token = mint_token(os.path.abspath(args.data_dir), ns, name)
    size = os.path.getsize(args.image_path)
    print(f"Uploading {args.image_path} ({size} bytes) to {url}")
    try:
        with _bar("upload") as bar:
            task = bar.add_task("upload", total=100)
            upload_image(url, token, args.image_path, ca_file=ca, progress=lambda p: bar.update(task, completed=p))
    except ImportFailed as exc:
        st = (store.get("DataVolume", name, ns) or {}).get("status") or {}
        ready = next((c for c in st.get("conditions") or [] if c.get("type") == "Ready"), {})
        if st.get("phase") == "Failed" and ready.get("reason"):  # the server's word on why, over the client's
            exc = ImportFailed(ready["reason"], ready.get("message", ""))
        print(f"error: {exc.reason}: {exc.message}", file=sys.stderr)
        return 1
    while True:
        st = (store.get("DataVolume", name, ns) or {}).get("status") or {}
        if st.get("phase") == "Succeeded":
            print(f"Upload into DataVolume {ns}/{name} complete")
            return 0
        if st.get("phase") == "Failed" or time.monotonic() > deadline:
            print(f"error: DataVolume {ns}/{name} is {st.get('phase')}", file=sys.stderr)
            return 1
        time.sleep(0.1)


def cmd_export(args: argparse.Namespace) -> int:
    """Attach the claim read-only on a node of the running daemon (its first unless --node-id
    says otherwise), write the disk out, detach; nothing stays attached whatever fails."""
    import grpc

    from importer.errors import ImportFailed
    from importer.export import export_volume
    from controlplane import kubelet
    from controlplane.csi_client import CsiClient

    if args.kind not in ("pvc", "persistentvolumeclaim"):
        print("error: only pvc exports are supported (pvlun export pvc NAME -o FILE)", file=sys.stderr)
        return 1
    embedded_only(args, "export", "a VirtualMachineExport (virtctl vmexport)")
    data_dir = os.path.abspath(args.data_dir)
    store = open_store(data_dir)
    try:
        csi = CsiClient.of_daemon(data_dir)
    except LookupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    node_id = args.node_id or csi.node_ids[0]
    if node_id not in csi.node_ids:
        print(f"error: node {node_id!r} is not served by the daemon (its nodes: {', '.join(csi.node_ids)})",
              file=sys.stderr)
        return 1
    owner = f"export/{args.namespace}/{args.name}"
    try:
        attachment = kubelet.attach(store, csi, data_dir, args.name, args.namespace, node_id, owner, readonly=True)
    except kubelet.NotReady as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except grpc.RpcError as exc:
        print(f"error: cannot attach {args.namespace}/{args.name} on {node_id}: {exc.code().name}: {exc.details()}",
              file=sys.stderr)
        return 1
    try:
        export_volume(attachment.path, args.output, args.format)
    except ImportFailed as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    finally:
        kubelet.detach(store, csi, attachment.volume_id, node_id, owner)
    st = os.stat(args.output)
    print(f"exported {args.namespace}/{args.name} to {args.output} ({args.format}, {st.st_size} bytes, "
          f"{st.st_blocks * 512} allocated)")
    return 0


def add_commands(sub, data_dir_arg) -> None:
    up = sub.add_parser("image-upload", help="upload a disk image into a DataVolume (like virtctl image-upload)")
    up.add_argument("--dv", required=True, help="DataVolume name (created when --size is given)")
    up.add_argument("--image-path", required=True)
    up.add_argument("--size", help="create the DataVolume with this size, e.g. 10Gi")
    up.add_argument("--storage-class")
    up.add_argument("--access-mode", default="ReadWriteOnce")
    up.add_argument("--block-volume", action="store_true", help="create a Block volume")
    up.add_argument("-n", "--namespace", default="default")
    up.add_argument("--timeout", type=float, default=3600)
    data_dir_arg(up)
    up.set_defaults(func=cmd_image_upload)

    ex = sub.add_parser("export", help="write a volume's disk to a file (like virtctl vmexport download)")
    ex.add_argument("kind", help="pvc")
    ex.add_argument("name")
    ex.add_argument("-o", "--output", required=True)
    ex.add_argument("--format", choices=["raw", "qcow2"], default="raw")
    ex.add_argument("-n", "--namespace", default="default")
    ex.add_argument("--node-id", help="node to attach on (default: the daemon's first node)")
    data_dir_arg(ex)
    ex.set_defaults(func=cmd_export)


def answer_token_requests(args: argparse.Namespace, requests: list[dict]) -> int:
    """CDI's UploadTokenRequests: a token for each claim's upload, printed with the endpoint to
    send the image to (what `kubectl create -f TOKEN.yaml -o jsonpath='{.status.token}'` and
    CDI's upload proxy give). The upload server checks at upload time that the claim's
    DataVolume waits for one, as CDI's proxy does."""
    from importer.upload_gateway import TOKEN_TTL, endpoint, mint_token

    if not requests:
        return 0
    try:
        url, ca = endpoint(os.path.abspath(args.data_dir))
    except LookupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for req in requests:
        ns, claim = req["metadata"].get("namespace") or args.namespace or "default", req["spec"]["pvcName"]
        token = mint_token(os.path.abspath(args.data_dir), ns, claim)
        print(f"uploadtokenrequest/{req['metadata']['name']} created")
        print(f"  token (for {ns}/{claim}, valid {TOKEN_TTL // 60} minutes): {token}")
        print(f"  upload with: curl --cacert {ca} -H \"Authorization: Bearer $TOKEN\" --data-binary @IMAGE "
              f"{url}/v1beta1/upload")
    return 0

