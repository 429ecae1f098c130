"""The upload endpoint in `pvlun serve`: resolves a DataVolume in UploadReady to its
attached volume, and moves the DataVolume on when an upload ends. Tokens are HMACs with
a key kept in the data dir (mode 0600), minted per DataVolume with a short lifetime.

The volume is attached only while bytes come (the attachment is what start-up repair
takes as "an upload was under way"); an upload cut off halfway starts over on a fresh
volume, as a restarted import does, so no byte of it is left for the next one."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import tempfile

from importer import reconcile as dv
from importer.scratch import scratch_dir
from importer.upload_server import KEY_BYTES, UploadServer, issue_token
from controlplane import kubelet
from controlplane.context import Context

log = logging.getLogger("pvlun.upload")
TOKEN_TTL = 300


def upload_dir(data_dir: str) -> str:
    return os.path.join(data_dir, "upload")


def token_key(data_dir: str) -> bytes:
    """The HMAC key, made on first use; only root (the daemon and the CLI) can read it.

    Written whole or not at all (a temporary file, fsync, rename): a crash must not leave an
    empty key, which would sign tokens anyone can make. A key shorter than KEY_BYTES (a file
    cut short before this was so) is replaced by a new one; tokens signed with it stop working."""
    path = os.path.join(upload_dir(data_dir), "token.key")
    try:
        with open(path, "rb") as f:
            key = f.read()
        if len(key) >= KEY_BYTES:
            return key
        log.warning("the upload token key in %s holds %d bytes; making a new one", path, len(key))
    except FileNotFoundError:
        pass
    folder = os.path.dirname(path)
    os.makedirs(folder, mode=0o700, exist_ok=True)
    key = secrets.token_bytes(KEY_BYTES)
    fd, tmp = tempfile.mkstemp(prefix=".token.key-", dir=folder)  # 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(key)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return key


def mint_token(data_dir: str, namespace: str, name: str, ttl: float = TOKEN_TTL) -> str:
    return issue_token(token_key(data_dir), f"{namespace}/{name}", ttl)


def endpoint(data_dir: str) -> tuple[str, str]:
    """(URL, CA file) of a running daemon's upload endpoint."""
    d = upload_dir(data_dir)
    try:
        with open(os.path.join(d, "url")) as f:
            return f.read().strip(), os.path.join(d, "tls", "tls.crt")
    except FileNotFoundError:
        raise LookupError("the daemon serves no upload endpoint (it runs with --mode all only)") from None


class UploadGateway:
    def __init__(self, ctx: Context, address: tuple[str, int] = ("127.0.0.1", 0)):
        self.ctx = ctx
        self.attached: dict[str, kubelet.Attachment] = {}
        scratch = scratch_dir(ctx.data_dir)
        try:
            self.server = UploadServer(
                cert_dir=os.path.join(upload_dir(ctx.data_dir), "tls"), secret_key=token_key(ctx.data_dir),
                resolve=self.resolve, on_done=self.on_done, on_interrupted=self.on_interrupted,
                progress=self.progress, scratch_dir=scratch, address=address, check=self.check, release=self.release)
        except OSError as exc:
            raise OSError(f"cannot listen on {address[0]}:{address[1]} for uploads: {exc.strerror}") from None

    def start(self) -> str:
        self.server.start()
        with open(os.path.join(upload_dir(self.ctx.data_dir), "url"), "w") as f:
            f.write(self.server.url)
        log.info("upload endpoint %s", self.server.url)
        return self.server.url

    def stop(self) -> None:
        self.server.stop()
        try:
            os.unlink(os.path.join(upload_dir(self.ctx.data_dir), "url"))
        except FileNotFoundError:
            pass

    def _dv(self, key: str) -> dict:
        ns, name = key.split("/", 1)
        obj = self.ctx.store.get(dv.KIND, name, ns)
        if obj is None:
            raise LookupError(f"DataVolume {key} does not exist")
        return obj

    def check(self, key: str) -> dict:
        """The DataVolume, if it waits for an upload (LookupError if not); attaches nothing."""
        obj = self._dv(key)
        if (obj.get("status") or {}).get("phase") != "UploadReady":
            raise LookupError(f"DataVolume {key} is not UploadReady (phase {(obj.get('status') or {}).get('phase')})")
        return obj

    def resolve(self, key: str):
        obj = self.check(key)
        ns, name = key.split("/", 1)
        with self.ctx.slots.hold(f"upload/{key}") as node:  # NoFreeSlot (a LookupError): the client retries
            attachment = kubelet.attach(self.ctx.store, self.ctx.csi, self.ctx.data_dir, name, ns, node,
                                        f"upload/{key}")
        self.attached[key] = attachment
        pvc = self.ctx.store.get("PersistentVolumeClaim", name, ns)
        return dv.target_for(attachment, pvc, obj)

    def release(self, key: str) -> None:
        """Detach what `resolve` attached, whatever the upload's end was."""
        attachment = self.attached.pop(key, None)
        if attachment:
            kubelet.detach(self.ctx.store, self.ctx.csi, attachment.volume_id, attachment.node_id, f"upload/{key}")

    def progress(self, key: str, percent: float) -> None:
        dv.Progress(self.ctx, self._dv(key))(percent)

    def on_done(self, key: str, ok: bool, message: str) -> None:
        obj = self._dv(key)
        if ok:
            dv.set_phase(self.ctx, obj, "Succeeded", progress="100.0%", running=(False, "Completed", "Upload Complete"),
                      ready=True, event=("Normal", "UploadSucceeded", "Upload Successful"))
        else:
            reason, _, text = message.partition(": ")
            dv.fail(self.ctx, obj, reason if reason.isalpha() else "UploadFailed", text or message)

    def on_interrupted(self, key: str, message: str) -> None:
        """A cut-off upload: a fresh volume gets ready for upload, and the image can be sent again."""
        dv.start_over(self.ctx.store, self._dv(key), "UploadInterrupted",
                      message + "; send the image again once the DataVolume is UploadReady")
